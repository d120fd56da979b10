"""Fuzzing the configuration loader: whatever the mapping or the file, a Config or one ConfigError line.

Keys are drawn from the real schema tables (so the checks behind them run, not only the unknown-key
path), values from every TOML type and then some: inf and nan, huge and undecodable strings,
nested arrays and tables. Bounded to a few seconds per test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procmqtt import config
from procmqtt.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

pytestmark = [pytest.mark.timeout(60), pytest.mark.unit]  # unit: pure logic, no broker, no process

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MARKER = "PW-7f3a9c"  # in every password value: the error line must never contain it
MARKER_NUMBER = 739_173_917_391  # the same for a password of the wrong type
MARKERS = (MARKER, str(MARKER_NUMBER))


def _huge(s: str, n: int) -> str:
    return (s or "x") * n


strings = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=8),  # lone surrogates included
    st.sampled_from(
        [
            "",
            "a/#",
            "+",
            "$share/g/x",
            "/mqtt",
            "3.1.1",
            "5",
            "tcp",
            "websockets",
            "random",
            "ack",
            "retry",
            "\x00",
            "\udcff",
            "/etc/hostname",
            "/dev/null",
            "/nonexistent",
            ".",
            str(Path(__file__).parent.parent / "README.md"),
        ]
    ),
    st.builds(_huge, st.sampled_from(["a", "é", "/", "\x00"]), st.sampled_from([65_535, 65_536, 70_000])),
)
scalars = st.one_of(
    st.integers(),
    st.integers(-3, 70_000),
    st.sampled_from([0, 1, 2, 65_535, 65_536, 2**32, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("inf"), float("nan"), 1e300, 0.1]),
    st.booleans(),
    strings,
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3), max_leaves=6
)


POOL = [
    0,
    1,
    2,
    4,
    30,
    1883,
    65_535,
    0.5,
    10.0,
    True,
    False,
    "x",
    "localhost",
    "a/b",
    "3.1.1",
    "5",
    "tcp",
    "websockets",
    "/mqtt",
    "random",
    "round_robin",
    "ack",
    "retry",
    "g",
    "127.0.0.1",
    "/dev/null",
    "/etc/hostname",
]


def field(check: config.Check) -> st.SearchStrategy[Any]:
    """Mostly a value the key accepts, so that the checks after it run too; sometimes anything."""
    good = [value for value in POOL if check(value) is None]
    return st.one_of(*[st.sampled_from(good)] * 3, values) if good else values


def table(
    keys: dict[str, config.Check], special: dict[str, st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[Any]:
    """A table of this schema's keys, now and then with unknown ones, or now and then not a table."""
    special = special or {}
    fields = {key: special[key] if key in special else field(check) for key, check in keys.items()}
    known = st.fixed_dictionaries({}, optional=fields)
    unknown = st.builds(lambda a, b: {**a, **b}, known, st.dictionaries(st.text(max_size=6), values, max_size=2))
    return st.one_of(known, known, known, known, unknown, values)


passwords = st.one_of(
    st.builds(lambda a, b: a + MARKER + b, strings, strings),
    st.just(MARKER_NUMBER),
    st.just(float(MARKER_NUMBER)),
    st.just([MARKER]),
    st.just({"x": MARKER}),
    st.just(MARKER + "\udcff"),
    st.just(MARKER * 10_000),
    st.just(MARKER + "\x00"),
)
topics = st.dictionaries(strings, table(config._TOPIC_KEYS), max_size=3)
mqtt = table(
    config._MQTT_KEYS,
    {
        "password": passwords,
        "password_env": st.just("PW"),
        "topics": topics | values,
        "tls": table(config._TLS_KEYS),
        "will": table(config._WILL_KEYS),
        "birth": table(config._ANNOUNCEMENT_KEYS),
    },
)
mappings = st.fixed_dictionaries(
    {},
    optional={
        "mqtt": mqtt,
        "workers": table(config._WORKERS_KEYS),
        "metrics": table(config._METRICS_KEYS),
        "app": values,
        "other": values,
    },
)
environs = st.fixed_dictionaries({}, optional={"PW": passwords.filter(lambda p: isinstance(p, str))})


def _assert_clean(message: str, secrets: tuple[str, ...]) -> None:
    """One line, and none of the secrets in it."""
    assert message and "\n" not in message, repr(message)
    for secret in secrets:
        assert secret not in message, message


def _secrets(password: Any) -> tuple[str, ...]:
    """The texts that would give ``password`` away (too short a one would match by chance)."""
    return tuple(text for text in (str(password), repr(password)) if len(text) >= 6)


def _password_in(content: bytes) -> Any:
    """The [mqtt] password the file sets, if it parses (elsewhere the same text is no secret)."""
    try:
        mqtt = tomllib.loads(content.decode()).get("mqtt")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return None
    return mqtt.get("password") if isinstance(mqtt, dict) else None


@FUZZ
@given(data=mappings, environ=environs)
def test_from_mapping_returns_a_config_or_one_config_error(data, environ):
    try:
        cfg = config.from_mapping(data, "fuzz.toml", environ=environ)
    except ConfigError as exc:
        _assert_clean(str(exc), MARKERS)
        return
    assert isinstance(cfg, config.Config)
    assert MARKER not in repr(cfg) and str(MARKER_NUMBER) not in repr(cfg)
    try:
        config.with_overrides(cfg, workers=3)
    except ConfigError as exc:
        _assert_clean(str(exc), MARKERS)


toml_pieces = st.sampled_from(
    [
        b"[mqtt]\n",
        b"[workers]\n",
        b"[mqtt.topics]\n",
        b"[mqtt.tls]\n",
        b"[app]\n",
        b"host = 'h'\n",
        b"port = 1883\n",
        b"connect_timeout = inf\n",
        b"timeout = nan\n",
        b"count = 4\n",
        b"'a/#' = { qos = 1 }\n",
        b"password = 739173917391\n",
        b"password = 'PW-7f3a9c'\n",
        b"x = [[[[1]]]]\n",
        b"a = {b = {c = 1}}\n",
        b"\xff\xfe",
        b"\x00",
        b"\n",
        b"= = =\n",
        b"client_id = '" + b"c" * 70_000 + b"'\n",
    ]
)
files = st.one_of(st.binary(max_size=200), st.lists(toml_pieces | st.binary(max_size=8), max_size=12).map(b"".join))


@FUZZ
@given(content=files)
def test_any_file_gives_a_config_or_one_config_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "procmqtt.toml"
    path.write_bytes(content)
    try:
        cfg = config.resolve(str(path), environ={})
    except ConfigError as exc:
        password = _password_in(content)
        _assert_clean(str(exc), _secrets(password) if password is not None else ())
        return
    assert isinstance(cfg, config.Config)


env_names = st.sampled_from([*sorted(config.env_variables()), "PROCMQTT_MQTT_HOTS", "PROCMQTT_APP_X"])


@FUZZ
@given(environ=st.dictionaries(env_names, strings, max_size=4))
def test_any_environment_gives_a_config_or_one_config_error(environ):
    try:
        cfg = config.resolve(os.devnull, environ=environ)
    except ConfigError as exc:
        _assert_clean(str(exc), ())
        return
    assert isinstance(cfg, config.Config)
