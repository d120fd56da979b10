"""The delivery core (``procmqtt/agent/ledger.py``) on its own: no socket, no broker, no clock.

A hypothesis state machine drives the ledger with random interleavings of arrivals (QoS 0/1/2, over
several connections), completions, failures, workers dying mid-message, workers joining and
retiring, dead letters settling, disconnects, reconnects, the stop and the clock moving on (failed
messages held for their retry delay), and, as a restarted agent, inherited workers reporting and
finishing what the agent before gave them; it checks the guarantees after every step. Then one small table per path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from procmqtt.agent.deliveries import INVALID, Delivery, Effects, Inbound
from procmqtt.agent.dispatch import Dispatcher, LeastBusyDispatcher, RoundRobinDispatcher
from procmqtt.agent.ledger import DeliveryLedger
from procmqtt.agent.retry import RetrySchedule
from procmqtt.orderkey import key_function

pytestmark = pytest.mark.unit


@dataclass
class Recorder:
    """The ledger's effects, as they happen."""

    delivered: list[tuple[int, int]] = field(default_factory=list)  # (slot, delivery id)
    acks: list[tuple[int, int]] = field(default_factory=list)  # (mid, qos)
    dead_letters: list[tuple[Delivery, str]] = field(default_factory=list)
    drops: list[tuple[Delivery, str]] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)  # delivery ids

    def effects(self) -> Effects:
        return Effects(
            lambda slot, d: self.delivered.append((slot, d.delivery_id)),
            lambda mid, qos: self.acks.append((mid, qos)),
            lambda d, reason: self.dead_letters.append((d, reason)),
            lambda d, reason: self.drops.append((d, reason)),
            lambda d: self.requeued.append(d.delivery_id),
        )


def make(
    prefetch: int = 2,
    workers: int = 2,
    max_attempts: int = 2,
    retry_failed: bool = True,
    dead_letters: bool = True,
    retry: RetrySchedule | None = None,
    dispatcher: Dispatcher | None = None,
) -> tuple[DeliveryLedger, Recorder]:
    rec = Recorder()
    ledger = DeliveryLedger(
        rec.effects(),
        dispatcher or RoundRobinDispatcher(),
        prefetch=prefetch,
        workers=workers,
        max_attempts=max_attempts,
        retry_failed=retry_failed,
        dead_letters=dead_letters,
        retry=retry or RetrySchedule(),
    )
    return ledger, rec


TOPICS = ["k/a/1", "k/b", "k/a/2", "x"]  # under "k/{x}/#": keys k/a/# (two topics), k/b/# and x
OLD_IDS = 10**15  # delivery ids of the agent before, beyond where this one's (48 random bits) count


def msg(mid: int, qos: int = 1, topic: str = "t") -> Inbound:
    return Inbound(topic, str(mid).encode(), qos, mid, False, False)


