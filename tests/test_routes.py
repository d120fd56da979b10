"""Topic routes: collection, load-time checks (exit 2), specificity, parameters, unrouted messages."""

from __future__ import annotations

import inspect
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import (
    ROOT,
    Procmqtt,
    publish_all,
    publisher,
    records,
    wait_until,
    write_config,
)

from procmqtt import Message, Outcome, Worker, route
from procmqtt.cli.app import load_app
from procmqtt.config import Subscription, from_mapping
from procmqtt.errors import AppError, ExitCode, RouteError
from procmqtt.testing import WorkerHarness
from procmqtt.worker import routes
from procmqtt.worker.routes import Route, routes_of, with_route_subscriptions


class Which(Worker):
    """Every route records its own name and parameters, so tests see which one a topic reached."""

    def on_start(self) -> None:
        self.hits: list[tuple[str, dict[str, str]]] = []

    def hit(self, name: str, **params: str) -> None:
        self.hits.append((name, params))


def reached(app: type[Which], topic: str) -> tuple[str, dict[str, str]] | Outcome:
    with WorkerHarness(app) as h:
        outcome = h.deliver(topic)
        return h.worker.hits[0] if outcome is Outcome.OK else outcome


# --- collection --------------------------------------------------------------------------------


class Base(Which):
    @route("base/{x}", qos=1)
    def base(self, message: Message, x: str) -> None:
        self.hit("base", x=x)

    @route("replaced/#")
    def replaced(self, message: Message) -> None:
        self.hit("replaced")


class Child(Base):
    def replaced(self, message: Message) -> None:  # overridden without @route: no longer a route
        pass

    @route("child/a", qos=2)
    @route("child/b")
    def child(self, message: Message) -> None:
        self.hit("child", topic=message.topic)


@pytest.mark.unit
def test_routes_are_collected_in_declaration_order_with_inheritance():
    assert routes_of(Child) == (
        Route("base/{x}", "base/+", 1, "base", ("x",)),
        Route("child/a", "child/a", 2, "child", ()),
        Route("child/b", "child/b", 0, "child", ()),
    )
    assert [r.name for r in routes_of(Base)] == ["base", "replaced"]
    assert routes_of(Worker) == ()


@pytest.mark.unit
def test_stacked_routes_reach_the_same_method():
    assert reached(Child, "child/b") == ("child", {"topic": "child/b"})
    assert reached(Child, "base/7") == ("base", {"x": "7"})
    assert reached(Child, "replaced/1") is Outcome.UNROUTED


# --- load-time checks --------------------------------------------------------------------------

SIGNATURES = {
    "(self, message)": lambda self, message: None,
    "(self)": lambda self: None,
    "(self, message, d)": lambda self, message, d: None,
    "(self, message, g)": lambda self, message, g: None,
    "(self, message, dev)": lambda self, message, dev: None,
    "(self, message, **kw)": lambda self, message, **kw: None,
    "(self, message, *, x, **rest)": lambda self, message, *, x, **rest: None,
}


def _app_with(pattern: object, qos: object = 0, signature: str = "(self, message)") -> type[Worker]:
    def handler(*args: object, **kwargs: object) -> None: ...

    handler.__signature__ = inspect.signature(SIGNATURES[signature])  # type: ignore[attr-defined]
    handler.__qualname__ = "Bad.handler"
    return type("Bad", (Worker,), {"handler": route(pattern, qos)(handler)})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pattern, qos, signature, expected",
    [
        ("a/#/b", 0, "(self, message)", ("not a valid MQTT topic filter ('#' must be a whole level and the last one)")),
        ("a/b+", 0, "(self, message)", "not a valid MQTT topic filter ('+' must be a whole level)"),
        ("", 0, "(self, message)", "not a valid MQTT topic filter (a topic filter must not be empty)"),
        (42, 0, "(self, message)", "the pattern must be a string"),
        ("a/b", 3, "(self, message)", "qos must be 0, 1 or 2, got 3"),
        ("a/b", True, "(self, message)", "qos must be 0, 1 or 2, got True"),
        (
            "s/{device}/t",
            0,
            "(self, message)",
            ("the method must accept (self, message, device): got an unexpected keyword argument 'device'"),
        ),
        ("s/{device}/t", 0, "(self, message, dev)", "the method must accept (self, message, device)"),
        ("a/b", 0, "(self)", "the method must accept (self, message)"),
        ("s/{d}/{d}", 0, "(self, message, d)", "the parameter {d} appears twice"),
        ("s/x{d}/t", 0, "(self, message, d)", "a parameter must be a whole level"),
        ("s/{1d}/t", 0, "(self, message, **kw)", "{1d} is not a valid parameter name"),
        ("s/{}/t", 0, "(self, message, **kw)", "{} is not a valid parameter name"),
        ("$share/{g}/t", 0, "(self, message, g)", "a shared subscription must look like"),
    ],
)
@pytest.mark.unit
def test_bad_routes_are_one_line_errors_with_exit_code_2(pattern, qos, signature, expected):
    with pytest.raises(RouteError) as info:
        routes_of(_app_with(pattern, qos, signature))
    message = str(info.value)
    assert message.startswith(f"Bad.handler: @route({pattern!r}): "), message
    assert expected in message and "\n" not in message
    assert info.value.exit_code == ExitCode.USAGE == 2


