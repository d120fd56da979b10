"""The delivery core: every decision about a message between its arrival and its acknowledgement.

No socket, no paho, no clock: the agent's loop (``loop.py``) reads records and packets, tells the
ledger what happened (a message arrived, a worker is up/ready/retiring/gone, a delivery is done,
the connection came or went, the agent stops), and the ledger answers through injected
callbacks (:class:`Effects`): deliver to a slot, acknowledge a packet id, dead-letter, drop
(and requeued, for the metrics).
Callbacks rather than returned effect objects: the hot path (one arrival, one dispatch, one
Done) then allocates nothing beyond the :class:`Delivery` itself, and the effects happen in the
order the decisions are made. Runs in the agent process, in its one thread.

The guarantees enforced here (property-tested in ``tests/test_ledger.py``):

- A QoS 1 message is acknowledged once at most, only after a worker reported it done or its dead
  letter was settled, and only on the connection (``epoch``) it arrived on: an acknowledgement on a
  later connection would name another message.
- A message is held by one worker at most, and a worker holds at most ``prefetch``.
- A message leaves only by acknowledgement, dead letter, drop (``max_attempts`` without a dead
  letter topic), or the stop (it then stays unacknowledged at the broker); a worker that dies gives
  back what it held, front of the queue, the one it died on counting an attempt.
- A lost connection forgets the undispatched QoS 1 messages: the broker sends them again.
- A failed message waiting for its retry delay (``held``) stays unacknowledged, takes no worker's
  prefetch slot, and goes back to the queue when :meth:`DeliveryLedger.due` finds its time passed;
  a lost connection or the stop treats it like an undispatched one.
- Ordered mode (``key_of`` given): a message goes to a worker only once the previous message of
  its key is settled (acknowledged, dead letter settled, or dropped); a redelivery keeps its place
  at the head of its key. Only a key's head is in ``pending``; the rest wait in its queue in
  ``keys`` and take no worker's prefetch slot; a held message stays its key's head, so the key
  waits for it. Other modes never look at keys.
- Ordered mode after an agent restart: nothing goes out until each inherited worker told what it holds
  from the agent before (``holding``) or is gone; those keys wait for its ``done`` or death.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from procmqtt.agent.carryover import Carryover
from procmqtt.agent.deliveries import INVALID, Delivery, Effects, Inbound
from procmqtt.agent.dispatch import Dispatcher
from procmqtt.agent.retry import AT_ONCE, HOLD_LIMIT, RetrySchedule
from procmqtt.message import Properties
from procmqtt.orderkey import KeyOf


@dataclass(slots=True, eq=False)
class Seat:
    """What the ledger knows of the worker in one slot."""

    generation: int
    outstanding: dict[int, None] = field(default_factory=dict)  # delivery ids, in the order sent
    ready: bool = False  # on_start finished
    retiring: bool = False  # recycling: gets nothing new, then a stop


class DeliveryLedger:
    """Pending and dispatched messages, the workers' windows, attempts and epochs."""

    def __init__(
        self,
        effects: Effects,
        dispatcher: Dispatcher,
        *,
        prefetch: int,
        workers: int,
        max_attempts: int,
        retry_failed: bool,
        dead_letters: bool,
        retry: RetrySchedule = AT_ONCE,
        key_of: KeyOf | None = None,
    ) -> None:
        """``workers``: the configured count, for the read-ahead; ``retry_failed``: ``on_error =
        "retry"``; ``dead_letters``: a dead letter topic is set; ``retry``: the delay before a
        failed message is handed out again; ``key_of``: ordered mode, a topic's order key."""
        self.effects = effects
        self._deliver, self._ack = effects.deliver, effects.acknowledge  # the hot path's, looked up once
        self.dispatcher = dispatcher
        dispatcher.attach(lambda slot: len(self.seats[slot].outstanding))
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        self.retry_failed = retry_failed
        self.dead_letters = dead_letters
        self.read_ahead = workers * prefetch  # undispatched messages the agent reads ahead at most
        self.pending: deque[Delivery] = deque()  # received, not yet given to a worker
        self.deliveries: dict[int, Delivery] = {}  # given to a worker, not yet done
        self.retry = retry
        # failed, waiting for their retry: a heap of (due time, delivery id, delivery), at most
        # ``hold_limit``; see docs/delivery.md
        self.hold_limit = HOLD_LIMIT
        self.held: list[tuple[float, int, Delivery]] = []
        self.seats: dict[int, Seat] = {}
        self.early_ready: set[tuple[int, int]] = set()  # (slot, generation) ready before it was up
        self.delivery_ids = itertools.count(random.getrandbits(48))
        self.epoch = 0  # connections so far; the current one's number
        self.online = False  # connected: an acknowledgement can be sent
        self.stopping = False
        self.key_of = key_of
        # ordered mode: each key with a message in the agent (pending or held) -> those behind it
        self.keys: dict[str, deque[Delivery]] = {}
        self.waiting = 0  # messages in ``keys``' queues
        self.carry = Carryover(key_of)  # ordered mode after a restart: the old agent's deliveries
        self.awaited = self.carry.awaited  # inherited workers not heard from: nothing is dispatched

    # --- the connection ------------------------------------------------------------------------

    def connected(self) -> int:
        """A new connection (CONNACK): acknowledgements go out again, under a new epoch."""
        self.epoch += 1
        self.online = True
        return self.epoch

    def offline(self, *, lost: bool) -> None:
        """No acknowledgement can go out any more. ``lost``: the session continues on the next
        connection, where the broker sends the undispatched QoS 1 messages again; QoS 0 and QoS 2
        (already completed) would not come again, so they stay."""
        self.online = False
        if lost:
            forgotten_held = [h[2] for h in self.held if h[2].qos == 1]
            if forgotten_held:
                self.held = [h for h in self.held if h[2].qos != 1]
                heapq.heapify(self.held)
            if self.key_of is not None:
                self._forget_waiting_qos1(forgotten_held)
            self.pending = deque(d for d in self.pending if d.qos != 1)
            if forgotten_held and self.key_of is not None:
                self.dispatch()  # a forgotten held head freed its key, with workers maybe idle

    def _forget_waiting_qos1(self, forgotten_held: list[Delivery]) -> None:
        """Ordered mode, connection lost: the undispatched QoS 1 messages are forgotten, waiting
        and held ones too; a key whose head is forgotten passes to its next remaining message."""
        for key, queue in list(self.keys.items()):
            kept = deque(d for d in queue if d.qos != 1)
            self.waiting -= len(queue) - len(kept)
            self.keys[key] = kept
        for d in [*(d for d in self.pending if d.qos == 1), *forgotten_held]:
            self._release(d.key)

    def _release(self, key: str) -> None:
        """Ordered mode: the head of ``key`` is settled; the next message of the key is dispatchable."""
        queue = self.keys[key]
        if queue:
            self.waiting -= 1
            self.pending.append(queue.popleft())
        else:
            del self.keys[key]

    def room(self) -> int:
        """How many more messages the read-ahead takes: at most ``read_ahead`` undispatched; in
        ordered mode, ``read_ahead`` dispatchable plus as many waiting for their key, so a busy key
        holds up reading only once that many wait behind busy keys."""
        return min(self.read_ahead - len(self.pending), 2 * self.read_ahead - len(self.pending) - self.waiting)

    # --- messages in ---------------------------------------------------------------------------

    def arrived(self, batch: Iterable[Inbound], properties: Properties | None) -> None:
        """The one intake path: messages from the broker, all with ``properties`` (MQTT 5)."""
        if self.key_of is not None:
            self._arrived_ordered(batch, properties)
            return
        stopping, epoch, ids, append = self.stopping, self.epoch, self.delivery_ids, self.pending.append
        for topic, payload, qos, mid, retain, dup in batch:
            if qos == 2:
                # paho has already sent PUBREC; holding PUBCOMP across a crash would strand the
                # message (docs/delivery.md), so QoS 2 completes on arrival.
                self._ack(mid, 2)
            if not stopping:  # else QoS 1 stays unacknowledged at the broker; QoS 0 is dropped
                append(Delivery(next(ids), mid, epoch, topic, payload, qos, retain, dup, properties))
        self.dispatch()

    def _arrived_ordered(self, batch: Iterable[Inbound], properties: Properties | None) -> None:
        """Ordered mode's intake: a message whose key is busy waits behind it, out of ``pending``."""
        stopping, epoch, ids, keys, key_of = self.stopping, self.epoch, self.delivery_ids, self.keys, self.key_of
        assert key_of is not None
        for topic, payload, qos, mid, retain, dup in batch:
            if qos == 2:
                self._ack(mid, 2)
            if stopping:
                continue
            d = Delivery(next(ids), mid, epoch, topic, payload, qos, retain, dup, properties, key=key_of(topic))
            queue = keys.get(d.key)
            if queue is None:
                keys[d.key] = deque()
                self.pending.append(d)
            else:
                queue.append(d)
                self.waiting += 1
        self.dispatch()

    def dispatch(self) -> None:
        """Hand pending messages to ready workers with room, the dispatcher choosing among them.

        The ready workers are found once per call, not once per message: a delivery changes only
        the chosen seat, which leaves the list once its window is full. Same choices, same order."""
        pending = self.pending
        if not pending or self.stopping or self.awaited:
            return
        seats, prefetch = self.seats, self.prefetch
        ready = [slot for slot, s in seats.items() if s.ready and not s.retiring and len(s.outstanding) < prefetch]
        deliver, choose, deliveries = self._deliver, self.dispatcher.choose, self.deliveries
        while ready and pending:
            slot = choose(ready)
            d = pending.popleft()
            d.slot = slot
            outstanding = seats[slot].outstanding
            outstanding[d.delivery_id] = None
            deliveries[d.delivery_id] = d
            if len(outstanding) >= prefetch:
                ready.remove(slot)
            deliver(slot, d)

    def done(
        self,
        delivery_id: int,
        *,
        failed: bool,
        now: float = 0.0,
        retry_after: float | None = None,
        invalid: bool = False,
        batch: bool = False,
    ) -> int:
        """A worker finished a delivery: returns the slot that held it, or -1 if unknown (done for
        an earlier agent, freeing its key if reported in ``holding``, or already redelivered). A
        failure is retried (``on_error = "retry"``, after the ``retry`` schedule's delay from
        ``now``) or acknowledged. ``retry_after``: the handler raised ``procmqtt.Retry``: retried
        after that many seconds (negative: the schedule's) whatever ``on_error`` says, counting an
        attempt. ``invalid``: its body did not validate (``Outcome.INVALID``): dead-lettered or
        dropped at once, never retried. ``batch``: one of several outcomes read together; the caller
        calls :meth:`dispatch` once after the last, so the freed windows fill in one go."""
        d = self.deliveries.pop(delivery_id, None)
        if d is None:
            key = self.carry.finished(delivery_id)
            if key is not None:
                self._release(key)
                if not batch:
                    self.dispatch()
            return -1
        slot = d.slot
        del self.seats[slot].outstanding[delivery_id]  # a delivery is in ``deliveries`` while its seat holds it
        if retry_after is not None:
            wait = retry_after if retry_after >= 0 else None
            self._failed_attempt(d, "on_message asked for a retry", front=False, now=now, wait=wait)
        elif invalid:
            self._give_up(d, INVALID)
        elif failed and self.retry_failed:
            self._failed_attempt(d, "on_message raised", front=False, now=now)
        else:
            self._acknowledge(d)
        if not batch:
            self.dispatch()
        return slot

    def settle(self, d: Delivery) -> None:
        """A dead letter is confirmed, failed or could not be published: its original is done."""
        self._acknowledge(d)
        self.dispatch()  # ordered mode: its key's next message

    def _acknowledge(self, d: Delivery) -> None:
        """``d`` is settled: acknowledged if it can be; in ordered mode its key moves on."""
        if d.qos == 1 and d.epoch == self.epoch and self.online:
            self._ack(d.mid, 1)
        if self.key_of is not None and not self.stopping:
            self._release(d.key)

    def _failed_attempt(
        self, d: Delivery, reason: str, *, front: bool, now: float | None = None, wait: float | None = None
    ) -> None:
        """One more attempt used up: hand the message out again, or dead-letter it. ``now`` (a
        handler's failure): hold it for ``wait`` seconds, or the retry schedule's; None (a worker's
        death): at once."""
        d.attempts += 1
        if d.attempts < self.max_attempts:
            if self.stopping:
                return  # forgotten like the undispatched: QoS 1 stays unacknowledged at the broker
            if now is not None:
                delay = self.retry.wait(d.attempts) if wait is None else wait
                if delay > 0 and len(self.held) < self.hold_limit:
                    d.redelivered = True
                    self.effects.requeued(d)
                    heapq.heappush(self.held, (now + delay, d.delivery_id, d))
                    return
            self._requeue(d, front=front)
            return
        self._give_up(d, f"{reason} ({d.attempts} attempts)")

    def _give_up(self, d: Delivery, reason: str) -> None:
        """No more attempts: dead-letter it (acknowledged once the dead letter is settled), or drop it."""
        if self.dead_letters:
            self.effects.dead_letter(d, reason)
        else:
            self.effects.drop(d, reason)
            self._acknowledge(d)

    def _requeue(self, d: Delivery, *, front: bool) -> None:
        """Hand a message out again, to whichever worker is free next, marked redelivered."""
        d.redelivered = True
        self.effects.requeued(d)
        if front:
            self.pending.appendleft(d)
        else:
            self.pending.append(d)

    def due(self, now: float) -> float | None:
        """The loop's step each pass: held messages whose delay is over go to the back of the
        queue (and out, if a worker has room). Returns when the next one is due, or None."""
        held = self.held
        if held and held[0][0] <= now:
            while held and held[0][0] <= now:
                self.pending.append(heapq.heappop(held)[2])
            self.dispatch()
        return held[0][0] if held else None

    # --- workers -------------------------------------------------------------------------------

    def worker_up(self, slot: int, generation: int, *, ready: bool = False, inherited: bool = False) -> None:
        """A worker joined ``slot`` (the previous one there, if any, is already gone). ``inherited``:
        forked before this agent; ordered mode dispatches nothing until its ``holding``."""
        ready = ready or (slot, generation) in self.early_ready
        self.early_ready.discard((slot, generation))
        self.seats[slot] = Seat(generation, ready=ready)
        if inherited:
            self.carry.expect(slot)
        self.read_ahead = max(self.read_ahead, len(self.seats) * self.prefetch)
        self.dispatch()

    def _seat(self, slot: int, generation: int) -> Seat | None:
        seat = self.seats.get(slot)
        return seat if seat is not None and seat.generation == generation else None

    def holding(self, slot: int, generation: int, deliveries: Iterable[tuple[int, str]]) -> None:
        """An inherited worker's answer to ``AgentStarted``: (delivery id, topic) of what the agent before
        gave it, not done. Ordered mode: those keys wait until ``done`` for that id or its death."""
        if self._seat(slot, generation) is None or self.stopping:
            return
        for key in self.carry.reported(slot, deliveries):
            queue = self.keys.get(key)
            if queue is None:
                self.keys[key] = deque()
            else:  # nothing went out while an answer was awaited: the key's head is pending
                head = next(d for d in self.pending if d.key == key)
                self.pending.remove(head)
                queue.appendleft(head)
                self.waiting += 1
        self.dispatch()

    def ready(self, slot: int, generation: int) -> None:
        """A worker's on_start finished: it takes messages (kept if its WorkerUp is still queued)."""
        seat = self._seat(slot, generation)
        if seat is None:
            self.early_ready.add((slot, generation))
            return
        seat.ready = True
        self.dispatch()

    def retiring(self, slot: int, generation: int) -> bool:
        """A worker asked to be recycled: it gets nothing new. True the first time (send it a Stop)."""
        seat = self._seat(slot, generation)
        if seat is None or seat.retiring:
            return False
        seat.retiring = True
        return True

    def gone(self, slot: int, generation: int, current: int) -> int:
        """A worker is gone; ``current``: the delivery it was on (0 if none). What it held goes back
        to the front of the queue, marked redelivered; the one it died on counts an attempt. While
        stopping, it stays unacknowledged at the broker. Returns how many messages it held."""
        seat = self._seat(slot, generation)
        if seat is None:
            return 0
        del self.seats[slot]
        for key in self.carry.lost(slot):  # what it ran for the agent before is over
            self._release(key)
        held = [self.deliveries.pop(i) for i in seat.outstanding]
        if self.stopping:
            return len(held)
        for d in reversed(held):
            if d.delivery_id == current:
                self._failed_attempt(d, f"worker {slot} died while handling it", front=True)
            else:
                self._requeue(d, front=True)
        self.dispatch()
        return len(held)

    def stop(self) -> int:
        """Stop dispatching; undispatched and held messages are forgotten (QoS 1 stays at the
        broker). Returns how many were forgotten."""
        self.stopping = True
        held = len(self.pending) + len(self.held) + self.waiting
        self.pending.clear()
        self.held.clear()
        self.keys.clear()
        self.waiting = 0
        self.carry.clear()
        return held

    def in_flight(self) -> dict[int, int]:
        """Messages each worker holds, by slot (for the metrics)."""
        return {slot: len(s.outstanding) for slot, s in self.seats.items()}

    def window(self) -> int:
        """Messages the ready, non-retiring workers can hold at once."""
        return self.prefetch * sum(s.ready and not s.retiring for s in self.seats.values())
