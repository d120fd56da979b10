"""The public API of a Worker: framework names out of the user's namespace, what a handler may
return, and publish errors by name. In process (WorkerHarness, the production code path) and, for
the first two, under ``procmqtt run`` against Mosquitto."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any, Optional

import pytest
from harness import (
    ROOT,
    Procmqtt,
    Subscriber,
    publish_all,
    publisher,
    wait_until,
    write_config,
)

from procmqtt import Message, Outcome, Worker, route
from procmqtt.testing import WorkerHarness

pytestmark = pytest.mark.timeout(10)


# --- a user method named like the framework's entry point -----------------------------------------


class OwnHandle(Worker):
    def handle(self, text: str) -> str:  # an ordinary helper, nothing to do with procmqtt
        return text.upper()

    def on_message(self, message: Message) -> None:
        self.publish("out", self.handle(message.text))


class OwnHandleAsync(Worker):
    def handle_async(self, text: str) -> str:
        return text[::-1]

    async def on_message(self, message: Message) -> None:
        await self.publish("out", self.handle_async(message.text))


@pytest.mark.parametrize("app, expected", [(OwnHandle, b"ABC"), (OwnHandleAsync, b"cba")])
def test_a_user_method_named_handle_is_just_a_method(app, expected):
    with WorkerHarness(app) as h:
        assert h.deliver("in", "abc") is Outcome.OK
        assert h.published == [("out", expected, 0, False)]


# --- what a handler returns ------------------------------------------------------------------------


class Returns(Worker):
    """Returns what the topic names."""

    def on_message(self, message):  # no annotation: checked when it returns
        return {
            "none": None,
            "ok": Outcome.OK,
            "failed": Outcome.FAILED,
            "unrouted": Outcome.UNROUTED,
            "true": True,
            "number": 42,
        }[message.topic]


class AsyncReturns(Worker):
    @route("{what}")
    async def any(self, message: Message, what: str) -> Outcome | None:
        return Returns.on_message(self, message)  # type: ignore[no-any-return]


@pytest.mark.parametrize("app", [Returns, AsyncReturns])
def test_an_outcome_returned_is_honoured(app):
    with WorkerHarness(app) as h:
        assert h.deliver("none") is Outcome.OK
        assert h.deliver("ok") is Outcome.OK
        assert h.deliver("failed") is Outcome.FAILED
        assert h.deliver("unrouted") is Outcome.UNROUTED


@pytest.mark.parametrize("app", [Returns, AsyncReturns])
def test_any_other_return_value_counts_as_failed_and_is_logged_once(app, caplog):
    caplog.set_level(logging.ERROR)
    with WorkerHarness(app) as h:
        assert h.deliver("true") is Outcome.FAILED
        assert h.deliver("number") is Outcome.FAILED
        assert h.deliver("ok") is Outcome.OK
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        (
            "on_message for topic 'true' returned True, which is neither None nor a procmqtt.Outcome; "
            "counted as FAILED (logged once per worker process)"
        )
    ]


def _app(annotation: Any, *, as_route: bool = False, is_async: bool = False) -> type[Worker]:
    if is_async:

        async def handler(self: Worker, message: Message) -> None: ...
    else:

        def handler(self: Worker, message: Message) -> None: ...

    handler.__annotations__["return"] = annotation
    if as_route:
        handler.__qualname__ = "App.temperature"
        return type("App", (Worker,), {"temperature": route("t")(handler)})
    handler.__qualname__ = "App.on_message"
    return type("App", (Worker,), {"on_message": handler})


@pytest.mark.parametrize(
    "annotation",
    [
        None,
        type(None),
        Outcome,
        Optional[Outcome],  # noqa: UP045 - the old spelling must load too
        Outcome | None,
        Any,
        object,
        "None",
        "Outcome",
        "procmqtt.Outcome",
        "Outcome | None",
        "Optional[Outcome]",
        "Awaitable[Outcome | None]",
        "typing_only.Outcome",
    ],
)  # not importable here: judged by its text
@pytest.mark.parametrize("as_route", [False, True])
def test_return_annotations_none_or_outcome_load(annotation, as_route):
    with WorkerHarness(_app(annotation, as_route=as_route)):
        pass


@pytest.mark.parametrize(
    "annotation, shown",
    [
        (bool, "bool"),
        ("str", "str"),
        (dict[str, int], "dict[str, int]"),
        (Outcome | bool, "procmqtt.message.Outcome | bool"),
        ("list[Outcome]", "list[Outcome]"),
    ],
)
@pytest.mark.parametrize("as_route, is_async", [(False, False), (True, False), (True, True)])
def test_other_return_annotations_are_refused_at_load(annotation, shown, as_route, is_async):
    from procmqtt.errors import ExitCode, HandlerError

    name = "App.temperature" if as_route else "App.on_message"
    with pytest.raises(HandlerError) as info:
        WorkerHarness(_app(annotation, as_route=as_route, is_async=is_async))
    assert str(info.value) == (
        f"{name}: declared to return {shown}; a handler returns None or a procmqtt.Outcome "
        "(any other value would count as a failure)"
    )
    assert info.value.exit_code == ExitCode.USAGE


def test_a_refused_annotation_stops_procmqtt_with_one_line_and_exit_2(tmp_path):
    app = tmp_path / "badapp.py"
    app.write_text(
        "from procmqtt import Message, Worker\n\n\nclass Bad(Worker):\n"
        "    def on_message(self, message: Message) -> bool:\n        return True\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "procmqtt", "check", f"{app}:Bad"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"procmqtt: error: APP '{app}:Bad': Bad.on_message: declared to return bool; a handler "
        "returns None or a procmqtt.Outcome (any other value would count as a failure)\n"
    )


@pytest.mark.timeout(60)
def test_under_procmqtt_run_helpers_named_handle_work_and_a_failed_outcome_is_retried(tmp_path, broker, runs):
    out, dead = Subscriber(broker, "out/#"), Subscriber(broker, "dead/#")
    cfg = write_config(
        tmp_path / "procmqtt.toml",
        broker,
        topics={"in/#": 1, "fail/#": 1},
        workers=2,
        workers_toml='on_error = "retry"\nmax_attempts = 2\ndead_letter_topic = "dead"',
    )
    run = Procmqtt(tmp_path, "tests/apps_api.py:Helpers", cfg)
    runs.append(run)
    run.ready()
    publish_all(publisher(broker), [("in/a", b"abc"), ("fail/b", b"bad")])
    wait_until(lambda: out.payloads() == [b"ABC cba"], 20, "the message handled with the app's own helpers")
    wait_until(lambda: dead.payloads() == [b"bad"], 20, "Outcome.FAILED retried, then dead-lettered")
    out.close()
    dead.close()
    assert run.stop() == 0


# --- publish errors by name ------------------------------------------------------------------------


def test_publish_errors_have_names_and_descriptions():
    from procmqtt import PublishError
    from procmqtt.worker.link import AGENT_GONE, describe_error

    assert PublishError(0) is PublishError.OK and not PublishError.OK
    assert PublishError(3) is PublishError.INVALID and PublishError.INVALID == 3 and str(PublishError.INVALID) == "3"
    assert PublishError.NOT_AUTHORIZED.description == "Not authorized (reason code 135)"
    assert PublishError.PAYLOAD_SIZE.description == "Payload too large."
    assert AGENT_GONE is PublishError.AGENT_GONE is PublishError.CONNECTION_LOST and AGENT_GONE == 7
    assert PublishError.AGENT_GONE.description == "the agent's side closed or restarted before an answer"
    unknown = PublishError(200)  # a code without a name stays a PublishError, and an int
    assert isinstance(unknown, PublishError) and unknown == 200 and unknown.name == "CODE_200"
    assert unknown.description == "reason code 200"
    assert describe_error(135) == "Not authorized (reason code 135)"


def test_a_handles_error_is_a_publish_error():
    from procmqtt import PublishError, PublishHandle
    from procmqtt.testing import FakeLink

    handle = PublishHandle(FakeLink(), 1)
    assert handle.error is None
    handle._resolve(135)
    assert handle.error is PublishError.NOT_AUTHORIZED and handle.error == 135 and not handle.wait()
