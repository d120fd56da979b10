"""Typed payloads (worker/payloads.py): the decoding and validation, the load-time checks, and
WorkerHarness deliveries, which take the production path (worker.handling.Runner)."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from procmqtt import InvalidPayload, Message, Middleware, Outcome, Worker, route
from procmqtt.cli import check
from procmqtt.config import from_mapping
from procmqtt.errors import HandlerError, RouteError
from procmqtt.testing import WorkerHarness
from procmqtt.worker.middleware import MessageNext
from procmqtt.worker.payloads import body_of, message_body
from procmqtt.worker.routes import routes_of

pytestmark = [pytest.mark.timeout(30), pytest.mark.unit]


class Mode(enum.Enum):
    AUTO = "auto"
    MANUAL = "manual"


@dataclass(frozen=True)
class Reading:
    celsius: float
    seq: int
    unit: Literal["C", "F"] = "C"
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.celsius < -273.15:
            raise ValueError("celsius is below absolute zero")


class Point(TypedDict):
    x: int
    y: int


class Labels(TypedDict, total=False):
    name: str


@dataclass
class Site:
    reading: Reading
    points: dict[str, Point]
    mode: Mode
    labels: Labels
    note: str | None = None
    parent: Site | None = None  # recursive: decoded lazily
    pair: tuple[int, ...] = ()
    extra: Any = None


def decode(tp: Any, payload: Any) -> Any:
    def handler(self: Any, message: Message, body: Any) -> None: ...

    handler.__annotations__ = {"body": tp}
    body = body_of(handler, (), "handler")
    assert body is not None
    return body.decode(payload if isinstance(payload, bytes) else json.dumps(payload).encode())


def test_a_valid_body_becomes_the_declared_types():
    site = decode(
        Site,
        {
            "reading": {"celsius": 21, "seq": 3, "tags": ["a"], "ignored": True},
            "points": {"p": {"x": 1, "y": 2}},
            "mode": "auto",
            "labels": {},
            "parent": {"reading": {"celsius": 1.5, "seq": 1}, "points": {}, "mode": "manual", "labels": {"name": "n"}},
            "pair": [1, 2, 3],
        },
    )
    assert site.reading == Reading(21.0, 3, "C", ["a"]) and type(site.reading.celsius) is float
    assert site.points == {"p": {"x": 1, "y": 2}} and site.mode is Mode.AUTO and site.pair == (1, 2, 3)
    assert site.parent.mode is Mode.MANUAL and site.parent.labels == {"name": "n"} and site.parent.parent is None
    assert decode(list[int], [1, 2]) == [1, 2] and decode(int | str, "x") == "x" and decode(dict, {}) == {}
    assert decode(Annotated[list[int], "meta"], [3]) == [3]


@pytest.mark.parametrize(
    ("payload", "field_", "problem"),
    [
        (b"{not json", "body", "not JSON"),
        (b"\xff", "body", "not JSON"),
        ([1], "body", "expected an object (Reading), got [1]"),
        ({"seq": 1}, "body.celsius", "missing"),
        ({"celsius": "hot", "seq": 1}, "body.celsius", "expected a number, got 'hot'"),
        ({"celsius": 1, "seq": True}, "body.seq", "expected an integer, got true"),
        ({"celsius": 1, "seq": 1.5}, "body.seq", "expected an integer, got 1.5"),
        ({"celsius": 1, "seq": 1, "unit": "K"}, "body.unit", 'expected "C" or "F", got \'K\''),
        ({"celsius": 1, "seq": 1, "unit": []}, "body.unit", 'expected "C" or "F", got []'),  # unhashable
        (b'{"celsius": 1' + b"0" * 400 + b', "seq": 1}', "body.celsius", "expected a number within a float's range"),
        ({"celsius": 1, "seq": 1, "tags": ["a", 2]}, "body.tags[1]", "expected a string, got 2"),
        ({"celsius": -300, "seq": 1}, "body", "celsius is below absolute zero"),
        ({"celsius": None, "seq": 1}, "body.celsius", "expected a number, got null"),
    ],
)
def test_an_invalid_body_names_its_field(payload: Any, field_: str, problem: str):
    with pytest.raises(InvalidPayload) as caught:
        decode(Reading, payload)
    assert caught.value.field == field_ and problem in caught.value.problem


def test_nested_problems_name_the_whole_path():
    base = {"reading": {"celsius": 1, "seq": 1}, "points": {}, "mode": "auto", "labels": {}}
    cases = [
        ({**base, "points": {"p": {"x": 1}}}, "body.points['p'].y", "missing"),
        ({**base, "mode": "off"}, "body.mode", '"auto" or "manual" (Mode), got \'off\''),
        ({**base, "labels": {"name": 3}}, "body.labels.name", "expected a string"),
        ({**base, "parent": {**base, "note": 5}}, "body.parent.note", "expected a string, got 5"),
        ({**base, "pair": [1, "2"]}, "body.pair[1]", "expected an integer"),
    ]
    for payload, field_, problem in cases:
        with pytest.raises(InvalidPayload) as caught:
            decode(Site, payload)
        assert caught.value.field == field_ and problem in caught.value.problem, payload


FIELDS = ["celsius", "seq", "unit", "tags", "reading", "points", "mode", "labels", "name", "parent", "pair", "x", "y"]
json_values = st.recursive(
    st.sampled_from(["auto", "C", "F"])
    | st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=2), inner),
    max_leaves=20,
)


@given(json_values)
def test_any_json_either_decodes_or_is_invalid_never_an_error(value: Any):
    for tp in (Reading, Site, list[Point], int | Literal["C"] | None):
        try:
            decoded = decode(tp, value)
        except InvalidPayload as exc:
            assert exc.field.startswith("body")
        else:
            assert tp is not Reading or (isinstance(decoded.seq, int) and decoded.unit in ("C", "F"))
            assert tp is not Site or (isinstance(decoded.mode, Mode) and isinstance(decoded.reading, Reading))


readings = st.builds(
    Reading,
    celsius=st.floats(min_value=-273.15, max_value=1e6, allow_nan=False),
    seq=st.integers(),
    unit=st.sampled_from(["C", "F"]),
    tags=st.lists(st.text(max_size=4), max_size=3),
)


@given(readings)
def test_a_valid_body_round_trips(reading: Reading):
    assert decode(Reading, dataclasses.asdict(reading)) == reading


class Unrelated:
    pass


@pytest.mark.parametrize(
    ("annotation", "problem"),
    [
        (Unrelated, "parameter 'body': Unrelated cannot be decoded from JSON"),
        (bytes, "parameter 'body': bytes cannot be decoded"),
        (dict[int, str], "JSON object keys are strings"),
        (set[int], "cannot be decoded from JSON"),
        ("NoSuchType", "cannot resolve the annotation 'NoSuchType'"),
    ],
)
def test_a_type_that_cannot_be_decoded_is_refused_at_load(annotation: Any, problem: str):
    def handler(self: Any, message: Message, body: Any) -> None: ...

    handler.__annotations__ = {"body": annotation}
    with pytest.raises(HandlerError, match=problem) as caught:
        body_of(handler, (), "App.handler")
    assert str(caught.value).startswith("App.handler: ") and caught.value.exit_code == 2


@dataclass
class WithBadField:
    when: complex


def test_a_bad_field_is_named_at_load():
    class App(Worker):
        @route("a/{device}")
        def handler(self, message: Message, device: str, body: WithBadField) -> None: ...

    with pytest.raises(
        HandlerError, match=r"App.handler: @route\('a/\{device\}'\): parameter 'body': WithBadField.when"
    ):
        routes_of(App)


def test_two_bodies_or_a_misspelt_topic_parameter_are_refused_at_load():
    class Two(Worker):
        @route("a")
        def handler(self, message: Message, one: Reading, two: Reading) -> None: ...

    with pytest.raises(HandlerError, match="one body parameter at most, got one, two"):
        routes_of(Two)

    class Misspelt(Worker):
        @route("a/{device}")
        def handler(self, message: Message, devcie: str) -> None: ...

    with pytest.raises(RouteError, match="must accept"):
        routes_of(Misspelt)


# --- through WorkerHarness: the production path ---------------------------------------------------


class Seen(Middleware):
    """Records what leaves the handler, InvalidPayload included."""

    def __init__(self) -> None:
        self.raised: list[str] = []

    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        try:
            return call_next(message)
        except InvalidPayload as exc:
            self.raised.append(exc.field)
            raise


class Sensors(Worker):
    middleware = (Seen(),)

    def on_start(self) -> None:
        self.readings: list[tuple[str, Reading]] = []

    @route("sensors/{device}/temperature", qos=1)
    def temperature(self, message: Message, device: str, reading: Reading) -> None:
        self.readings.append((device, reading))

    @route("sensors/{device}/point")
    def point(self, message: Message, device: str, *, point: Point) -> None:
        if point["x"] < 0:
            raise InvalidPayload("point.x", "must not be negative")  # a handler's own verdict


def test_harness_delivers_typed_values_and_returns_invalid(caplog: pytest.LogCaptureFixture):
    with WorkerHarness(Sensors) as h, caplog.at_level(logging.WARNING):  # raise_exceptions: still INVALID
        assert h.deliver("sensors/d1/temperature", {"celsius": 21.5, "seq": 1}) is Outcome.OK
        assert h.worker.readings == [("d1", Reading(21.5, 1))]
        assert h.deliver("sensors/d1/temperature", {"celsius": "hot", "seq": 2}) is Outcome.INVALID
        assert h.deliver("sensors/d1/point", {"x": 1, "y": 2}) is Outcome.OK
        assert h.deliver("sensors/d1/point", {"x": -1, "y": 2}) is Outcome.INVALID
        assert Sensors.middleware[0].raised == ["reading.celsius", "point.x"]  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        "invalid body on topic 'sensors/d1/temperature': reading.celsius: expected a number, got 'hot'; "
        "dropped (no dead_letter_topic), not retried",
        "invalid body on topic 'sensors/d1/point': point.x: must not be negative; dropped (no dead_letter_topic), "
        "not retried",
    ]


class TypedOnMessage(Worker):
    async def on_message(self, message: Message, reading: Reading) -> None:
        self.last = reading


def test_on_message_may_declare_the_body_and_async_apps_decode_too():
    config = from_mapping({"workers": {"dead_letter_topic": "dead"}})
    with WorkerHarness(TypedOnMessage, config=config) as h:
        assert h.deliver("any", {"celsius": 1, "seq": 2}) is Outcome.OK and h.worker.last == Reading(1.0, 2)
        assert h.deliver("any", b"[]") is Outcome.INVALID
        assert h.runner._rejected == "dead-lettered to 'dead'"
    assert message_body(TypedOnMessage) is not None and message_body(Sensors) is None


def test_check_lists_the_middleware_and_each_routes_body_type():
    head = check.render_check("app:Sensors", Sensors, from_mapping({}), routes_of(Sensors)).split("\n\n")[0]
    assert head.splitlines()[-1] == "middleware: Seen"
    rows = {r.topic_filter: r.reaches for r in check.subscriptions(from_mapping({}), routes_of(Sensors))}
    assert rows == {
        "sensors/+/temperature": ("temperature (sensors/{device}/temperature) [body reading: Reading (dataclass)]",),
        "sensors/+/point": ("point (sensors/{device}/point) [body point: Point (TypedDict)]",),
    }


# --- pydantic and msgspec: optional, tested when installed (the test extra installs both) -----------


def test_pydantic_models_validate_with_pydantics_own_messages():
    pydantic = pytest.importorskip("pydantic")

    class Model(pydantic.BaseModel):
        celsius: float
        seq: int = pydantic.Field(ge=0)

    assert decode(Model, {"celsius": 1, "seq": 2}) == Model(celsius=1.0, seq=2)
    with pytest.raises(InvalidPayload) as caught:
        decode(Model, {"celsius": 1, "seq": -1})
    assert caught.value.field == "body.seq" and "greater than or equal to 0" in caught.value.problem
    with pytest.raises(InvalidPayload, match="body"):
        decode(Model, b"{nope")

    holder = dataclasses.make_dataclass("Holder", [("inner", Model)])  # a real annotation, not a string
    with pytest.raises(InvalidPayload) as caught:
        decode(holder, {"inner": {"celsius": "x", "seq": 1}})
    assert caught.value.field == "body.inner.celsius"


def test_msgspec_structs_validate_with_msgspecs_own_messages():
    msgspec = pytest.importorskip("msgspec")

    class Struct(msgspec.Struct):
        celsius: float
        seq: int

    assert decode(Struct, {"celsius": 1, "seq": 2}) == Struct(1.0, 2)
    with pytest.raises(InvalidPayload) as caught:
        decode(Struct, {"celsius": 1, "seq": "2"})
    assert caught.value.field == "body.seq" and "Expected `int`, got `str`" in caught.value.problem
    with pytest.raises(InvalidPayload) as caught:
        decode(list[Struct], [{"celsius": 1}])
    assert caught.value.field == "body[0]" and "missing required field `seq`" in caught.value.problem


DEEP = 100_000  # far past Python's recursion limit


@dataclass
class Chain:
    next: Chain | None = None


@pytest.mark.parametrize(
    ("tp", "payload"),
    [
        (Reading, b"[" * DEEP + b"]" * DEEP),  # json.loads itself recurses
        (list[Any], b"[" * DEEP + b"]" * DEEP),
        (Chain, ('{"next": ' * 600 + "null" + "}" * 600).encode()),  # json.loads copes; the converter recurses
    ],
)
def test_a_body_nested_too_deeply_is_invalid_not_an_error(tp: Any, payload: bytes):
    """A hostile body costs one invalid message, never a RecursionError in the worker (which the
    worker would count as a failure and, with ``on_error = "retry"``, retry in vain)."""
    with pytest.raises(InvalidPayload, match="nested too deeply"):
        decode(tp, payload)


@pytest.mark.parametrize("library", ["pydantic", "msgspec"])
def test_a_body_nested_too_deeply_is_invalid_with_the_model_libraries_too(library: str):
    module = pytest.importorskip(library)
    base = module.BaseModel if library == "pydantic" else module.Struct
    model = type("Deep", (base,), {"__annotations__": {"x": list}, "x": []})
    with pytest.raises(InvalidPayload):
        decode(model, b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}")