@pytest.mark.unit
def test_a_parameter_may_be_taken_by_keyword_only_or_kwargs():
    assert routes_of(_app_with("a/{x}/{y}", 0, "(self, message, *, x, **rest)"))[0].params == ("x", "y")


@pytest.mark.unit
def test_two_routes_with_the_same_filter_are_an_error():
    class Twice(Worker):
        @route("a/{x}")
        def first(self, message: Message, x: str) -> None: ...

        @route("a/+")
        def second(self, message: Message) -> None: ...

    with pytest.raises(
        RouteError,
        match=r"second: @route\('a/\+'\) has the same filter 'a/\+' as "
        r"@route\('a/\{x\}'\) on first; the second could never be reached",
    ):
        routes_of(Twice)


@pytest.mark.unit
def test_route_on_a_staticmethod_is_an_error():
    class Static(Worker):
        @route("a")
        @staticmethod
        def handler(message: Message) -> None: ...

    with pytest.raises(RouteError, match="@route must decorate a plain method"):
        routes_of(Static)


@pytest.mark.unit
def test_load_app_checks_routes_before_any_fork():
    with pytest.raises(RouteError) as info:
        load_app("tests/apps_routes.py:BadParam")
    assert str(info.value).startswith(
        "APP 'tests/apps_routes.py:BadParam': BadParam.handler: "
        "@route('sensors/{device}/temperature'): the method must accept"
    )
    assert info.value.exit_code == 2


