"""QoS 1 acknowledgements to the broker in the order the messages arrived, waiting a bounded time.

Workers finish messages out of order (two workers, batched ``Done`` records, a slow handler), and
the ledger acknowledges each as soon as it is done. MQTT 3.1.1 and 5 both say a client sends its
PUBACKs in the order the PUBLISH packets arrived ([MQTT-4.6.0-2]), and Mosquitto 2.0 counts on it:
on each PUBACK it moves ``max_inflight_messages`` (20) minus the acknowledged message's position
in its in-flight list from its queue into flight. An acknowledgement with 20 unacknowledged
messages ahead of it lets no new message out, so a drain acknowledged out of order falls into
lock-step, one message at a time (docs/performance.md, "Issue 16: W6").

So the agent keeps the connection's QoS 1 packet ids in arrival order and sends an acknowledgement
only when every earlier one has gone; one that must wait is held. Holding is bounded: once the
oldest held acknowledgement has waited ``HOLD`` seconds, every held one goes out (still in arrival
order among themselves), and the unacknowledged messages they waited for drop out of the ordering,
so a message that is slow, held for a retry or never acknowledged (the agent stopping) delays the
others once, by at most ``HOLD``. Memory: one entry per QoS 1 message the agent holds unacknowledged,
which the ledger bounds (read-ahead, workers x prefetch, held retries) and MQTT caps at 65,535 ids.

Held acknowledgements belong to their connection: on a new one (the ledger's ``epoch``) or while
offline they are dropped, never sent (the broker sends those messages again). Once stopping, held
ones go out at once and the ordering ends. Runs in the agent process, in its one thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

HOLD = 0.1
"""Seconds an acknowledgement waits at most for the ones before it."""


class AckOrder:
    """Sends QoS 1 acknowledgements (``send(mid)``) in arrival order, each held at most ``hold``."""

    __slots__ = ("done", "epoch", "held", "hold", "order", "passing", "send", "since", "waiting")

    def __init__(self, send: Callable[[int], object], hold: float = HOLD) -> None:
        self.send = send
        self.hold = hold
        self.order: deque[int] = deque()  # the connection's QoS 1 ids in arrival order, not yet sent
        self.waiting: dict[int, int] = {}  # id -> times it is in ``order``
        self.done: dict[int, int] = {}  # id -> acknowledgements held behind an earlier id
        self.held = 0  # acknowledgements held
        self.since = 0.0  # when the oldest held one was held
        self.epoch = -1  # the connection ``order`` belongs to
        self.passing = False  # stopping: everything goes out at once

    def arrived(self, mids: Iterable[int], epoch: int) -> None:
        """QoS 1 messages the ledger took in, in arrival order, on connection ``epoch``."""
        if epoch != self.epoch:
            self._reset(epoch)
        if self.passing:
            return
        order, waiting = self.order, self.waiting
        for mid in mids:
            order.append(mid)
            waiting[mid] = waiting.get(mid, 0) + 1

    def ack(self, mid: int, epoch: int, now: float) -> None:
        """The ledger acknowledges ``mid`` on connection ``epoch`` (the current, online one)."""
        if epoch != self.epoch:
            self._reset(epoch)
        order = self.order
        if order and order[0] == mid:
            self._pop()
            self.send(mid)
            done = self.done
            while order and order[0] in done:  # the ones that waited for it
                self._release(self._pop())
            if not self.held:
                self.since = 0.0
            return
        held = self.done.get(mid, 0)
        if held >= self.waiting.get(mid, 0):  # not ordered: passing, dropped as stuck, never taken in
            self.send(mid)
            return
        if not self.held:
            self.since = now
        self.held += 1
        self.done[mid] = held + 1

    def due(self) -> float | None:
        """When the held acknowledgements must go out, if any are held."""
        return self.since + self.hold if self.held else None

    def expire(self, now: float, epoch: int, online: bool) -> None:
        """Send what has waited ``hold``; drop what belongs to a connection that is gone."""
        if epoch != self.epoch or not online:
            self._reset(epoch)
        elif self.held and now >= self.since + self.hold:
            self.flush()

    def flush(self) -> None:
        """Send every held acknowledgement, in arrival order; the unacknowledged ids ahead of them
        leave the ordering (their acknowledgements go out when they come)."""
        kept: deque[int] = deque()
        done = self.done
        for mid in self.order:
            if not self.held:
                kept.append(mid)
            elif mid in done:
                self._release(mid)
                self._unlist(mid)
            else:
                self._unlist(mid)  # stuck ahead of held ones
        self.order = kept
        self.since = 0.0

    def stop(self, epoch: int, online: bool) -> None:
        """Stopping: held acknowledgements go out now (if their connection is still up), later
        ones as they come."""
        if epoch != self.epoch or not online:
            self._reset(epoch)
        self.flush()
        self.passing = True
        self.order.clear()
        self.waiting.clear()

    def _pop(self) -> int:
        mid = self.order.popleft()
        self._unlist(mid)
        return mid

    def _unlist(self, mid: int) -> None:
        count = self.waiting[mid] - 1
        if count:
            self.waiting[mid] = count
        else:
            del self.waiting[mid]

    def _release(self, mid: int) -> None:
        count = self.done[mid] - 1
        if count:
            self.done[mid] = count
        else:
            del self.done[mid]
        self.held -= 1
        self.send(mid)

    def _reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.order.clear()
        self.waiting.clear()
        self.done.clear()
        self.held = 0
        self.since = 0.0
