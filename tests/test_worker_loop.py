"""The serve loops' per-message bookkeeping, run in this process over socketpairs (issue 16).

What the shared memory says after a worker ran (the supervisor's hang check and crash-loop count,
the agent's charge for a dead worker's delivery) and the fast ``Message`` constructor."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

import pytest

from procmqtt import Message, Properties, Worker
from procmqtt.config.loader import from_mapping
from procmqtt.ipc import channel
from procmqtt.ipc.shared import SharedState
from procmqtt.message import Outcome, delivered
from procmqtt.worker.aio import AsyncLoop
from procmqtt.worker.loop import _Recycler
from procmqtt.worker.sync import SyncLoop

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]


class Noop(Worker):
    def on_message(self, message: Message) -> None:
        pass


class AsyncNoop(Worker):
    async def on_message(self, message: Message) -> None:
        pass


PEER: dict[str, socket.socket] = {}  # the agent's end of the running loop's upstream channel
TAKEN: list[int] = []  # Done ids a handler read off it


class AwaitsTheFirstDone(Worker):
    """Message 2 waits (awaiting, so the loop idles) until message 1's Done is on the channel."""

    async def on_message(self, message: Message) -> None:
        if message.topic != "t/2":
            return
        deadline = time.monotonic() + 5
        while 1 not in TAKEN and time.monotonic() < deadline:
            try:
                TAKEN.extend(r.delivery_id for r in channel.receive(PEER["up"]) or () if isinstance(r, channel.Done))
            except BlockingIOError:
                await asyncio.sleep(0.005)  # polling the condition, bounded by the deadline


def run_loop(
    kind: type[SyncLoop | AsyncLoop],
    app: type[Worker],
    shared: SharedState,
    generation: int,
    n: int,
    stop_when: Callable[[], bool] | None = None,
) -> int:
    """One worker's life over ``n`` queued deliveries and a Stop (topics ``t/<id>``); the number of
    datagrams its Dones came in. With
    ``stop_when``, the Stop goes once the worker is idle: when ``stop_when()`` holds or 0.5 s after
    the deliveries' Dones came back (the worker has long reached its wait by then)."""
    agent_end, inbound = channel.pair()
    upstream, agent_up = channel.pair()
    queue: deque[channel.Encoded] = deque(
        channel.encode_parts(channel.Deliver(i, f"t/{i}", b"p", 1, False, False)) for i in range(1, n + 1)
    )
    channel.send_many(agent_end, queue)
    if stop_when is None:
        channel.send(agent_end, channel.Stop())
        stopper = None
    else:

        def stop_once_idle() -> None:
            deadline = time.monotonic() + 0.5
            while not stop_when() and time.monotonic() < deadline:
                time.sleep(0.005)  # polling the condition, bounded by the deadline
            channel.send(agent_end, channel.Stop())

        stopper = threading.Thread(target=stop_once_idle)
        stopper.start()
    loop = kind(app, 0, generation, from_mapping({}, "test"), inbound, upstream, shared)
    PEER["up"] = agent_up
    agent_up.setblocking(False)
    TAKEN.clear()
    try:
        assert loop.run() == 0
    finally:
        loop.signals.close()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if stopper is not None:
            stopper.join()
    dones, datagrams = list(TAKEN), 0
    while True:
        try:
            records = channel.receive(agent_up) or []
        except BlockingIOError:
            break
        dones += [r.delivery_id for r in records if isinstance(r, channel.Done)]
        datagrams += any(isinstance(r, channel.Done) for r in records)
    for s in (agent_end, inbound, upstream, agent_up):
        s.close()
    assert dones == list(range(1, n + 1))
    return datagrams


def test_an_async_backlog_sends_its_dones_in_batches():
    """Quick messages one after another (concurrency 1): the Dones go out every prefetch // 2 and
    when the loop waits, as in the sync loop, not one datagram each (the loop used to flush on
    every pass, so 40 messages made 40 datagrams)."""
    assert run_loop(AsyncLoop, AsyncNoop, SharedState(1), 1, 40) <= 40 // 8 + 1


class _OwnLoop(asyncio.SelectorEventLoop):
    """An event loop an app's policy would give (uvloop): the worker keeps it, unhooked."""


@pytest.mark.parametrize("own_loop", [False, True])
def test_an_async_worker_sends_the_dones_it_has_before_it_waits(own_loop, monkeypatch):
    """A handler awaiting (the loop idles) does not hold back the Done of the message before it,
    on the default event loop (its selector flushes) and on another (the loop flushes each pass)."""
    if own_loop:
        monkeypatch.setattr(asyncio, "new_event_loop", _OwnLoop)
    run_loop(AsyncLoop, AwaitsTheFirstDone, SharedState(1), 1, 3)
    assert 1 in TAKEN