@pytest.mark.unit
def test_an_app_that_handles_nothing_is_an_error():
    class Empty(Worker):
        pass

    with pytest.raises(AppError, match="Empty has no @route methods and does not override on_message") as info:
        WorkerHarness(Empty)
    assert info.value.exit_code == ExitCode.APP


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "app, expected",
    [
        ("BadFilter", "BadFilter.handler: @route('a/#/b'): not a valid MQTT topic filter"),
        (
            "BadParam",
            (
                "BadParam.handler: @route('sensors/{device}/temperature'): the method must accept "
                "(self, message, device)"
            ),
        ),
    ],
)
def test_cli_exits_2_on_a_bad_route_with_one_line(tmp_path, app, expected):
    (tmp_path / "empty.toml").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "procmqtt", "run", f"tests/apps_routes.py:{app}", "-c", str(tmp_path / "empty.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"procmqtt: error: APP 'tests/apps_routes.py:{app}': {expected}")


# --- specificity ---------------------------------------------------------------------------------


class Ranked(Which):
    @route("#")
    def everything(self, message: Message) -> None:
        self.hit("#")

    @route("a/#")
    def a_hash(self, message: Message) -> None:
        self.hit("a/#")

    @route("a/+/#")
    def a_plus_hash(self, message: Message) -> None:
        self.hit("a/+/#")

    @route("+/b/c")
    def plus_b_c(self, message: Message) -> None:
        self.hit("+/b/c")

    @route("a/{mid}/c")
    def a_mid_c(self, message: Message, mid: str) -> None:
        self.hit("a/{mid}/c", mid=mid)

    @route("a/b/c")
    def a_b_c(self, message: Message) -> None:
        self.hit("a/b/c")

    @route("a/+")
    def a_plus(self, message: Message) -> None:
        self.hit("a/+")


@pytest.mark.parametrize(
    "topic, winner",
    [
        ("a/b/c", "a/b/c"),  # 3 literal levels beat 2
        ("a/x/c", "a/{mid}/c"),  # 2 literals; 'a/+/#' and 'a/#' have 1
        ("z/b/c", "+/b/c"),
        ("a/b", "a/+"),  # same literals (1): no '#' beats '#'
        ("a/b/d", "a/+/#"),  # same literals, both '#': more levels wins
        ("a", "a/#"),  # 'a/#' matches its parent level, as in MQTT
        ("a/b/c/d", "a/+/#"),
        ("q", "#"),
        ("q/r/s", "#"),
    ],
)
@pytest.mark.unit
def test_most_specific_route_wins(topic, winner):
    assert reached(Ranked, topic)[0] == winner


@pytest.mark.unit
def test_ties_keep_declaration_order():
    class Tie(Which):
        @route("+/b/c")
        def first(self, message: Message) -> None:
            self.hit("first")

        @route("a/+/c")
        def second(self, message: Message) -> None:
            self.hit("second")

    assert reached(Tie, "a/b/c")[0] == "first"


@pytest.mark.unit
def test_the_order_is_documented_by_specificity():
    ranked = sorted(routes_of(Ranked), key=routes.specificity)
    assert [r.pattern for r in ranked] == ["a/b/c", "+/b/c", "a/{mid}/c", "a/+", "a/+/#", "a/#", "#"]


@pytest.mark.unit
def test_wildcards_at_the_first_level_do_not_match_dollar_topics():
    class Dollar(Which):
        @route("#")
        def everything(self, message: Message) -> None:
            self.hit("#")

        @route("$SYS/#")
        def sys(self, message: Message) -> None:
            self.hit("$SYS/#")

        @route("{first}/x")
        def first(self, message: Message, first: str) -> None:
            self.hit("first")

    assert reached(Dollar, "$SYS/broker/load")[0] == "$SYS/#"
    assert reached(Dollar, "$other/x") is Outcome.UNROUTED
    assert reached(Dollar, "plain/x")[0] == "first"


# --- parameters ----------------------------------------------------------------------------------


class Params(Which):
    @route("sensors/{device}/{kind}")
    def reading(self, message: Message, device: str, kind: str) -> None:
        self.hit("reading", device=device, kind=kind)

    @route("$share/group/jobs/{queue}")
    def job(self, message: Message, queue: str) -> None:
        self.hit("job", queue=queue)

    @route("literal.dots/[x]")
    def regex_chars(self, message: Message) -> None:
        self.hit("regex_chars")


@pytest.mark.parametrize(
    "topic, expected",
    [
        ("sensors/d1/temperature", ("reading", {"device": "d1", "kind": "temperature"})),
        ("sensors//temperature", ("reading", {"device": "", "kind": "temperature"})),  # an empty level, as '+'
        ("sensors/d é/x", ("reading", {"device": "d é", "kind": "x"})),
        ("jobs/fast", ("job", {"queue": "fast"})),  # a shared subscription delivers the plain topic
        ("literal.dots/[x]", ("regex_chars", {})),
    ],
)
@pytest.mark.unit
def test_parameters_are_passed_as_keyword_arguments(topic, expected):
    assert reached(Params, topic) == expected


@pytest.mark.parametrize("topic", ["sensors/d1", "sensors/d1/t/extra", "literalXdots/[x]", "jobs/a/b"])
@pytest.mark.unit
def test_no_partial_matches(topic):
    assert reached(Params, topic) is Outcome.UNROUTED


# --- unrouted, overriding on_message ----------------------------------------------------------------


@pytest.mark.unit
def test_unrouted_is_logged_once_per_topic_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="procmqtt.worker.routes")
    with WorkerHarness(Params) as h:
        outcomes = [h.deliver(t) for t in ("other/1", "other/1", "other/2", "other/1")]
    assert outcomes == [Outcome.UNROUTED] * 4
    lines = [r for r in caplog.records if r.name == "procmqtt.worker.routes"]
    assert [r.levelno for r in lines] == [logging.DEBUG] * 2
    assert [r.getMessage() for r in lines] == [
        f"no route matches topic {t!r}; acknowledged as unrouted (logged once per topic)"
        for t in ("other/1", "other/2")
    ]


