"""Configuration: frozen value objects, loaded from TOML and checked once, in the supervisor.

Every check happens at load time, so a mistake stops ``procmqtt`` before any process is forked,
with one line that names the file, the key and what was expected.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import socket
import sys
import types
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from .dispatch import DISPATCHERS
from .errors import ConfigError
from .shared import MAX_SLOTS
from .topics import filter_problem, topic_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_PATH = "procmqtt.toml"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 1883
DEFAULT_KEEPALIVE = 60
DEFAULT_PROTOCOL = "3.1.1"
DEFAULT_SESSION_EXPIRY = 3600
DEFAULT_WORKERS = 1
DEFAULT_DISPATCH = "random"
DEFAULT_PREFETCH = 16
DEFAULT_CONCURRENCY = 1
MAX_CONCURRENCY = 1000
DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_ON_ERROR = "ack"
DEFAULT_PUBLISH_BUFFER = 1_000
DEFAULT_PUBLISH_TIMEOUT = 30.0

ON_ERROR = ("ack", "retry")
MAX_PUBLISH_BUFFER = 60_000  # paho's message ids are 16-bit: workers x publish_buffer stays below 65,535

PROTOCOLS = ("3.1.1", "5")


@dataclass(frozen=True)
class Secret:
    """A password that never shows up in a repr, a log line or an error message."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True)
class Subscription:
    topic_filter: str
    qos: int = 0


@dataclass(frozen=True)
class MqttConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    client_id: str | None = None
    username: str | None = None
    password: Secret | None = None
    keepalive: int = DEFAULT_KEEPALIVE
    protocol: str = DEFAULT_PROTOCOL
    clean_session: bool = False
    session_expiry: int = DEFAULT_SESSION_EXPIRY
    publish_buffer: int = DEFAULT_PUBLISH_BUFFER
    publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT
    topics: tuple[Subscription, ...] = ()


@dataclass(frozen=True)
class WorkersConfig:
    count: int = DEFAULT_WORKERS
    dispatch: str = DEFAULT_DISPATCH
    prefetch: int = DEFAULT_PREFETCH
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    timeout: float = DEFAULT_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    on_error: str = DEFAULT_ON_ERROR
    dead_letter_topic: str | None = None
    max_messages: int = 0
    max_messages_jitter: int = 0
    max_memory_mb: int = 0
    concurrency: int = DEFAULT_CONCURRENCY  # messages in flight per worker, for async handlers


@dataclass(frozen=True)
class Config:
    """The loaded configuration; workers see it as ``self.config``."""

    mqtt: MqttConfig = MqttConfig()
    workers: WorkersConfig = WorkersConfig()
    app: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    source: str = "<defaults>"


# --- validation -------------------------------------------------------------------------------

Check = Callable[[Any], str | None]  # returns what was expected, or None when the value is fine


def _integer(lo: int, hi: int | None = None) -> Check:
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        return None if ok else expected
    return check


def _number(lo: float) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo
        return None if ok else f"a number >= {lo:g}"
    return check


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "a non-empty string"


