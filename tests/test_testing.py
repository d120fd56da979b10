"""procmqtt.testing.WorkerHarness: an app in process, with the production code path for messages."""

from __future__ import annotations

import asyncio
import logging

import pytest

from procmqtt import Message, Outcome, Retry, Worker, route
from procmqtt.config import Config
from procmqtt.errors import ConfigError, RouteError
from procmqtt.testing import WorkerHarness

pytestmark = [pytest.mark.timeout(10), pytest.mark.unit]  # unit: pure logic, no broker, no process


class Alerts(Worker):
    """The testing guide's kind of app (docs/guide/testing.md): routes, config, publish and subscribe."""

    def on_start(self) -> None:
        self.limit = float(self.config.app.get("alert_above", 30.0))
        self.events = ["start"]

    @route("sensors/{device}/temperature", qos=1)
    def temperature(self, message: Message, device: str) -> None:
        celsius = message.json()["celsius"]
        if celsius > self.limit:
            handle = self.publish(f"alerts/{device}", {"device": device, "celsius": celsius}, qos=1)
            assert handle.wait(1)

    @route("control/{action}")
    def control(self, message: Message, action: str) -> None:
        if action == "follow":
            self.subscribe(message.text, qos=2)
        elif action == "unfollow":
            self.unsubscribe(message.text)
        elif action == "fail":
            raise ValueError(f"asked to fail: {message.text}")

    def on_stop(self) -> None:
        self.events.append("stop")


def test_deliver_publish_subscribe_and_lifecycle():
    with WorkerHarness(Alerts, config={"app": {"alert_above": 20}}) as h:
        worker = h.worker
        assert worker.events == ["start"] and worker.worker_id == 0
        assert h.deliver("sensors/d1/temperature", {"celsius": 21.5}) is Outcome.OK
        assert h.deliver("sensors/d2/temperature", b'{"celsius": 12}', qos=1) is Outcome.OK
        assert h.published == [("alerts/d1", b'{"device":"d1","celsius":21.5}', 1, False)]
        h.deliver("control/follow", "extra/#")
        h.deliver("control/unfollow", "extra/#")
        assert h.subscriptions == [("extra/#", 2)] and h.unsubscriptions == ["extra/#"]
        assert h.deliver("nowhere") is Outcome.UNROUTED
    assert worker.events == ["start", "stop"]
    assert [r.topic_filter for r in h.routes] == ["sensors/+/temperature", "control/+"]


def test_exceptions_are_reraised_by_default():
    with WorkerHarness(Alerts) as h, pytest.raises(ValueError, match="asked to fail: now"):
        h.deliver("control/fail", "now")


def test_exceptions_as_in_production_when_asked(caplog):
    with WorkerHarness(Alerts, raise_exceptions=False) as h:
        assert h.deliver("control/fail", "now") is Outcome.FAILED
        assert h.deliver("sensors/d1/temperature", {"celsius": 1}) is Outcome.OK  # it goes on
    failure = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert failure.getMessage() == "on_message failed for topic 'control/fail'" and failure.exc_info


def test_config_is_checked_like_the_file():
    with pytest.raises(
        ConfigError,
        match=r"WorkerHarness config: \[workers\] concurrency: expected an integer "
        r"from 1 to 1000, got 0",
    ):
        WorkerHarness(Alerts, config={"workers": {"concurrency": 0}})
    with WorkerHarness(Alerts, config=Config()) as h:
        assert h.worker.config.workers.concurrency == 1


def test_bad_routes_fail_at_construction():
    class Bad(Worker):
        @route("a/{x}")
        def handler(self, message: Message) -> None: ...

    with pytest.raises(RouteError, match=r"handler: @route\('a/\{x\}'\): the method must accept"):
        WorkerHarness(Bad)


def test_deliver_checks_its_arguments():
    with WorkerHarness(Alerts) as h:
        with pytest.raises(ValueError, match="must not contain wildcards"):
            h.deliver("sensors/+/temperature")
        with pytest.raises(ValueError, match="qos must be 0, 1 or 2"):
            h.deliver("a", qos=3)


def test_on_start_failure_propagates_and_on_stop_is_not_called():
    stopped = []

    class Broken(Alerts):
        def on_start(self) -> None:
            raise ConnectionError("database unreachable")

        def on_stop(self) -> None:
            stopped.append(True)  # pragma: no cover - must not run

    harness = WorkerHarness(Broken)
    with pytest.raises(ConnectionError), harness:
        pass  # pragma: no cover
    assert stopped == []


