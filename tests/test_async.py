"""Async handlers: [workers] concurrency, the event-loop worker, awaitable publishes, graceful stops.

The middle part runs the real worker loop (``worker.serve``) in a forked process and plays the
agent on its channels, which pins down the per-message completions without a broker; the last
part runs ``procmqtt run`` against Mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import (
    Procmqtt,
    Subscriber,
    publish_all,
    publisher,
    records,
    wait_until,
    write_config,
)

from procmqtt import Message, Outcome, Worker, route
from procmqtt.config import Config, from_mapping
from procmqtt.errors import ConfigError
from procmqtt.ipc import channel
from procmqtt.ipc.shared import SharedState
from procmqtt.testing import WorkerHarness
from procmqtt.worker.base import uses_asyncio
from procmqtt.worker.main import serve

# --- configuration -----------------------------------------------------------------------------


@pytest.mark.unit
def test_concurrency_defaults_to_1_and_keeps_prefetch():
    cfg = from_mapping({})
    assert cfg.workers.concurrency == 1 and cfg.workers.prefetch == 16


@pytest.mark.parametrize("value", [0, 1001, -1, "4", True, 2.5])
@pytest.mark.unit
def test_concurrency_is_checked(value):
    with pytest.raises(ConfigError) as info:
        from_mapping({"workers": {"concurrency": value}}, "p.toml")
    assert str(info.value) == f"p.toml: [workers] concurrency: expected an integer from 1 to 1000, got {value!r}"


@pytest.mark.unit
def test_prefetch_follows_concurrency_unless_set():
    assert from_mapping({"workers": {"concurrency": 100}}).workers.prefetch == 100
    assert from_mapping({"workers": {"concurrency": 8}}).workers.prefetch == 16
    assert from_mapping({"workers": {"concurrency": 8, "prefetch": 8}}).workers.prefetch == 8
    with pytest.raises(ConfigError, match=r"p.toml: \[workers\] prefetch \(4\) must be at least concurrency \(8\)"):
        from_mapping({"workers": {"concurrency": 8, "prefetch": 4}}, "p.toml")


# --- which apps run an event loop ----------------------------------------------------------------


class SyncApp(Worker):
    def on_message(self, message: Message) -> None: ...


class AsyncRoute(Worker):
    @route("a")
    async def a(self, message: Message) -> None: ...


class AsyncStart(SyncApp):
    async def on_start(self) -> None: ...


@pytest.mark.unit
def test_async_apps_are_recognised():
    assert not uses_asyncio(SyncApp)
    assert uses_asyncio(AsyncRoute) and uses_asyncio(AsyncStart)


@pytest.mark.unit
def test_a_coroutine_reaching_the_sync_path_fails_loudly(caplog):
    class Sneaky(Worker):
        def on_message(self, message: Message) -> object:
            return asyncio.sleep(0)  # not declared async: the worker runs no event loop

    with WorkerHarness(Sneaky) as h:
        assert h.deliver("x") is Outcome.FAILED
    assert "returned a coroutine, but this worker runs no event loop" in caplog.text


# --- the event-loop worker, with this test playing the agent ---------------------------------------


class Sleepy(Worker):
    """Awaits the seconds in the payload; on 'pub/...' publishes, awaits the confirmation and
    publishes what it got."""

    @route("sleep/{n}")
    async def sleep(self, message: Message, n: str) -> None:
        await asyncio.sleep(float(message.payload))

    @route("pub/x")
    async def pub(self, message: Message) -> None:
        ok = await self.publish("first", b"1", qos=1)
        timed_out = await self.publish("second", b"2", qos=1).wait_async(timeout=0.2)
        self.publish("result", f"{ok} {timed_out}")

    @route("boom")
    async def boom(self, message: Message) -> None:
        raise RuntimeError("boom")


class FakeAgent:
    """The agent's ends of a forked worker's channels."""

    def __init__(self, app: type[Worker], config: Config) -> None:
        self.shared = SharedState(4)
        self.down, worker_in = channel.pair()
        self.up, worker_up = channel.pair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker process
            code = 1
            try:
                logging.getLogger().handlers.clear()
                code = serve(app, 0, 7, config, worker_in, worker_up, self.shared)
            finally:
                os._exit(code)
        self.pid = pid
        worker_in.close()
        worker_up.close()
        self.received: list[channel.Record] = []
        assert isinstance(self.next(), channel.Ready)

    def send(self, *records: channel.Record) -> None:
        for record in records:
            channel.send(self.down, record)

    def next(self, timeout: float = 5.0) -> channel.Record:
        deadline = time.monotonic() + timeout
        while not self.received:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self.up], [], [], max(0.0, remaining))
            if not readable:
                raise AssertionError("the worker sent nothing in time")
            got = channel.receive(self.up)
            assert got is not None, "the worker closed its channel"
            self.received += got
        return self.received.pop(0)

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("the worker did not exit")

    def stop(self) -> int:
        """The agent's graceful stop record; the worker's exit code."""
        self.send(channel.Stop())
        return self.wait()

    def close(self) -> None:
        self.down.close()
        self.up.close()


@pytest.fixture
def forked():
    """``forked(concurrency)``: the Sleepy app in a worker process, with this test as its agent."""
    started: list[FakeAgent] = []

    def start(concurrency: int) -> FakeAgent:
        started.append(FakeAgent(Sleepy, from_mapping({"workers": {"concurrency": concurrency}})))
        return started[-1]

    yield start
    for agent in started:
        try:
            os.kill(agent.pid, signal.SIGKILL)
            os.waitpid(agent.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        agent.close()


def _deliver(delivery_id: int, topic: str, payload: bytes = b"") -> channel.Deliver:
    return channel.Deliver(delivery_id, topic, payload, 1, False, False)


@pytest.mark.timeout(20)
def test_messages_overlap_and_each_completes_on_its_own(forked):
    agent = forked(4)
    began = time.monotonic()
    # 1 takes longest; the others finish first and are reported at once, not held behind it.
    agent.send(_deliver(1, "sleep/1", b"0.9"), *(_deliver(i, f"sleep/{i}", b"0.2") for i in range(2, 9)))
    done = [agent.next() for _ in range(8)]
    elapsed = time.monotonic() - began
    assert all(isinstance(d, channel.Done) and d.outcome is Outcome.OK for d in done)
    assert sorted(d.delivery_id for d in done) == list(range(1, 9))
    assert done[-1].delivery_id == 1 and 0.85 < done[-1].seconds < 1.3
    assert elapsed < 0.9 + 0.4, f"8 messages with concurrency 4 took {elapsed:.2f}s"  # serial: 2.3s
    assert agent.stop() == 0


@pytest.mark.timeout(20)
def test_never_more_than_concurrency_in_flight(forked):
    agent = forked(2)
    began = time.monotonic()
    agent.send(*(_deliver(i, f"sleep/{i}", b"0.2") for i in range(1, 7)))
    done = [agent.next() for _ in range(6)]
    elapsed = time.monotonic() - began
    assert sorted(d.delivery_id for d in done) == list(range(1, 7))
    assert elapsed >= 3 * 0.2 - 0.02, f"6 x 0.2s with concurrency 2 took only {elapsed:.2f}s"
    assert agent.stop() == 0


@pytest.mark.timeout(20)
def test_the_hang_check_watches_the_oldest_message_in_flight(forked):
    agent = forked(4)
    agent.send(_deliver(11, "sleep/a", b"0.8"))
    wait_until(lambda: agent.shared.current(0, 7) == 11, 5, "the first message in progress")
    started = agent.shared.busy_since(0)
    agent.send(_deliver(12, "sleep/b", b"0.1"), _deliver(13, "sleep/c", b"1.2"))
    assert agent.next().delivery_id == 12  # type: ignore[union-attr]
    assert agent.shared.current(0, 7) == 11 and agent.shared.busy_since(0) == started
    assert agent.next().delivery_id == 11  # type: ignore[union-attr]
    wait_until(lambda: agent.shared.current(0, 7) == 13, 2, "the next oldest becomes current")
    assert agent.shared.busy_since(0) > started
    assert agent.next().delivery_id == 13  # type: ignore[union-attr]
    wait_until(lambda: agent.shared.busy_since(0) == 0 and agent.shared.current(0, 7) == 0, 2, "idle")
    assert agent.shared.finished(0) == 3
    assert agent.stop() == 0


@pytest.mark.timeout(20)
def test_awaited_publishes_resolve_from_the_agents_replies(forked):
    agent = forked(2)
    agent.send(_deliver(1, "pub/x"), _deliver(2, "boom"))
    publish = agent.next()  # tasks start in order: 1 publishes and waits, meanwhile 2 fails
    assert isinstance(publish, channel.Publish) and publish.topic == "first"
    failed = agent.next()
    assert isinstance(failed, channel.Done) and failed.delivery_id == 2 and failed.outcome is Outcome.FAILED
    agent.send(channel.Published(publish.request_id, 0))
    second = agent.next()
    assert isinstance(second, channel.Publish) and second.topic == "second"  # never confirmed: times out
    result = agent.next()
    assert isinstance(result, channel.Publish) and (result.topic, result.payload) == ("result", b"True False")
    done = agent.next()
    assert isinstance(done, channel.Done) and done.delivery_id == 1 and done.outcome is Outcome.OK
    assert agent.stop() == 0


@pytest.mark.timeout(20)
def test_sigterm_finishes_the_messages_in_flight_and_starts_no_more(forked):
    agent = forked(2)
    agent.send(*(_deliver(i, f"sleep/{i}", b"0.4") for i in range(1, 5)))
    wait_until(lambda: agent.shared.busy_since(0), 5, "work in progress")
    os.kill(agent.pid, signal.SIGTERM)
    assert agent.wait() == 0
    done = []
    while True:
        try:
            done.append(agent.next(timeout=0.2))
        except AssertionError:
            break
    assert sorted(d.delivery_id for d in done) == [1, 2]  # type: ignore[union-attr]


@pytest.mark.timeout(20)
def test_stop_record_comes_after_everything_received(forked):
    agent = forked(3)
    agent.send(*(_deliver(i, f"sleep/{i}", b"0.1") for i in range(1, 8)), channel.Stop())
    assert agent.wait() == 0
    done = [agent.next(timeout=1) for _ in range(7)]
    assert sorted(d.delivery_id for d in done) == list(range(1, 8))  # type: ignore[union-attr]


# --- end to end ----------------------------------------------------------------------------------


def _run(
    tmp_path: Path,
    broker,
    runs,
    app: str,
    topics: dict[str, int],
    workers_toml: str = "",
    delay: float = 0.0,
    args: tuple[str, ...] = (),
) -> tuple[Procmqtt, Path]:
    record_dir = tmp_path / "records"
    record_dir.mkdir(exist_ok=True)
    cfg = write_config(
        tmp_path / "async.toml",
        broker,
        topics=topics,
        workers=1,
        app={"record_dir": str(record_dir), "delay": delay},
        workers_toml=workers_toml,
    )
    run = Procmqtt(tmp_path, f"tests/apps_routes.py:{app}", cfg, *args)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker 0")
    return run, record_dir


@pytest.mark.timeout(60)
def test_async_handlers_overlap_under_procmqtt(tmp_path, broker, runs):
    run, rec = _run(tmp_path, broker, runs, "AsyncSleeper", {}, "concurrency = 4", delay=0.2)
    publish_all(publisher(broker), [(f"work/{i}", str(i).encode()) for i in range(20)])
    wait_until(lambda: len(records(rec)) >= 20, 20, "20 messages done")
    done = records(rec)
    received = records(rec, "received")
    counts = Counter(bytes.fromhex(r["payload"]).decode() for r in done)
    assert counts == Counter(str(i) for i in range(20)), "each message done exactly once"
    elapsed = done[-1]["time"] - received[0]["time"]
    print(f"20 x 0.2s with concurrency 4 on one worker: {elapsed:.2f}s (serial: 4.0s)")
    assert elapsed < 2.0, f"took {elapsed:.2f}s: the handlers did not overlap"
    # never more than 4 at once: at each start, count the messages started and not yet done
    events = sorted([(r["time"], 1) for r in received] + [(r["time"], -1) for r in done])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert 2 <= peak <= 4, peak
    assert run.stop() == 0
    assert "20 received, 20 processed (0 unrouted), 0 failed" in run.log()


@pytest.mark.timeout(60)
def test_await_publish_from_an_async_handler(tmp_path, broker, runs):
    run, rec = _run(tmp_path, broker, runs, "AsyncEcho", {"echo/#": 1}, "concurrency = 3")
    sub = Subscriber(broker, "echoed/#")
    publish_all(publisher(broker), [(f"echo/{i}", f"hello {i}".encode()) for i in range(6)])
    wait_until(lambda: len(sub.payloads()) >= 6, 20, "6 echoes")
    assert sorted((m.topic, m.payload) for m in sub.messages) == [
        (f"echoed/{i}", f"hello {i}".encode()) for i in range(6)
    ]
    wait_until(lambda: len(records(rec)) >= 6, 10, "6 records")
    assert all(r["confirmed"] is True for r in records(rec))
    sub.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_graceful_stop_lets_async_messages_in_flight_finish(tmp_path, broker, runs):
    run, rec = _run(tmp_path, broker, runs, "AsyncSleeper", {}, "concurrency = 4", delay=1.0)
    publish_all(publisher(broker), [(f"work/{i}", str(i).encode()) for i in range(4)])
    wait_until(lambda: len(records(rec, "received")) >= 4, 10, "4 messages in flight")
    assert not records(rec)
    assert run.stop() == 0
    assert len(records(rec)) == 4, "every message in flight finished before the exit"
