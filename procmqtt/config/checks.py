"""Value checks for configuration keys: each returns what was expected, or None when the value is fine.

Pure functions of one value, shared by the TOML file, the environment and the command line, so a
value is refused with the same words wherever it came from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from procmqtt.orderkey import pattern_problem
from procmqtt.topics import topic_problem

MAX_SECONDS = 1_000_000  # every duration: finite, and within what socket and select timeouts accept
MAX_MQTT_STRING = 65_535  # client id, user name, password, will payload: a 2-byte length on the wire
MAX_MQTT_PACKET = 268_435_455  # the largest remaining length MQTT can encode (the birth message)

Check = Callable[[Any], str | None]  # returns what was expected, or None when the value is fine


def integer(lo: int, hi: int | None = None) -> Check:
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        return None if ok else expected

    return check


def seconds(lo: float) -> Check:
    """A duration: a bounded range also refuses inf and nan (which compare false with both ends)."""

    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= MAX_SECONDS
        return None if ok else f"a number of seconds from {lo:g} to {MAX_SECONDS}"

    return check


def number(lo: float, hi: float) -> Check:
    """A finite number in a range (a bounded range also refuses inf and nan)."""

    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"a number from {lo:g} to {hi:g}"

    return check


def string_problem(v: str, max_bytes: int | None = None, *, nul: bool = False) -> str | None:
    """Why ``v`` cannot go to the broker or the OS as it is: a NUL (unless ``nul``), an undecodable
    byte (from the environment), or more UTF-8 bytes than the wire allows."""
    if "\x00" in v and not nul:
        return "a string without NUL characters"
    try:
        size = len(v.encode())
    except UnicodeEncodeError:
        return "valid UTF-8 text (this holds an undecodable byte)"
    if max_bytes is not None and size > max_bytes:
        return f"at most {max_bytes:,} UTF-8 bytes (the MQTT limit)"
    return None


def text(v: Any) -> str | None:
    return string_problem(v) if isinstance(v, str) and v else "a non-empty string"


def mqtt_text(v: Any) -> str | None:
    """A value that goes on the wire as an MQTT string (client id, user name)."""
    return string_problem(v, MAX_MQTT_STRING) if isinstance(v, str) and v else "a non-empty string"


def password_text(v: Any) -> str | None:
    """The password is binary data in MQTT: a NUL is allowed, the 2-byte length limit is not lifted."""
    return string_problem(v, MAX_MQTT_STRING, nul=True) if isinstance(v, str) and v else "a non-empty string"


def payload(max_bytes: int | None) -> Check:
    def check(v: Any) -> str | None:
        return string_problem(v, max_bytes, nul=True) if isinstance(v, str) else "a string"

    return check


def topic_name(v: Any) -> str | None:
    problem = string_problem(v) if isinstance(v, str) else None  # first: topic_problem's encode() would raise
    problem = problem or topic_problem(v)
    return f"a topic name to publish to ({problem})" if problem else None


def order_key(v: Any) -> str | None:
    problem = (string_problem(v) or pattern_problem(v)) if isinstance(v, str) else pattern_problem("")
    return problem


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def share_group(v: Any) -> str | None:
    ok = isinstance(v, str) and v and not any(c in v for c in "/+#")
    return string_problem(v) if ok else "a non-empty name without '/', '+' or '#'"


def one_of(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else "one of " + ", ".join(f'"{o}"' for o in options)

    return check


def subtable(v: Any) -> str | None:
    """A sub-table (``[mqtt.topics]``, ``[mqtt.tls]``...): set in TOML only, never from one environment variable."""
    return None if isinstance(v, dict) else "a table"


def ws_path(v: Any) -> str | None:
    """The HTTP path of a websockets endpoint."""
    return string_problem(v) if isinstance(v, str) and v.startswith("/") else "a path starting with '/'"


_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")


def class_specs(v: Any) -> str | None:
    """``[workers] middleware``: a list of ``"package.module:Class"`` (TOML), or those joined by
    commas (an environment variable)."""
    items = v.split(",") if isinstance(v, str) else v
    if isinstance(items, (list, tuple)) and all(isinstance(i, str) and _SPEC.match(i.strip()) for i in items):
        return None
    return 'a list of "package.module:Class" names'