# --- the property tests ------------------------------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    """Every message carries a unique payload: its identity across redeliveries."""

    @initialize(
        prefetch=st.integers(1, 3),
        max_attempts=st.integers(1, 3),
        retry_failed=st.booleans(),
        dead_letters=st.booleans(),
        retry_delay=st.sampled_from([0.0, 1.0]),
        ordered=st.booleans(),
        restart=st.booleans(),
        old=st.lists(st.tuples(st.integers(0, 1), st.sampled_from(TOPICS)), min_size=1, max_size=3),
    )
    def setup(
        self,
        prefetch: int,
        max_attempts: int,
        retry_failed: bool,
        dead_letters: bool,
        retry_delay: float,
        ordered: bool,
        restart: bool,
        old: list[tuple[int, str]],
    ) -> None:
        """``restart``: this ledger is a new agent's; its two workers still hold ``old`` (slot,
        topic) deliveries from the agent before, and answer when the ``report`` rule says."""
        self.rec = Recorder()
        effects = self.rec.effects()
        self.ledger = DeliveryLedger(
            Effects(self._deliver, self._acknowledge, effects.dead_letter, self._drop, effects.requeued),
            RoundRobinDispatcher(),
            prefetch=prefetch,
            workers=2,
            max_attempts=max_attempts,
            retry_failed=retry_failed,
            dead_letters=dead_letters,
            retry=RetrySchedule(retry_delay, 2.0, 3.0),
            key_of=key_function("k/{x}/#") if ordered else None,
        )
        self.now = 0.0  # the clock the ledger is told
        self.ordered = ordered
        self.arrival: list[bytes] = []  # payloads in arrival order
        self.key: dict[bytes, str] = {}  # payload -> its order key
        self.next_mid = 1
        self.generations: dict[int, int] = {0: 1, 1: 1}  # slot -> the newest generation started there
        self.arrived: dict[bytes, tuple[int, int, int]] = {}  # payload -> (qos, mid, epoch)
        self.acked: set[int] = set()  # QoS 1 mids acknowledged
        self.may_ack: set[int] = set()  # mids whose message was just finished (done, settled, dropped)
        self.finished: set[bytes] = set()  # left by a sanctioned path
        self.key_of = key_function("k/{x}/#")
        # a restarted agent: old delivery id -> (slot, topic) still out in a worker; slots not heard from
        self.old = {OLD_IDS + i: entry for i, entry in enumerate(old)} if restart else {}
        self.unheard = {0, 1} if restart and ordered else set()
        self.ledger.connected()  # connected, two ready workers: the interesting steps come early
        self.ledger.worker_up(0, 1, ready=True, inherited=restart)
        self.ledger.worker_up(1, 1, ready=True, inherited=restart)

    # effects checked as they happen

    def _deliver(self, slot: int, d: Delivery) -> None:
        seat = self.ledger.seats[slot]
        assert seat.ready and not seat.retiring, "delivered to a worker that takes nothing"
        assert len(seat.outstanding) <= self.ledger.prefetch, "over the prefetch"
        assert not self.ledger.stopping
        if self.ordered:
            assert not self.unheard, "dispatched before every inherited worker said what it holds"
            assert d.key not in {self.key_of(t) for _, t in self.old.values()}, f"{d.key} busy in a worker"
            others = [x for x in self.ledger.deliveries.values() if x is not d and x.key == d.key]
            assert not others, f"two deliveries of key {d.key} outstanding"
            earlier = self.arrival[: self.arrival.index(d.payload)]
            behind = [p for p in earlier if self.key[p] == d.key and p not in self.finished]
            assert not behind, f"{d.payload!r} dispatched before {behind} of its key {d.key} settled"

    def _acknowledge(self, mid: int, qos: int) -> None:
        assert self.ledger.online, "acknowledged without a connection"
        if qos == 2:
            return  # PUBCOMP on arrival
        assert mid in self.may_ack, f"mid {mid} acknowledged before it was done or its dead letter settled"
        assert mid not in self.acked, f"mid {mid} acknowledged twice"
        payload = next(p for p, (q, m, _) in self.arrived.items() if m == mid)
        assert self.arrived[payload][2] == self.ledger.epoch, "acknowledged on another connection"
        self.acked.add(mid)

    def _drop(self, d: Delivery, reason: str) -> None:
        self.rec.drops.append((d, reason))
        self.may_ack.add(d.mid)
        self.finished.add(d.payload)

    def _finishing(self, d: Delivery) -> None:
        self.may_ack.add(d.mid)
        self.finished.add(d.payload)

    # rules

    @precondition(lambda self: self.ledger.online)
    @rule(
        messages=st.lists(
            st.tuples(st.sampled_from([0, 1, 2]), st.sampled_from(TOPICS)),
            min_size=1,
            max_size=4,
        )
    )
    def arrive(self, messages: list[tuple[int, str]]) -> None:
        batch = []
        for q, topic in messages:
            mid, self.next_mid = self.next_mid, self.next_mid + 1
            batch.append(msg(mid, q, topic))
            self.arrival.append(str(mid).encode())
            self.key[str(mid).encode()] = topic if topic == "x" else f"k/{topic.split('/')[1]}/#"
            self.arrived[str(mid).encode()] = (q, mid, self.ledger.epoch)
            if self.ledger.stopping:
                self.finished.add(str(mid).encode())  # stays at the broker (QoS 1) or is dropped
        self.ledger.arrived(batch, None)

    @precondition(lambda self: self.old or self.unheard)
    @rule(slot=st.integers(0, 1), stale=st.booleans())
    def report(self, slot: int, stale: bool) -> None:
        """An inherited worker answers AgentStarted (``stale``: an older generation's answer)."""
        if slot not in self.ledger.seats or self.generations[slot] != 1:
            return  # gone or replaced: it never answers
        held = [(i, t) for i, (s, t) in self.old.items() if s == slot]
        if not stale:
            self.unheard.discard(slot)  # before: the answer may let messages out at once
        self.ledger.holding(slot, 1 - stale, held)

    @precondition(lambda self: self.unheard)
    @rule()
    def everyone_reports(self) -> None:
        """Both inherited workers answer (the common case, and a second way in: rules are drawn evenly)."""
        for slot in sorted(self.unheard):
            self.report(slot, stale=False)

    @precondition(lambda self: self.old)
    @rule(data=st.data(), failed=st.booleans())
    def old_done(self, data: st.DataObject, failed: bool) -> None:
        """A Done for what the agent before gave a worker: unknown here (-1), its key moves on."""
        delivery_id = data.draw(st.sampled_from(sorted(self.old)))
        del self.old[delivery_id]
        assert self.ledger.done(delivery_id, failed=failed, now=self.now) == -1

    @rule(slot=st.integers(0, 2), ready=st.booleans())
    def worker_up(self, slot: int, ready: bool) -> None:
        generation = self.generations.get(slot, 0) + 1
        if slot in self.ledger.seats:  # the agent forgets the old one first
            self._gone(slot, 0)
        if ready:
            self.ledger.ready(slot, generation)  # before its WorkerUp: kept
        self.generations[slot] = generation
        self.ledger.worker_up(slot, generation)

    @rule(slot=st.integers(0, 2), stale=st.booleans())
    def ready(self, slot: int, stale: bool) -> None:
        self.ledger.ready(slot, self.generations.get(slot, 0) - stale)

    @rule(slot=st.integers(0, 2))
    def retire(self, slot: int) -> None:
        seat = self.ledger.seats.get(slot)
        first = seat is not None and not seat.retiring
        assert self.ledger.retiring(slot, self.generations.get(slot, 0)) == first

    @precondition(lambda self: self.ledger.deliveries)
    @rule(
        data=st.data(),
        failed=st.booleans(),
        retry_after=st.sampled_from([None, None, 0.0, 2.0]),
        invalid=st.sampled_from([False, False, True]),
    )
    def done(self, data: st.DataObject, failed: bool, retry_after: float | None, invalid: bool) -> None:
        d = data.draw(st.sampled_from(sorted(self.ledger.deliveries.values(), key=lambda d: d.delivery_id)))
        self._done(d, failed, retry_after, invalid, batch=False)

    @precondition(lambda self: self.ledger.deliveries or self.old)
    @rule(
        data=st.data(),
        outcomes=st.lists(
            st.tuples(st.booleans(), st.sampled_from([None, None, 0.0, 2.0]), st.sampled_from([False, False, True])),
            min_size=1,
            max_size=4,
        ),
        old=st.integers(0, 2),
    )
    def done_together(self, data: st.DataObject, outcomes: list[tuple[bool, float | None, bool]], old: int) -> None:
        """Several Dones read in one pass (the agent's ``_read_upstream``): each settled with
        ``batch``, some for the agent before, then one ``dispatch`` (the invariants hold after it)."""
        out = sorted(self.ledger.deliveries.values(), key=lambda d: d.delivery_id)
        chosen = data.draw(st.lists(st.sampled_from(out), unique=True, max_size=len(outcomes))) if out else []
        for d, (failed, retry_after, invalid) in zip(chosen, outcomes, strict=False):
            self._done(d, failed, retry_after, invalid, batch=True)
        for delivery_id in sorted(self.old)[:old]:
            del self.old[delivery_id]
            assert self.ledger.done(delivery_id, failed=False, now=self.now, batch=True) == -1
        self.ledger.dispatch()

    def _done(self, d: Delivery, failed: bool, retry_after: float | None, invalid: bool, *, batch: bool) -> None:
        slot = d.slot
        invalid = invalid and retry_after is None  # Outcome.INVALID carries no retry delay
        failed = failed and not invalid
        retried = retry_after is not None or (failed and self.ledger.retry_failed)
        given_up = len(self.rec.dead_letters) + len(self.rec.drops)
        if invalid:
            pass  # the dead letter's settle, or the drop, finishes it (the effects above)
        elif not retried:
            self._finishing(d)
        elif self.ledger.stopping and d.attempts + 1 < self.ledger.max_attempts:
            self.finished.add(d.payload)  # not handed out again: stays unacknowledged at the broker
        attempts = d.attempts
        assert (
            self.ledger.done(
                d.delivery_id, failed=failed, now=self.now, retry_after=retry_after, invalid=invalid, batch=batch
            )
            == slot
        )
        assert d.attempts == attempts + retried
        if invalid:  # given up at once, whatever its attempts: never held or handed out again
            assert len(self.rec.dead_letters) + len(self.rec.drops) == given_up + 1
            assert (self.rec.dead_letters if self.ledger.dead_letters else self.rec.drops)[-1] == (d, INVALID)
        if d.delivery_id in self.ledger.seats[slot].outstanding:  # retried, and handed out again at once
            assert d.redelivered and retried and not batch
        for due, _, h in self.ledger.held:
            assert due > self.now and h.redelivered and h.attempts < self.ledger.max_attempts

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.5]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        before = {id(h) for _, _, h in self.ledger.held}
        nxt = self.ledger.due(self.now)
        assert all(due > self.now for due, _, _ in self.ledger.held), "a message held past its time"
        assert nxt == (min(due for due, _, _ in self.ledger.held) if self.ledger.held else None)
        out = {id(d) for d in self.ledger.pending} | {id(d) for d in self.ledger.deliveries.values()}
        back = before - {id(h) for _, _, h in self.ledger.held}
        assert back <= out, "a held message did not come back"

    @rule()
    def done_unknown(self) -> None:
        assert self.ledger.done(-1, failed=False) == -1

    @precondition(lambda self: self.ledger.seats)
    @rule(data=st.data(), on_one=st.booleans())
    def worker_dies(self, data: st.DataObject, on_one: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.ledger.seats)))
        held = list(self.ledger.seats[slot].outstanding)
        current = data.draw(st.sampled_from(held)) if held and on_one else 0
        self._gone(slot, current)

    def _gone(self, slot: int, current: int) -> None:
        held = [self.ledger.deliveries[i] for i in self.ledger.seats[slot].outstanding]
        stopping = self.ledger.stopping
        if stopping:
            self.finished.update(d.payload for d in held)  # stays unacknowledged at the broker
        self.old = {i: (s, t) for i, (s, t) in self.old.items() if s != slot}  # its old ones are over
        self.unheard.discard(slot)  # before: its death may let messages out at once
        assert self.ledger.gone(slot, self.generations[slot], current) == len(held)
        assert slot not in self.ledger.seats
        if stopping:
            return
        pending = {id(d) for d in self.ledger.pending}
        dead = {id(d) for d, _ in self.rec.dead_letters} | {id(d) for d, _ in self.rec.drops}
        for d in held:  # back in the queue (maybe handed out again at once), or given up
            back = id(d) in pending or (d.delivery_id in self.ledger.deliveries and d.slot != slot)
            assert back or id(d) in dead, "a dead worker's message disappeared"
            assert back <= d.redelivered

    @rule()
    def worker_gone_twice(self) -> None:
        assert self.ledger.gone(7, 1, 0) == 0  # never up, or already gone

    @precondition(lambda self: self.rec.dead_letters)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        pending = [d for d, _ in self.rec.dead_letters if d.payload not in self.finished]
        if pending:
            d = data.draw(st.sampled_from(pending))
            self._finishing(d)
            self.ledger.settle(d)

    @rule(lost=st.booleans(), back=st.booleans())
    def disconnect(self, lost: bool, back: bool) -> None:
        """``back``: reconnected at once (what held messages meet most often)."""
        if lost:
            self.finished.update(d.payload for d in self.ledger.pending if d.qos == 1)  # the broker resends
            self.finished.update(d.payload for _, _, d in self.ledger.held if d.qos == 1)
            self.finished.update(d.payload for q in self.ledger.keys.values() for d in q if d.qos == 1)
        self.ledger.offline(lost=lost)
        assert not self.ledger.online
        if back:
            self.reconnect()

    @precondition(lambda self: not self.ledger.online)
    @rule()
    def reconnect(self) -> None:
        before = self.ledger.epoch
        assert self.ledger.connected() == before + 1

    @precondition(lambda self: self.next_mid > 12)  # the stop ends the interesting part: not too early
    @rule()
    def stop(self) -> None:
        self.finished.update(d.payload for d in self.ledger.pending)
        self.finished.update(d.payload for _, _, d in self.ledger.held)
        self.finished.update(d.payload for q in self.ledger.keys.values() for d in q)
        undispatched = len(self.ledger.pending) + len(self.ledger.held) + self.ledger.waiting
        assert self.ledger.stop() == undispatched
        self.unheard.clear()  # nothing is dispatched any more: nothing is awaited
        assert not self.ledger.pending and not self.ledger.held and not self.ledger.keys

    # invariants, after every step

    @invariant()
    def one_holder_each(self) -> None:
        held = [i for s in self.ledger.seats.values() for i in s.outstanding]
        assert len(held) == len(set(held)), "a message held by two workers"
        assert set(held) == set(self.ledger.deliveries)
        for slot, seat in self.ledger.seats.items():
            assert len(seat.outstanding) <= self.ledger.prefetch
            assert all(self.ledger.deliveries[i].slot == slot for i in seat.outstanding)
        assert self.ledger.in_flight() == {s: len(seat.outstanding) for s, seat in self.ledger.seats.items()}
        assert 0 <= self.ledger.window() <= self.ledger.prefetch * len(self.ledger.seats)

    @invariant()
    def nothing_disappears(self) -> None:
        pending = [d.payload for d in self.ledger.pending]
        pending += [d.payload for q in self.ledger.keys.values() for d in q]
        held = [d.payload for d in self.ledger.deliveries.values()]
        waiting = [d.payload for _, _, d in self.ledger.held]  # no worker's: takes no prefetch slot
        dead = [d.payload for d, _ in self.rec.dead_letters if d.payload not in self.finished]
        places = pending + held + waiting + dead
        assert len(places) == len(set(places)), "a message in two places"
        for payload in self.arrived:
            assert (payload in self.finished) != (payload in places), f"message {payload!r} disappeared"

    @invariant()
    def one_per_key_out(self) -> None:
        """Ordered mode: one message per key pending, held or dead-lettering; the rest wait behind it."""
        if not self.ordered:
            assert not self.ledger.keys and not self.ledger.waiting
            return
        unsettled = [d for d, _ in self.rec.dead_letters if d.payload not in self.finished]
        held = [d for _, _, d in self.ledger.held]  # a held message stays its key's head
        heads = [d.key for d in [*self.ledger.pending, *self.ledger.deliveries.values(), *held, *unsettled]]
        assert len(heads) == len(set(heads)), "two messages of one key out at once"
        if not self.ledger.stopping:
            # a key an inherited worker reported busy has no head here: all its messages wait
            carried = {self.key_of(t) for s, t in self.old.values() if s not in self.unheard}
            assert not set(heads) & carried, "a key out here while a worker still runs it for the agent before"
            assert set(heads) | carried == set(self.ledger.keys), "a key with no head, or a head with no key"
        assert self.ledger.waiting == sum(map(len, self.ledger.keys.values()))
        assert self.ledger.room() <= self.ledger.read_ahead - len(self.ledger.pending)

    @invariant()
    def dispatched_while_anyone_can_take(self) -> None:
        assert self.ledger.awaited == self.unheard
        if self.ledger.pending and not self.ledger.stopping and not self.unheard:
            assert not any(
                s.ready and not s.retiring and len(s.outstanding) < self.ledger.prefetch
                for s in self.ledger.seats.values()
            ), "a message waits while a worker is free"


LedgerMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_ledger_properties = LedgerMachine.TestCase


# --- one small table per path --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qos", "acks", "pending"),
    [
        (0, [], 1),
        (1, [], 1),
        (2, [(1, 2)], 1),  # PUBCOMP on arrival
    ],
)
def test_arrival(qos: int, acks: list[tuple[int, int]], pending: int) -> None:
    ledger, rec = make()
    ledger.connected()
    ledger.arrived([msg(1, qos)], None)
    assert (rec.acks, len(ledger.pending), ledger.room()) == (acks, pending, 4 - pending)


@pytest.mark.parametrize(
    ("ready", "retiring", "delivered"),
    [
        (True, False, [0, 1, 0, 1]),  # round robin, two each (prefetch 2), the fifth waits
        (False, False, []),
        (True, True, []),
    ],
)
def test_dispatch(ready: bool, retiring: bool, delivered: list[int]) -> None:
    ledger, rec = make()
    ledger.connected()
    for slot in (0, 1):
        ledger.worker_up(slot, 1, ready=ready)
        if retiring:
            assert ledger.retiring(slot, 1)
            assert not ledger.retiring(slot, 1)  # the Stop goes once
    ledger.arrived([msg(m) for m in range(1, 6)], None)
    assert [slot for slot, _ in rec.delivered] == delivered
    assert len(ledger.pending) == 5 - len(delivered)