@pytest.mark.unit
def test_unrouted_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(routes, "MAX_UNROUTED_REMEMBERED", 10)
    with WorkerHarness(Params) as h:
        for i in range(35):
            h.deliver(f"other/{i}")
        assert 0 < len(h.worker._router._unrouted) <= 10  # type: ignore[union-attr]


@pytest.mark.unit
def test_overriding_on_message_receives_everything_and_may_dispatch():
    class Override(Params):
        def on_message(self, message: Message) -> object:
            self.hit("override", topic=message.topic)
            if message.topic.startswith("sensors/"):
                return super().on_message(message)
            return None

    with WorkerHarness(Override) as h:
        assert h.deliver("sensors/d1/t") is Outcome.OK
        assert h.deliver("jobs/x") is Outcome.OK  # not dispatched: the override handled it
        assert h.deliver("sensors/too/many/levels") is Outcome.UNROUTED  # super() found no route
        assert h.worker.hits == [
            ("override", {"topic": "sensors/d1/t"}),
            ("reading", {"device": "d1", "kind": "t"}),
            ("override", {"topic": "jobs/x"}),
            ("override", {"topic": "sensors/too/many/levels"}),
        ]


@pytest.mark.unit
def test_route_filters_join_the_config_subscriptions_with_the_higher_qos():
    cfg = from_mapping(
        {"mqtt": {"topics": {"jobs/#": {"qos": 1}, "$share/group/jobs/+": {"qos": 0}, "sensors/+/+": {"qos": 2}}}}
    )
    merged = with_route_subscriptions(cfg, Params)
    assert merged.mqtt.topics == (
        Subscription("jobs/#", 1),
        Subscription("$share/group/jobs/+", 0),
        Subscription("sensors/+/+", 2),
        Subscription("literal.dots/[x]", 0),
    )
    assert with_route_subscriptions(from_mapping({}), Child).mqtt.topics == (
        Subscription("base/+", 1),
        Subscription("child/a", 2),
        Subscription("child/b", 0),
    )


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_routed_app_against_mosquitto(tmp_path, broker, runs):
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = write_config(
        tmp_path / "routed.toml", broker, topics={"other/#": 1}, workers=1, app={"record_dir": str(record_dir)}
    )
    run = Procmqtt(tmp_path, "tests/apps_routes.py:Routed", cfg, "--log-level", "DEBUG")
    runs.append(run)
    run.ready()
    client_id = re.search(r'client_id = "(.*)"', Path(cfg).read_text()).group(1)  # type: ignore[union-attr]
    # Mosquitto's own log: the route filters reached the broker, with the routes' qos.
    broker_log = wait_until(
        lambda: (text := broker.log_path.read_text()).count(client_id) >= 3 and text,
        10,
        "three subscriptions in mosquitto's log",
    )
    subscribed = set(re.findall(rf"{re.escape(client_id)} (\d) (\S+)", broker_log))
    assert subscribed == {("1", "other/#"), ("1", "sensors/+/temperature"), ("0", "logs/#")}, subscribed
    publish_all(
        publisher(broker),
        [
            ("sensors/d1/temperature", b"21.5"),
            ("sensors/d2/temperature", b"19"),
            ("logs/app/error", b"e"),
            ("other/1", b"u"),
            ("other/1", b"u"),
            ("sensors/d3/humidity", b"never subscribed"),
        ],
    )
    wait_until(lambda: len(records(record_dir)) >= 3, 15, "three routed messages")
    run.wait_for_log(r"no route matches topic 'other/1'")
    done = sorted((r["route"], r.get("device"), r["topic"]) for r in records(record_dir))
    assert done == [
        ("logs", None, "logs/app/error"),
        ("temperature", "d1", "sensors/d1/temperature"),
        ("temperature", "d2", "sensors/d2/temperature"),
    ]
    assert run.stop() == 0
    log = run.log()
    assert log.count("no route matches topic 'other/1'") == 1  # twice unrouted, logged once
    assert "agent exiting: 5 received, 5 processed (2 unrouted), 0 failed" in log  # unrouted ones acknowledged too