def _topic_name(v: Any) -> str | None:
    problem = topic_problem(v)
    return f"a topic name to publish to ({problem})" if problem else None


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _one_of(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else "one of " + ", ".join(f'"{o}"' for o in options)
    return check


_MQTT_KEYS: dict[str, Check] = {
    "host": _text,
    "port": _integer(1, 65535),
    "client_id": _text,
    "username": _text,
    "password": _text,
    "password_env": _text,
    "password_file": _text,
    "keepalive": _integer(1, 65535),
    "protocol": _one_of(*PROTOCOLS),
    "clean_session": _boolean,
    "session_expiry": _integer(0, 2**32 - 1),
    "publish_buffer": _integer(1, MAX_PUBLISH_BUFFER),
    "publish_timeout": _number(0),
    "topics": lambda v: None if isinstance(v, dict) else "a table of topic filters",
}
_WORKERS_KEYS: dict[str, Check] = {
    "count": _integer(1, MAX_SLOTS),
    "dispatch": _one_of(*DISPATCHERS),
    "prefetch": _integer(1, 65535),
    "graceful_timeout": _number(0),
    "timeout": _number(0),
    "max_attempts": _integer(1, 1000),
    "on_error": _one_of(*ON_ERROR),
    "dead_letter_topic": _topic_name,
    "max_messages": _integer(0),
    "max_messages_jitter": _integer(0),
    "max_memory_mb": _integer(0),
    "concurrency": _integer(1, MAX_CONCURRENCY),
}
_TOPIC_KEYS: dict[str, Check] = {"qos": _integer(0, 2)}
_SECTIONS = {"mqtt": _MQTT_KEYS, "workers": _WORKERS_KEYS, "app": {}}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown(source: str, where: str, key: str, known: Mapping[str, Any]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; expected one of: {', '.join(known)}"
    return ConfigError(f"{source}: {where}unknown key '{key}'{hint}")


def _checked(source: str, where: str, table: Any, keys: Mapping[str, Check],
             not_a_table: str = "must be a table") -> dict[str, Any]:
    """The table's values, each checked against ``keys``; ``where`` names the table in errors."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} {not_a_table}, got {_show(table)}")
    for key, value in table.items():
        if key not in keys:
            raise _unknown(source, f"{where} ", key, keys)
        expected = keys[key](value)
        if expected:
            raise ConfigError(f"{source}: {where} {key}: expected {expected}, got {_show(value)}")
    return dict(table)


def _password(source: str, mqtt: dict[str, Any]) -> Secret | None:
    given = [k for k in ("password", "password_env", "password_file") if k in mqtt]
    if len(given) > 1:
        raise ConfigError(f"{source}: [mqtt] set only one of password, password_env, password_file "
                          f"(found {', '.join(given)})")
    if "password" in mqtt:
        return Secret(mqtt["password"])
    if "password_env" in mqtt:
        name = mqtt["password_env"]
        if name not in os.environ:
            raise ConfigError(f"{source}: [mqtt] password_env: environment variable {name} is not set")
        return Secret(os.environ[name])
    if "password_file" in mqtt:
        path = mqtt["password_file"]
        try:
            with open(path, encoding="utf-8") as f:
                return Secret(f.read().rstrip("\r\n"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ConfigError(f"{source}: [mqtt] password_file: cannot read {path}: {reason}") from None
    return None


def _subscriptions(source: str, topics: dict[str, Any]) -> tuple[Subscription, ...]:
    subs = []
    for topic_filter, options in topics.items():
        where = f'[mqtt.topics] "{topic_filter}"'
        problem = filter_problem(topic_filter)
        if problem:
            raise ConfigError(f"{source}: {where}: expected a valid MQTT topic filter ({problem})")
        options = _checked(source, where, options, _TOPIC_KEYS, "expected a table like { qos = 1 }")
        subs.append(Subscription(topic_filter, options.get("qos", 0)))
    return tuple(subs)


def from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Build a checked ``Config`` from parsed TOML (or any mapping of the same shape)."""
    for key in data:
        if key not in _SECTIONS:
            raise _unknown(source, "", key, _SECTIONS)
    mqtt = _checked(source, "[mqtt]", data.get("mqtt", {}), _MQTT_KEYS)
    workers = _checked(source, "[workers]", data.get("workers", {}), _WORKERS_KEYS)
    _prefetch_for_concurrency(source, workers)
    app = data.get("app", {})
    if not isinstance(app, dict):
        raise ConfigError(f"{source}: [app] must be a table, got {_show(app)}")
    plain = {k: v for k, v in mqtt.items()
             if k not in ("password", "password_env", "password_file", "topics")}
    return Config(
        mqtt=MqttConfig(**plain, password=_password(source, mqtt),
                        topics=_subscriptions(source, mqtt.get("topics", {}))),
        workers=WorkersConfig(**workers),
        app=types.MappingProxyType(app),
        source=source,
    )


def _prefetch_for_concurrency(source: str, workers: dict[str, Any]) -> None:
    """A worker holds at most ``prefetch`` messages, so it could never have more in flight: raise an
    unset prefetch to ``concurrency``, refuse a smaller one that was set."""
    concurrency = workers.get("concurrency", DEFAULT_CONCURRENCY)
    if "prefetch" not in workers:
        workers["prefetch"] = max(DEFAULT_PREFETCH, concurrency)
    elif workers["prefetch"] < concurrency:
        raise ConfigError(f"{source}: [workers] prefetch ({workers['prefetch']}) must be at least "
                          f"concurrency ({concurrency}): a worker can only run the messages it holds")


def load(path: str | None = None) -> Config:
    """Load ``path``, or ``./procmqtt.toml`` when no path is given and it exists, or defaults."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return Config()
        path = DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_mapping(data, path)


def with_overrides(config: Config, *, workers: int | None = None, broker: str | None = None) -> Config:
    """Apply command-line flags, which win over the file, then check limits that span sections."""
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers: expected an integer >= 1, got {workers}")
        config = replace(config, workers=replace(config.workers, count=workers))
    if broker is not None:
        config = replace(config, mqtt=_broker_url(config.mqtt, broker))
    total = config.workers.count * config.mqtt.publish_buffer
    if total > MAX_PUBLISH_BUFFER:
        raise ConfigError(f"{config.source}: [mqtt] publish_buffer ({config.mqtt.publish_buffer}) x worker count "
                          f"({config.workers.count}) = {total} unconfirmed publishes, more than paho can number "
                          f"(at most {MAX_PUBLISH_BUFFER}); lower publish_buffer")
    return config


def _broker_url(mqtt: MqttConfig, url: str) -> MqttConfig:
    expected = "expected mqtt://[user@]host[:port]"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"--broker: {expected}") from None
    if parts.password is not None:
        raise ConfigError("--broker: do not put a password in the URL (command lines are visible "
                          "in ps); use [mqtt] password_env or password_file")
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"--broker: {expected}, got {_show(url)}")
    return replace(mqtt, host=parts.hostname, port=port or DEFAULT_PORT,
                   username=urllib.parse.unquote(parts.username) if parts.username else mqtt.username)


def default_client_id(app: str) -> str:
    """Stable across restarts (so a persistent session finds its messages), distinct per host and app."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32]
    return f"procmqtt-{host}-{hashlib.sha1(app.encode()).hexdigest()[:8]}"
