"""Middleware (procmqtt.Middleware): order, outcomes, exceptions, publishes, load-time checks; run
through WorkerHarness, whose deliveries take the production code path (worker.handling.Runner)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest

from procmqtt import Message, Middleware, Outcome, Outgoing, PublishHandle, Retry, SlowLog, Worker, route
from procmqtt import config as config_mod
from procmqtt.cli import check
from procmqtt.errors import ConfigError, HandlerError
from procmqtt.message import Properties
from procmqtt.testing import WorkerHarness
from procmqtt.worker.middleware import AsyncMessageNext, MessageNext, PublishNext, configured
from procmqtt.worker.routes import routes_of

pytestmark = [pytest.mark.timeout(10), pytest.mark.unit]


class Trail(Middleware):
    """Records its way in and out on a list shared by the test."""

    def __init__(self, name: str, trail: list[str], *, outcome: Outcome | None = None) -> None:
        self.name, self.trail, self.outcome = name, trail, outcome

    def on_start(self, worker: Worker) -> None:
        self.trail.append(f"{self.name} start {worker.worker_id}")

    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        self.trail.append(f"{self.name} in")
        try:
            got = call_next(message)
        except Exception as exc:
            self.trail.append(f"{self.name} saw {type(exc).__name__}")
            raise
        self.trail.append(f"{self.name} out {got.name}")
        return self.outcome if self.outcome is not None else got

    async def on_message_async(self, message: Message, call_next: AsyncMessageNext) -> Outcome:
        self.trail.append(f"{self.name} in")
        got = await call_next(message)
        self.trail.append(f"{self.name} out {got.name}")
        return got

    def on_publish(self, publish: Outgoing, call_next: PublishNext) -> PublishHandle:
        self.trail.append(f"{self.name} publish {publish.topic}")
        return call_next(dataclasses.replace(publish, topic=publish.topic + "/" + self.name))


TRAIL: list[str] = []


class Sensors(Worker):
    middleware = (Trail("a", TRAIL), Trail("b", TRAIL))

    @route("sensors/{device}")
    def reading(self, message: Message, device: str) -> None:
        TRAIL.append(f"handler {device}")
        if message.payload == b"boom":
            raise ValueError("boom")
        if message.payload == b"retry":
            raise Retry(after=2)
        self.publish(f"seen/{device}", message.payload)


@pytest.fixture(autouse=True)
def _clear_trail() -> None:
    TRAIL.clear()


def test_first_listed_is_outermost_and_sees_every_layer():
    with WorkerHarness(Sensors, worker_id=3) as h:
        assert TRAIL == ["a start 3", "b start 3"]
        TRAIL.clear()
        assert h.deliver("sensors/d1", b"21") is Outcome.OK
        assert TRAIL == [
            "a in",
            "b in",
            "handler d1",
            "a publish seen/d1",
            "b publish seen/d1/a",
            "b out OK",
            "a out OK",
        ]
        assert h.published == [("seen/d1/a/b", b"21", 0, False)]  # each layer's change reaches the next
        assert h.deliver("elsewhere") is Outcome.UNROUTED  # the routing's outcome passes through too


def test_an_exception_passes_through_middleware_and_counts_as_the_handlers():
    with WorkerHarness(Sensors, raise_exceptions=False) as h:
        TRAIL.clear()
        assert h.deliver("sensors/d1", b"boom") is Outcome.FAILED
        assert TRAIL == ["a in", "b in", "handler d1", "b saw ValueError", "a saw ValueError"]
        assert h.deliver("sensors/d1", b"retry") is Outcome.RETRY and h.retry is not None and h.retry.after == 2
    with WorkerHarness(Sensors) as h, pytest.raises(ValueError, match="boom"):
        h.deliver("sensors/d1", b"boom")  # the harness's default re-raises, as without middleware


class Raising(Middleware):
    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        if message.payload == b"deny":
            raise PermissionError("denied by middleware")
        if message.payload == b"later":
            raise Retry()
        return call_next(message)


class Swallowing(Middleware):
    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        try:
            return call_next(message)
        except ValueError:
            return Outcome.UNROUTED


class Guarded(Worker):
    middleware = (Swallowing(), Raising())

    def on_message(self, message: Message) -> None:
        if message.payload == b"bad":
            raise ValueError("bad")


def test_a_middlewares_exception_is_handled_like_a_handlers(caplog: pytest.LogCaptureFixture):
    with WorkerHarness(Guarded, raise_exceptions=False) as h, caplog.at_level(logging.ERROR):
        assert h.deliver("t", b"deny") is Outcome.FAILED
        assert "on_message failed for topic 't'" in caplog.text and "denied by middleware" in caplog.text
        assert h.deliver("t", b"later") is Outcome.RETRY and h.retry is not None and h.retry.after is None
        assert h.deliver("t", b"bad") is Outcome.UNROUTED  # swallowed, and its own outcome returned
        assert h.deliver("t", b"fine") is Outcome.OK


class AsyncSensors(Worker):
    middleware = (Trail("a", TRAIL), Trail("b", TRAIL))

    async def on_message(self, message: Message) -> None:
        await asyncio.sleep(0)
        TRAIL.append("handler")


def test_async_apps_run_on_message_async_in_the_same_order():
    with WorkerHarness(AsyncSensors) as h:
        TRAIL.clear()
        assert h.deliver("t", b"x") is Outcome.OK
    assert TRAIL == ["a in", "b in", "handler", "b out OK", "a out OK"]


def test_async_harness_runs_middleware_on_the_tests_loop():
    async def scenario() -> Outcome:
        async with WorkerHarness(AsyncSensors) as h:
            TRAIL.clear()
            return await h.deliver_async("t", b"x")

    assert asyncio.run(scenario()) is Outcome.OK
    assert TRAIL == ["a in", "b in", "handler", "b out OK", "a out OK"]


class SyncOnly(Middleware):
    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        return call_next(message)


class AsyncOnly(Middleware):
    async def on_message_async(self, message: Message, call_next: AsyncMessageNext) -> Outcome:
        return await call_next(message)


def _app(middleware: Any, *, is_async: bool = False) -> type[Worker]:
    if is_async:

        class AsyncApp(Worker):
            async def on_message(self, message: Message) -> None:
                pass

        AsyncApp.middleware = middleware
        return AsyncApp

    class App(Worker):
        def on_message(self, message: Message) -> None:
            pass

    App.middleware = middleware
    return App


@pytest.mark.parametrize(
    ("middleware", "is_async", "expected"),
    [
        (
            [SyncOnly()],
            True,
            r"App.middleware\[0\]: SyncOnly overrides only on_message, but .*AsyncApp has async",
        ),
        (
            [AsyncOnly()],
            False,
            r"App.middleware\[0\]: AsyncOnly overrides only on_message_async, but .*App is a sync",
        ),
        ([SlowLog(), SyncOnly], False, r"App.middleware\[1\]: expected a procmqtt.Middleware instance.*an instance"),
        (SyncOnly(), False, r"App.middleware: expected a list of procmqtt.Middleware instances"),
        (["pkg:Class"], False, r"App.middleware\[0\]: expected a procmqtt.Middleware instance, got 'pkg:Class'"),
    ],
)
def test_a_middleware_that_cannot_run_is_refused_at_load(middleware: Any, is_async: bool, expected: str):
    with pytest.raises(HandlerError, match=expected) as caught:
        WorkerHarness(_app(middleware, is_async=is_async))
    assert caught.value.exit_code == 2


def test_an_async_on_publish_is_refused_at_load():
    class Bad(Middleware):
        async def on_publish(self, publish: Outgoing, call_next: PublishNext) -> PublishHandle:  # type: ignore[override]
            return call_next(publish)

    with pytest.raises(HandlerError, match=r"Bad.on_publish must be a plain def"):
        WorkerHarness(_app([Bad()]))


class Stamping(Middleware):
    """What a tracing middleware does: a user property on every publish, requests included."""

    def on_publish(self, publish: Outgoing, call_next: PublishNext) -> PublishHandle:
        had = publish.properties or Properties()
        props = had.merged(user_properties=(*had.user_properties, ("trace", "t1")))
        return call_next(dataclasses.replace(publish, properties=props))


class Requester(Worker):
    middleware = (Stamping(),)

    def on_message(self, message: Message) -> None:
        if message.topic == "ask":
            answer = self.request("service/time", b"now?", timeout=1)
            self.publish("answers", answer.payload)
        elif message.topic == "answer-me":
            self.reply(message, b"pong")
        elif message.topic == "bad":
            self.publish("a/+/wildcard", b"")


def test_on_publish_sees_publishes_replies_and_requests():
    with WorkerHarness(Requester, config={"mqtt": {"protocol": "5"}}, raise_exceptions=False) as h:
        h.respond("service/#", lambda request: b"12:00")
        assert h.deliver("ask") is Outcome.OK
        asked, answered = h.published_messages
        assert asked.topic == "service/time" and asked.properties is not None
        assert asked.properties.user_property("trace") == "t1" and asked.properties.correlation_data
        assert answered.payload == b"12:00" and answered.properties is not None
        assert answered.properties.user_property("trace") == "t1"
        assert h.deliver("answer-me", properties=Properties(response_topic="back", correlation_data=b"c")) is Outcome.OK
        reply = h.published_messages[-1]
        assert reply.topic == "back" and reply.properties is not None
        assert reply.properties.user_property("trace") == "t1" and reply.properties.correlation_data == b"c"
        assert h.deliver("bad") is Outcome.FAILED  # checked after the middleware, still in the handler


def test_without_middleware_nothing_is_wrapped():
    class Plain(Worker):
        def on_message(self, message: Message) -> None:
            pass

    with WorkerHarness(Plain) as h:
        assert h.runner._chain is None and h.runner._async_chain is None and h.worker._publishing is None


def test_slow_log_names_slow_messages_only(caplog: pytest.LogCaptureFixture):
    class Slow(Worker):
        middleware = (SlowLog(0.0),)

        def on_message(self, message: Message) -> None:
            pass

    class Quick(Worker):
        middleware = (SlowLog(60),)

        def on_message(self, message: Message) -> None:
            pass

    with caplog.at_level(logging.WARNING, logger="procmqtt.middleware.slow"):
        with WorkerHarness(Quick) as h:
            h.deliver("quick/topic")
        assert caplog.text == ""
        with WorkerHarness(Slow) as h:
            h.deliver("slow/topic")
        assert "slow message on 'slow/topic'" in caplog.text and "OK" in caplog.text
    with pytest.raises(ValueError, match="SlowLog"):
        SlowLog(-1)


# --- [workers] middleware: by configuration, outermost ----------------------------------------------


class Outer(Middleware):
    """Made by name from [workers] middleware (no arguments)."""

    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        TRAIL.append("outer in")
        return call_next(message)

    def on_publish(self, publish: Outgoing, call_next: PublishNext) -> PublishHandle:
        return call_next(dataclasses.replace(publish, topic=publish.topic + "/outer"))


class NeedsArguments(Middleware):
    def __init__(self, level: int) -> None:
        self.level = level


def test_configured_middleware_wrap_the_classes_own():
    config = {"workers": {"middleware": ["test_middleware:Outer"]}}
    with WorkerHarness(Sensors, config=config) as h:
        assert h.config.workers.middleware == ("test_middleware:Outer",)
        TRAIL.clear()
        assert h.deliver("sensors/d1", b"1") is Outcome.OK
        assert TRAIL[:3] == ["outer in", "a in", "b in"]
        assert h.published == [("seen/d1/outer/a/b", b"1", 0, False)]
    head = check.render_check("app:Sensors", Sensors, h.config, routes_of(Sensors)).split("\n\n")[0]
    assert head.splitlines()[-1] == "middleware: test_middleware:Outer, Trail, Trail"


def test_configured_middleware_from_the_environment_are_comma_separated():
    loaded = config_mod.resolve(
        None, environ={"PROCMQTT_WORKERS_MIDDLEWARE": "test_middleware:Outer, procmqtt:SlowLog"}
    )
    assert loaded.workers.middleware == ("test_middleware:Outer", "procmqtt:SlowLog")
    assert [type(m).__name__ for m in configured(loaded)] == ["Outer", "SlowLog"]


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (["no_such_module:Thing"], r"'no_such_module:Thing': cannot import it \(ModuleNotFoundError: No module named"),
        (["test_middleware:Nothing"], r"'test_middleware:Nothing': cannot import it \(AttributeError"),
        (["test_middleware:Sensors"], "'test_middleware:Sensors': not a procmqtt.Middleware subclass"),
        (["test_middleware:NeedsArguments"], "NeedsArguments\\(\\) raised TypeError"),
        (["test_middleware:SyncOnly"], "SyncOnly overrides only on_message, but .*AsyncSensors has async handlers"),
        ("not a list", 'expected a list of "package.module:Class" names'),
        (["no-colon"], 'expected a list of "package.module:Class" names'),
    ],
)
def test_configured_middleware_that_cannot_run_is_refused_at_load(names: Any, problem: str):
    with pytest.raises(ConfigError, match=problem) as caught:
        WorkerHarness(AsyncSensors, config={"workers": {"middleware": names}})
    assert caught.value.exit_code == 2 and "[workers] middleware" in str(caught.value)
    assert "\n" not in str(caught.value)