def test_least_busy_fills_the_emptiest_worker() -> None:
    ledger, rec = make(prefetch=3, workers=3, dispatcher=LeastBusyDispatcher())
    ledger.connected()
    for slot in (0, 1, 2):
        ledger.worker_up(slot, 1, ready=True)
    ledger.arrived([msg(m) for m in range(1, 7)], None)  # six over three idle workers: two each
    assert sorted(slot for slot, _ in rec.delivered) == [0, 0, 1, 1, 2, 2]
    for slot, delivery_id in rec.delivered:
        if slot == 1:
            ledger.done(delivery_id, failed=False)
    del rec.delivered[:]
    ledger.arrived([msg(7), msg(8)], None)  # worker 1 is idle, the others hold two
    assert [slot for slot, _ in rec.delivered] == [1, 1]


@pytest.mark.parametrize(
    ("failed", "retry", "epoch_changed", "acks", "requeued"),
    [
        (False, True, False, [(1, 1)], 0),
        (True, False, False, [(1, 1)], 0),  # on_error = "ack"
        (True, True, False, [(1, 1)], 1),  # retried at the back, handed out again, then done
        (False, True, True, [], 0),  # arrived on an earlier connection: no ack on this one
    ],
)
def test_done(failed: bool, retry: bool, epoch_changed: bool, acks: list[tuple[int, int]], requeued: int) -> None:
    ledger, rec = make(max_attempts=3, retry_failed=retry)
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1)], None)
    ((_, delivery_id),) = rec.delivered
    if epoch_changed:
        ledger.offline(lost=True)
        ledger.connected()
    assert ledger.done(delivery_id, failed=failed) == 0
    assert ledger.done(delivery_id, failed=False) == (0 if requeued else -1)  # handed out again, or gone
    assert (rec.acks, len(rec.requeued)) == (acks, requeued)