@pytest.mark.parametrize(("kind", "app"), [(SyncLoop, Noop), (AsyncLoop, AsyncNoop)])
def test_shared_words_after_a_run(kind, app):
    """Finished counts every message, nobody is busy, and the slot names this worker's generation."""
    shared = SharedState(2)
    run_loop(kind, app, shared, 3, 40)
    assert shared.finished(0) == 40
    assert shared.busy_since(0) == 0.0
    assert shared.current(0, 3) == 40  # the last stays current: the Stop came before the loop waited
    assert shared.finished(1) == 0 and shared.current(1, 0) == 0  # the next slot untouched


@pytest.mark.parametrize(("kind", "app"), [(SyncLoop, Noop), (AsyncLoop, AsyncNoop)])
def test_a_new_worker_leaves_its_predecessors_delivery_until_its_first_message(kind, app):
    """The agent reads what a dead worker was handling after its replacement may have booted: the
    replacement must not overwrite the slot's generation before it is given a message. (The async
    loop used to clear the slot on its first idle pass.)"""
    shared = SharedState(1)
    shared.set_current(0, 1, 77)  # generation 1 died handling delivery 77
    run_loop(kind, app, shared, 2, 0, stop_when=lambda: shared.current(0, 1) != 77)  # boots, idles, stops
    assert shared.current(0, 1) == 77


def test_delivered_is_the_message_its_fields_make():
    names = tuple(f.name for f in dataclasses.fields(Message))
    assert names == ("topic", "payload", "qos", "retain", "redelivered", "properties")  # delivered sets these
    props = Properties(user_properties=(("a", "b"),), content_type="x")
    for args in [("t/1", b"data", 1, True, False, None), ("t/2", b"", 0, False, True, props)]:
        fast, slow = delivered(*args), Message(*args)
        assert type(fast) is Message
        assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.topic = "other"  # type: ignore[misc]


class _Outbox:
    def __init__(self) -> None:
        self.sent: list[channel.Record] = []

    def send_later(self, done: channel.Done) -> None:
        self.sent.append(done)

    send = send_later


def test_the_hang_watch_follows_the_oldest_message_in_flight():
    """Several in flight (the async loop): the slot names the oldest, whichever finishes first."""
    shared = SharedState(1)
    loop = SyncLoop(Noop, 0, 4, from_mapping({}, "test"), *channel.pair(), shared)
    loop.link, loop.recycle = _Outbox(), _Recycler(loop.config)  # type: ignore[assignment]
    deliveries = [channel.Deliver(i, f"t/{i}", b"", 1, False, False) for i in (1, 2, 3)]
    for d in deliveries:
        loop.started(d)
    first, _, third = loop.running.values()
    assert (shared.current(0, 4), shared.busy_since(0)) == (1, first)
    loop.done(2, Outcome.OK)  # not the oldest: nothing moves
    assert (shared.current(0, 4), shared.busy_since(0)) == (1, first)
    loop.done(1, Outcome.OK)
    assert (shared.current(0, 4), shared.busy_since(0)) == (3, third)
    loop.done(3, Outcome.OK)
    assert (shared.current(0, 4), shared.busy_since(0), shared.finished(0)) == (3, 0.0, 3)
    assert [d.delivery_id for d in loop.link.sent] == [2, 1, 3]  # type: ignore[attr-defined]


def test_a_woken_worker_reads_one_datagram_before_it_runs_the_message(monkeypatch):
    """Issue 16, W4: a delivery that arrives while the worker waits is handed over after one
    ``recvmsg``, not after a second one that fails; what else came stays queued and is read, in
    order, before the worker waits again."""
    from procmqtt.worker import link as link_module

    agent_in, worker_in = channel.pair()
    agent_up, worker_up = channel.pair()
    worker_in.setblocking(False)
    link = link_module._AgentLink(0, 1, worker_in, worker_up, from_mapping({}, "test"))
    first, second = (channel.Deliver(i, "t", b"x", 1, False, False, None) for i in (1, 2))
    real_wait, real_receive = link_module.poller.wait, link_module.channel.receive
    arrivals = deque([[first, second], [channel.Stop()]])  # what arrives during each wait
    calls: list[str] = []

    def wait(*args, **kwargs):  # the agent sends while the worker is in ``poll``
        for record in arrivals.popleft() if arrivals else []:
            channel.send(agent_in, record)
        return real_wait(*args, **kwargs)

    def receive(sock):
        try:
            records = real_receive(sock)
        except BlockingIOError:
            calls.append("empty")
            raise
        calls.append("read")
        return records

    monkeypatch.setattr(link_module.poller, "wait", wait)
    monkeypatch.setattr(link_module.channel, "receive", receive)
    try:
        assert link.next(5) == first
        assert calls == ["empty", "read"]  # the read before the wait, then the one datagram
        assert link.next(5) == second  # read before waiting again, nothing lost or reordered
        assert isinstance(link.next(5), channel.Stop)
    finally:
        for sock in (agent_in, worker_in, agent_up, worker_up):
            sock.close()
