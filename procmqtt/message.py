"""The message a worker receives."""

from __future__ import annotations

import enum
import json as _json
from dataclasses import dataclass, replace
from typing import Any

from procmqtt.topics import topic_problem

MAX_EXPIRY = 2**32 - 1
_MAX_TEXT = 65535  # MQTT strings and binary data carry a 16-bit length


class Outcome(enum.IntEnum):
    """How handling one message ended; travels back to the agent with the completion."""

    OK = 0
    FAILED = 1  # the handler raised
    UNROUTED = 2  # no route matched (acknowledged like OK, counted apart)
    RETRY = 3  # the handler raised procmqtt.Retry: handed out again after its delay (counted as failed)
    INVALID = 4  # the body did not validate (InvalidPayload): dead-lettered or dropped at once, never retried


MAX_RETRY_AFTER = 1_000_000  # seconds, as every duration in the configuration


class Retry(Exception):
    """Raised by a handler: try this message again later, counting an attempt.

    ``after``: seconds to wait (None: the ``[workers] retry_delay`` schedule). Honoured whatever
    ``on_error`` says, since the handler asked; after ``max_attempts`` the message is dead-lettered
    (or dropped) as a failure is. See docs/delivery.md.
    """

    def __init__(self, after: float | None = None) -> None:
        if after is not None and not (isinstance(after, (int, float)) and 0 <= after <= MAX_RETRY_AFTER):
            raise ValueError(
                f"Retry(after=...): expected a number of seconds from 0 to {MAX_RETRY_AFTER}, got {after!r}"
            )
        super().__init__(after)
        self.after = None if after is None else float(after)


class InvalidPayload(Exception):
    """A message's body is not what its handler declared: trying again cannot help.

    Raised by procmqtt when a typed body does not validate (docs/typed-payloads.md), and by a
    handler that finds a body it can never handle. The message ends as ``Outcome.INVALID``: logged
    once with ``field`` and ``problem``, then dead-lettered (``[workers] dead_letter_topic``) or
    dropped at once, never retried, whatever ``on_error`` says.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Properties:
    """The MQTT 5 properties of a message: what ``Message.properties`` holds, and what
    ``Worker.publish(..., properties=...)`` sends.

    ``user_properties`` keeps order and repeated names, as MQTT does. ``message_expiry`` is in
    seconds; on a received message it is what was left when the broker delivered it.
    ``payload_format_indicator`` 1 declares the payload UTF-8 (receivers may check it). A field left
    at None is not sent. Values are checked on construction (``ValueError``), so a mistake shows in
    the worker that made it, not as a dropped connection.
    """

    user_properties: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry: int | None = None
    payload_format_indicator: int | None = None

    def __post_init__(self) -> None:
        pairs = self.user_properties
        if not (type(pairs) is tuple and all(type(p) is tuple and len(p) == 2 for p in pairs)):
            pairs = _pairs(pairs)
            object.__setattr__(self, "user_properties", pairs)
        for name, value in pairs:
            if not isinstance(name, str) or not isinstance(value, str):
                raise ValueError(  # noqa: TRY004 - one exception type for every bad property
                    f"user_properties must be (name, value) pairs of strings, got {(name, value)!r}"
                )
            _check_length("user property", name)
            _check_length("user property", value)
        if self.content_type is not None:
            if not isinstance(self.content_type, str):
                raise ValueError(f"content_type must be a string, got {self.content_type!r}")
            _check_length("content_type", self.content_type)
        if self.response_topic is not None:
            problem = topic_problem(self.response_topic)
            if problem:
                raise ValueError(f"response_topic: {problem}, got {self.response_topic!r}")
        data = self.correlation_data
        if data is not None:
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"correlation_data must be bytes or str, got {data!r}")
            data = bytes(data)
            object.__setattr__(self, "correlation_data", data)
            _check_length("correlation_data", data)
        expiry = self.message_expiry
        if expiry is not None and (
            isinstance(expiry, bool) or not isinstance(expiry, int) or not 0 <= expiry <= MAX_EXPIRY
        ):
            raise ValueError(f"message_expiry must be whole seconds from 0 to {MAX_EXPIRY}, got {expiry!r}")
        if self.payload_format_indicator not in (None, 0, 1) or isinstance(self.payload_format_indicator, bool):
            raise ValueError(
                f"payload_format_indicator must be 0 (bytes) or 1 (UTF-8), got {self.payload_format_indicator!r}"
            )

    def user_property(self, name: str, default: str | None = None) -> str | None:
        """The value of the first user property called ``name``, else ``default``."""
        for key, value in self.user_properties:
            if key == name:
                return value
        return default

    def merged(self, **changes: Any) -> Properties:
        """A copy with the fields in ``changes`` that are not None replaced."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **changes) if changes else self


EMPTY = Properties()
"""The properties of an MQTT 5 message that carries none."""


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    """``user_properties`` given as a list, or pairs as lists, made a tuple of tuples."""
    try:
        if not isinstance(value, (str, bytes)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value):
            return tuple((p[0], p[1]) for p in value)
    except TypeError:
        pass
    raise ValueError(f"user_properties must be (name, value) pairs of strings, got {value!r}")


def _check_length(what: str, value: str | bytes) -> None:
    size = len(value.encode("utf-8")) if isinstance(value, str) else len(value)
    if size > _MAX_TEXT:
        raise ValueError(f"{what} must be at most {_MAX_TEXT} bytes, got {size}")


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message as the broker delivered it.

    ``payload`` is the exact bytes from the broker; nothing is decoded unless you ask, so binary
    payloads are safe. ``redelivered`` is True when a worker that held this message died and it was
    handed to another one. ``properties``: the MQTT 5 properties (``Properties``, empty when the
    message carries none), or None on an MQTT 3.1.1 connection.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    redelivered: bool = False
    properties: Properties | None = None

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (raises ``UnicodeDecodeError`` if it is not)."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON (raises ``ValueError`` if it is not)."""
        return _json.loads(self.payload)


_new = object.__new__
_set_topic, _set_payload, _set_qos, _set_retain, _set_redelivered, _set_properties = (
    Message.__dict__[name].__set__ for name in ("topic", "payload", "qos", "retain", "redelivered", "properties")
)


def delivered(
    topic: str, payload: bytes, qos: int, retain: bool, redelivered: bool, properties: Properties | None
) -> Message:
    """``Message(topic, payload, qos, retain, redelivered, properties)``, built for a worker's hot path.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (about 700 ns
    for a Message); the slots' own setters take half that. The same object: equal, same hash."""
    message = _new(Message)
    _set_topic(message, topic)
    _set_payload(message, payload)
    _set_qos(message, qos)
    _set_retain(message, retain)
    _set_redelivered(message, redelivered)
    _set_properties(message, properties)
    return message