@pytest.mark.parametrize(
    ("dead_letters", "dead", "drops", "acks_before_settle"),
    [
        (True, 1, 0, []),
        (False, 0, 1, [(1, 1)]),
    ],
)
def test_attempts_used_up(dead_letters: bool, dead: int, drops: int, acks_before_settle: list[tuple[int, int]]) -> None:
    ledger, rec = make(max_attempts=1, dead_letters=dead_letters)
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1)], None)
    ledger.done(rec.delivered[0][1], failed=True)
    assert (len(rec.dead_letters), len(rec.drops), rec.acks) == (dead, drops, acks_before_settle)
    assert "on_message raised (1 attempts)" in (rec.dead_letters or rec.drops)[0][1]
    if dead:
        ledger.settle(rec.dead_letters[0][0])
        assert rec.acks == [(1, 1)]


@pytest.mark.parametrize("dead_letters", [True, False])
def test_an_invalid_body_is_given_up_at_once_never_retried(dead_letters: bool) -> None:
    ledger, rec = make(max_attempts=5, retry_failed=True, dead_letters=dead_letters)
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1), msg(2)], None)
    invalid, valid = (delivery_id for _, delivery_id in rec.delivered)
    assert ledger.done(invalid, failed=False, now=1.0, invalid=True) == 0
    assert not rec.requeued and not ledger.held and not ledger.pending
    given_up = rec.dead_letters if dead_letters else rec.drops
    assert [(d.mid, d.attempts, reason) for d, reason in given_up] == [(1, 0, INVALID)]
    assert rec.acks == ([] if dead_letters else [(1, 1)])  # a dead letter is acknowledged once settled
    if dead_letters:
        ledger.settle(given_up[0][0])
        assert rec.acks == [(1, 1)]
    ledger.done(valid, failed=False)
    assert rec.acks[-1] == (2, 1) and len(rec.delivered) == 2