class AsyncApp(Worker):
    async def on_start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events = ["start"]

    @route("jobs/{name}")
    async def job(self, message: Message, name: str) -> None:
        await asyncio.sleep(0)
        assert asyncio.get_running_loop() is self.loop  # one loop for the worker's whole life
        ok = await self.publish(f"done/{name}", message.payload, qos=1)
        also = await self.publish("log", name).wait_async(timeout=1)
        self.events.append(f"{name}:{ok}:{also}")

    @route("sync/x")
    def sync_route(self, message: Message) -> None:
        self.events.append("sync")

    async def on_stop(self) -> None:
        await asyncio.sleep(0)
        self.events.append("stop")


def test_async_app_with_the_harness_loop():
    with WorkerHarness(AsyncApp) as h:
        worker = h.worker
        assert h.is_async
        assert h.deliver("jobs/a", b"1") is Outcome.OK
        assert h.deliver("sync/x") is Outcome.OK
        assert h.deliver("jobs") is Outcome.UNROUTED
        assert h.published == [("done/a", b"1", 1, False), ("log", b"a", 0, False)]
    assert worker.events == ["start", "a:True:True", "sync", "stop"]


def test_async_app_on_the_tests_own_loop():
    async def scenario() -> list[str]:
        async with WorkerHarness(AsyncApp) as h:
            assert h.worker.loop is asyncio.get_running_loop()
            assert await h.deliver_async("jobs/b") is Outcome.OK
            with pytest.raises(RuntimeError, match="takes deliver_async"):
                h.deliver("jobs/c")
            worker = h.worker
        return worker.events

    assert asyncio.run(scenario()) == ["start", "b:True:True", "stop"]


def test_async_exceptions_are_reraised_or_counted():
    class Failing(Worker):
        async def on_message(self, message: Message) -> None:
            await asyncio.sleep(0)
            raise KeyError(message.topic)

    with WorkerHarness(Failing) as h, pytest.raises(KeyError, match="t/1"):
        h.deliver("t/1")
    with WorkerHarness(Failing, raise_exceptions=False) as h:
        assert h.deliver("t/1") is Outcome.FAILED


def test_retry_is_an_outcome_with_its_delay_not_an_error():
    class Later(Worker):
        def on_message(self, message: Message) -> None:
            raise Retry(after=float(message.text)) if message.text else Retry()

    class AsyncLater(Worker):
        async def on_message(self, message: Message) -> None:
            raise Retry(after=2)

    with WorkerHarness(Later) as h:  # raise_exceptions: a Retry is a request, not re-raised
        assert h.deliver("t", "5") is Outcome.RETRY and h.retry is not None and h.retry.after == 5.0
        assert h.deliver("t", "") is Outcome.RETRY and h.retry is not None and h.retry.after is None
    with WorkerHarness(AsyncLater) as h:
        assert h.deliver("t") is Outcome.RETRY and h.retry is not None and h.retry.after == 2.0
    with pytest.raises(ValueError, match="expected a number of seconds from 0"):
        Retry(after=-1)


def test_background_tasks_are_cancelled_on_exit():
    cancelled = []

    class Background(Worker):
        async def on_start(self) -> None:
            self.task = asyncio.get_running_loop().create_task(self.forever())

        async def forever(self) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        async def on_message(self, message: Message) -> None: ...

    with WorkerHarness(Background) as h:
        h.deliver("x")
    assert cancelled == [True]


class ReadmeSensors(Worker):
    """docs/guide/routes.md's example, as written there (tests/test_docs.py imports the page's own)."""

    @route("sensors/{device}/temperature", qos=1)
    def temperature(self, message: Message, device: str) -> None:
        if message.json()["celsius"] > self.config.app.get("alert_above", 30):
            self.publish(f"alerts/{device}", message.payload, qos=1)

    @route("logs/#")
    def logs(self, message: Message) -> None: ...


def test_the_routes_guide_example():
    with WorkerHarness(ReadmeSensors, config={"app": {"alert_above": 30}}) as h:
        assert h.deliver("sensors/d1/temperature", {"celsius": 31.5}) is Outcome.OK
        assert h.published == [("alerts/d1", b'{"celsius":31.5}', 1, False)]
        assert h.deliver("nobody/listens") is Outcome.UNROUTED