@pytest.mark.parametrize(
    ("stopping", "current", "pending", "attempts"),
    [
        (False, "first", 2, [1, 0]),  # the one it died on counts an attempt; both at the front
        (False, None, 2, [0, 0]),
        (True, "first", 0, []),  # stays at the broker
    ],
)
def test_worker_gone(stopping: bool, current: str | None, pending: int, attempts: list[int]) -> None:
    ledger, rec = make(max_attempts=3)
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1), msg(2), msg(3)], None)  # prefetch 2: the third waits
    if stopping:
        ledger.stop()
    first = rec.delivered[0][1]
    assert ledger.gone(0, 1, first if current else 0) == 2
    assert len(ledger.pending) == pending + (0 if stopping else 1)
    assert [d.attempts for d in list(ledger.pending)[:pending]] == attempts
    assert [d.mid for d in ledger.pending][:pending] == ([1, 2] if pending else [])
    assert ledger.gone(0, 1, 0) == 0


def test_ready_before_up_and_stale_records() -> None:
    ledger, rec = make()
    ledger.connected()
    ledger.arrived([msg(1)], None)
    ledger.ready(0, 2)  # its WorkerUp is still queued
    assert not ledger.retiring(0, 2)
    ledger.worker_up(0, 2)
    assert [slot for slot, _ in rec.delivered] == [0]
    ledger.ready(0, 1)  # an older generation: ignored
    assert ledger.window() == 2


@pytest.mark.parametrize(("lost", "left"), [(True, [0, 2]), (False, [0, 1, 2])])
def test_connection_lost(lost: bool, left: list[int]) -> None:
    ledger, _ = make()
    assert ledger.connected() == 1
    ledger.arrived([msg(1, 0), msg(2, 1), msg(3, 2)], None)
    ledger.offline(lost=lost)
    assert [d.qos for d in ledger.pending] == left
    assert ledger.connected() == 2


def test_stop_forgets_the_undispatched_and_ignores_arrivals() -> None:
    ledger, rec = make()
    ledger.connected()
    ledger.arrived([msg(1), msg(2)], None)
    assert ledger.stop() == 2
    ledger.arrived([msg(3, 2), msg(4)], None)
    ledger.worker_up(0, 1, ready=True)
    assert (len(ledger.pending), rec.delivered, rec.acks) == (0, [], [(3, 2)])


def test_read_ahead_grows_with_the_workers() -> None:
    ledger, _ = make(prefetch=2, workers=1)
    assert ledger.room() == 2
    for slot in range(3):
        ledger.worker_up(slot, 1)
    assert ledger.room() == 6


# --- delayed retries ---------------------------------------------------------------------------


def held_ledger(max_attempts: int = 3, retry_failed: bool = True) -> tuple[DeliveryLedger, Recorder, int]:
    """One worker, one message handed out: its delivery id."""
    ledger, rec = make(
        max_attempts=max_attempts, retry_failed=retry_failed, retry=RetrySchedule(1.0, 2.0, 3.0), prefetch=1
    )
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1)], None)
    ((_, delivery_id),) = rec.delivered
    return ledger, rec, delivery_id


def test_a_held_message_waits_for_its_time_while_others_flow() -> None:
    ledger, rec, first = held_ledger()
    ledger.done(first, failed=True, now=10.0)
    assert (ledger.pending, ledger.in_flight()) == (deque(), {0: 0})  # held, takes no prefetch slot
    ((due, _, d),) = ledger.held
    assert 11.0 <= due <= 11.1 and d.attempts == 1 and d.redelivered
    ledger.arrived([msg(2)], None)  # another message goes to the free worker meanwhile
    assert len(rec.delivered) == 2 and rec.delivered[1][1] != first
    assert ledger.due(10.9) == due and len(rec.delivered) == 2  # not before its time
    (_, second) = rec.delivered[1]
    ledger.done(second, failed=False, now=10.95)
    assert ledger.due(due) is None and rec.delivered[-1] == (0, first)  # back after it
    ledger.done(first, failed=True, now=20.0)
    assert 22.0 <= ledger.held[0][0] <= 22.2  # the second retry waits twice as long
    assert ledger.due(30.0) is None
    ledger.done(first, failed=True, now=30.0)  # the third attempt: dead-lettered, never held
    assert ledger.held == [] and [d.attempts for d, _ in rec.dead_letters] == [3]
    assert rec.acks == [(2, 1)]  # the dead letter settles it


def test_schedule_caps_and_jitters() -> None:
    schedule = RetrySchedule(1.0, 10.0, 60.0)
    assert 1.0 <= schedule.wait(1) <= 1.1
    assert 10.0 <= schedule.wait(2) <= 11.0
    assert 60.0 <= schedule.wait(3) <= 66.0  # 100 capped at 60
    assert 60.0 <= schedule.wait(1000) <= 66.0  # no float overflow
    assert RetrySchedule().wait(5) == 0.0


@pytest.mark.parametrize(
    ("retry_failed", "after", "held"), [(True, 5.0, [5]), (False, 5.0, [5]), (False, 0.0, []), (False, -1.0, [1])]
)
def test_handler_asked_retry(retry_failed: bool, after: float, held: list[int]) -> None:
    """``Retry(after=)`` retries even with on_error = "ack" (the handler asked), after its own delay;
    a negative one (``Retry()``) after the schedule's."""
    ledger, rec, first = held_ledger(retry_failed=retry_failed)
    ledger.done(first, failed=False, now=0.0, retry_after=after)
    assert [int(due) for due, _, _ in ledger.held] == held
    assert rec.delivered == [(0, first)] * (1 if held else 2) and rec.acks == []


def test_held_messages_on_disconnect_and_stop() -> None:
    """A lost connection forgets held QoS 1 messages (the broker sends them again, and an
    acknowledgement on the new connection would be meaningless), keeps QoS 0; the stop forgets all."""
    ledger, rec = make(max_attempts=5, retry=RetrySchedule(1.0, 2.0, 3.0), prefetch=2, workers=1)
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1, 1), msg(2, 0)], None)
    for _, delivery_id in list(rec.delivered):
        ledger.done(delivery_id, failed=True, now=0.0)
    ledger.offline(lost=True)
    assert [d.qos for _, _, d in ledger.held] == [0]
    ledger.connected()
    assert ledger.stop() == 1 and ledger.held == [] and ledger.due(100.0) is None


def test_hold_limit_retries_at_once() -> None:
    ledger, rec, first = held_ledger()
    ledger.hold_limit = 0
    ledger.done(first, failed=True, now=0.0)
    assert ledger.held == [] and rec.delivered == [(0, first), (0, first)]


def test_a_death_is_retried_at_once() -> None:
    ledger, rec, first = held_ledger()
    ledger.gone(0, 1, first)
    ledger.worker_up(0, 2, ready=True)
    assert ledger.held == [] and rec.delivered == [(0, first), (0, first)]


def test_ordered_one_at_a_time_per_key_others_in_parallel() -> None:
    ledger, rec = make(prefetch=3, dispatcher=LeastBusyDispatcher())
    ledger.key_of = key_function("s/{device}/#")
    ledger.connected()
    for slot in (0, 1):
        ledger.worker_up(slot, 1, ready=True)
    ledger.arrived([msg(1, topic="s/a/t"), msg(2, topic="s/a/h"), msg(3, topic="s/b/t"), msg(4, topic="s/a/t")], None)
    sent = {ledger.deliveries[i].mid: (slot, i) for slot, i in rec.delivered}
    assert sorted(sent) == [1, 3]  # key s/a/# has one out; s/b/# runs beside it
    assert ledger.waiting == 2 and len(ledger.pending) == 0  # waiting messages take no prefetch slot
    slot, first = sent[1]
    assert ledger.gone(slot, 1, first) == 1  # dies on message 1: it goes out again before 2
    ledger.worker_up(slot, 2, ready=True)
    assert [ledger.deliveries[i].mid for _, i in rec.delivered[2:]] == [1]
    ledger.done(rec.delivered[-1][1], failed=False)
    assert [ledger.deliveries[i].mid for _, i in rec.delivered[3:]] == [2]
    assert ledger.room() == ledger.read_ahead  # message 4 waits, within its own allowance
    assert ledger.stop() == 1 and not ledger.keys


def test_ordered_key_moves_on_when_its_dead_letter_settles() -> None:
    ledger, rec = make(max_attempts=1)
    ledger.key_of = key_function("topic")
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1), msg(2)], None)
    ledger.done(rec.delivered[0][1], failed=True)
    assert len(rec.dead_letters) == 1 and len(rec.delivered) == 1  # message 2 waits for the settle
    ledger.settle(rec.dead_letters[0][0])
    assert len(rec.delivered) == 2 and rec.acks == [(1, 1)]


def test_ordered_a_held_head_forgotten_on_disconnect_frees_its_key() -> None:
    """Found by the merged state machine: a held QoS 1 head forgotten with the connection let its
    key's next message into ``pending`` but left it there while the worker sat idle."""
    ledger, rec = make(prefetch=1, workers=1, retry=RetrySchedule(1.0, 2.0, 3.0))
    ledger.key_of = key_function("topic")
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1, qos=1), msg(2, qos=0)], None)
    ((_, first),) = rec.delivered
    ledger.done(first, failed=False, now=0.0, retry_after=2.0)  # held: its key waits for it
    assert len(rec.delivered) == 1 and ledger.waiting == 1
    ledger.offline(lost=True)  # the broker sends message 1 again; message 2 (QoS 0) goes out now
    assert [ledger.deliveries[i].mid for _, i in rec.delivered[1:]] == [2]
    assert not ledger.held and not ledger.pending and ledger.waiting == 0


def test_ordered_arrivals_after_the_stop_are_not_taken() -> None:
    ledger, rec = make()
    ledger.key_of = key_function("topic")
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    assert ledger.stop() == 0
    ledger.arrived([msg(1, qos=1), msg(2, qos=2)], None)  # QoS 1 stays at the broker; QoS 2 completes
    assert not ledger.pending and not ledger.keys and rec.delivered == [] and rec.acks == [(2, 2)]


@pytest.mark.parametrize("retry_after", [0.0, 2.0])
def test_a_retry_asked_after_the_stop_is_forgotten(retry_after: float) -> None:
    """Found by the state machine: during the stop, a handler's ``Retry`` put its message back in
    ``pending`` (or ``held``); in ordered mode the lost connection then looked up its key, which the
    stop had cleared, and the agent died with a KeyError. After the stop nothing goes out again."""
    ledger, rec = make()
    ledger.key_of = key_function("topic")
    ledger.connected()
    ledger.worker_up(0, 1, ready=True)
    ledger.arrived([msg(1, qos=1)], None)
    ((_, first),) = rec.delivered
    ledger.stop()
    ledger.done(first, failed=False, now=0.0, retry_after=retry_after)  # stays at the broker
    ledger.offline(lost=True)
    assert not ledger.pending and not ledger.held and not ledger.keys and rec.acks == []


# --- ordered mode after an agent restart -------------------------------------------------------


def restarted(ordered: bool = True) -> tuple[DeliveryLedger, Recorder]:
    """A new agent's ledger: two inherited workers (slots 0, 1), not heard from yet."""
    ledger, rec = make(prefetch=2)
    ledger.key_of = ledger.carry.key_of = key_function("topic") if ordered else None
    ledger.connected()
    for slot in (0, 1):
        ledger.worker_up(slot, 1, ready=True, inherited=True)
    return ledger, rec


def mids(ledger: DeliveryLedger, rec: Recorder, since: int = 0) -> list[int]:
    return [ledger.deliveries[i].mid for _, i in rec.delivered[since:] if i in ledger.deliveries]


def test_restart_waits_for_every_worker_then_for_the_keys_they_still_run() -> None:
    """Worker 0 still runs old delivery 900 of key a: a's redelivered copy (1) and next message (2)
    wait for its Done; key b goes out once both workers have answered."""
    ledger, rec = restarted()
    ledger.arrived([msg(1, topic="a"), msg(2, topic="a"), msg(3, topic="b")], None)
    assert rec.delivered == []  # any key may be busy in a worker not heard from
    ledger.holding(0, 1, [(900, "a")])
    assert rec.delivered == [] and ledger.waiting == 2 and [d.mid for d in ledger.pending] == [3]
    ledger.holding(1, 1, [])
    assert mids(ledger, rec) == [3]
    ledger.holding(1, 1, [(901, "b")])  # a second answer is not awaited: ignored
    assert ledger.done(900, failed=True) == -1  # the old delivery's outcome is the old agent's business
    assert mids(ledger, rec, 1) == [1]
    assert ledger.done(900, failed=False) == -1 and mids(ledger, rec, 1) == [1]  # once only
    ledger.done(rec.delivered[1][1], failed=False)
    assert mids(ledger, rec, 2) == [2] and not ledger.waiting


def test_restart_a_key_run_twice_in_old_workers_waits_for_both() -> None:
    """Two old deliveries of one key (never from a correct agent before, but counted all the same)."""
    ledger, rec = restarted()
    ledger.holding(0, 1, [(900, "a")])
    ledger.holding(1, 1, [(901, "a")])
    ledger.arrived([msg(1, topic="a")], None)
    ledger.done(900, failed=False)
    assert rec.delivered == [] and ledger.waiting == 1
    ledger.done(901, failed=False)
    assert mids(ledger, rec) == [1]


@pytest.mark.parametrize("answered", [False, True])
def test_restart_a_worker_gone_frees_what_it_held(answered: bool) -> None:
    ledger, rec = restarted()
    ledger.holding(1, 1, [])
    if answered:
        ledger.holding(0, 1, [(900, "a")])
    ledger.arrived([msg(1, topic="a")], None)
    assert rec.delivered == []
    assert ledger.gone(0, 1, 0) == 0  # it answers no more; its old delivery is over
    assert [slot for slot, _ in rec.delivered] == [1] and ledger.done(900, failed=False) == -1


def test_restart_answers_stale_or_after_the_stop_change_nothing() -> None:
    ledger, _ = restarted()
    ledger.holding(0, 0, [(900, "a")])  # an older generation in slot 0
    assert ledger.awaited == {0, 1}
    ledger.stop()
    ledger.holding(0, 1, [(900, "a")])
    assert not ledger.awaited and not ledger.keys and ledger.done(900, failed=False) == -1


def test_restart_other_modes_wait_for_nothing() -> None:
    ledger, rec = restarted(ordered=False)
    ledger.arrived([msg(1, topic="a")], None)
    ledger.holding(0, 1, [(900, "a")])
    assert mids(ledger, rec) == [1] and not ledger.awaited and not ledger.keys
