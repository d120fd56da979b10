"""Configuration: frozen value objects, loaded from TOML and checked once, in the supervisor.

Every check happens at load time, so a mistake stops ``procmqtt`` before any process is forked,
with one line that names the file, the key and what was expected.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import socket
import ssl
import sys
import types
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from procmqtt.agent.dispatch import DISPATCHERS
from procmqtt.errors import ConfigError
from procmqtt.ipc.shared import MAX_SLOTS
from procmqtt.topics import filter_problem, topic_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_PATH = "procmqtt.toml"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TRANSPORT = "tcp"
DEFAULT_WS_PATH = "/mqtt"
TRANSPORTS = ("tcp", "websockets")
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
DEFAULT_MAX_INFLIGHT = 1_000  # MQTT 3.1.1: paho's own 20 holds back an agent publishing for many workers
DEFAULT_MAX_INFLIGHT_V5 = 20  # MQTT 5 brokers announce a Receive Maximum (Mosquitto 20, HiveMQ 10)
DEFAULT_METRICS_HOST = "127.0.0.1"  # loopback: the numbers are for this host unless asked otherwise

ON_ERROR = ("ack", "retry")
MAX_PUBLISH_BUFFER = 60_000  # per worker: what the agent may hold for each (outbox.py), not paho's ids

PROTOCOLS = ("3.1.1", "5")

MAX_SECONDS = 1_000_000  # every duration: finite, and within what socket and select timeouts accept
MAX_MQTT_STRING = 65_535  # client id, user name, password, will payload: a 2-byte length on the wire
MAX_MQTT_PACKET = 268_435_455  # the largest remaining length MQTT can encode (the birth message)
MAX_FILE_BYTES = 16 * 2**20  # a configuration file; -c /dev/zero is a mistake, not a wait


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
class TlsConfig:
    """``[mqtt.tls]``: present means TLS. Certificates are checked by default (``insecure`` off)."""

    ca_certs: str | None = None  # None: the system's trusted CAs
    certfile: str | None = None  # client certificate, for mutual TLS
    keyfile: str | None = None  # its key, when not inside certfile
    insecure: bool = False  # skip the host name check (never in production)


@dataclass(frozen=True)
class Announcement:
    """``[mqtt.will]`` and ``[mqtt.birth]``: one message about this app's presence."""

    topic: str
    payload: str = ""
    qos: int = 0
    retain: bool = False


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
    max_inflight: int | None = None  # QoS 1/2 publishes unacknowledged at once; see inflight()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    transport: str = DEFAULT_TRANSPORT
    ws_path: str = DEFAULT_WS_PATH  # the HTTP path of the websockets endpoint
    share_group: str | None = None
    topics: tuple[Subscription, ...] = ()
    tls: TlsConfig | None = None
    will: Announcement | None = None
    birth: Announcement | None = None

    def inflight(self) -> int:
        """``max_inflight``, or its default for the protocol."""
        if self.max_inflight is not None:
            return self.max_inflight
        return DEFAULT_MAX_INFLIGHT_V5 if self.protocol == "5" else DEFAULT_MAX_INFLIGHT

    def wire_filter(self, topic_filter: str) -> str:
        """The filter as subscribed: inside ``$share/<share_group>/`` when a group is set."""
        if self.share_group and not topic_filter.startswith("$share/"):
            return f"$share/{self.share_group}/{topic_filter}"
        return topic_filter


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
class MetricsConfig:
    """``port`` None: no metrics endpoint (the default)."""

    port: int | None = None
    host: str = DEFAULT_METRICS_HOST


@dataclass(frozen=True)
class Config:
    """The loaded configuration; workers see it as ``self.config``."""

    mqtt: MqttConfig = MqttConfig()
    workers: WorkersConfig = WorkersConfig()
    metrics: MetricsConfig = MetricsConfig()
    app: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    source: str = "<defaults>"
    origins: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}),
                                       repr=False, compare=False)
    """Where each value that is not a default came from: "mqtt.host" -> "PROCMQTT_MQTT_HOST", say."""


# --- validation -------------------------------------------------------------------------------

Check = Callable[[Any], str | None]  # returns what was expected, or None when the value is fine


def _integer(lo: int, hi: int | None = None) -> Check:
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        return None if ok else expected
    return check


def _seconds(lo: float) -> Check:
    """A duration: a bounded range also refuses inf and nan (which compare false with both ends)."""
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= MAX_SECONDS
        return None if ok else f"a number of seconds from {lo:g} to {MAX_SECONDS}"
    return check


def _string_problem(v: str, max_bytes: int | None = None, *, nul: bool = False) -> str | None:
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


def _text(v: Any) -> str | None:
    return _string_problem(v) if isinstance(v, str) and v else "a non-empty string"


def _mqtt_text(v: Any) -> str | None:
    """A value that goes on the wire as an MQTT string (client id, user name)."""
    return _string_problem(v, MAX_MQTT_STRING) if isinstance(v, str) and v else "a non-empty string"


def _password_text(v: Any) -> str | None:
    """The password is binary data in MQTT: a NUL is allowed, the 2-byte length limit is not lifted."""
    return _string_problem(v, MAX_MQTT_STRING, nul=True) if isinstance(v, str) and v else "a non-empty string"


def _payload(max_bytes: int | None) -> Check:
    def check(v: Any) -> str | None:
        return _string_problem(v, max_bytes, nul=True) if isinstance(v, str) else "a string"
    return check


def _topic_name(v: Any) -> str | None:
    problem = _string_problem(v) if isinstance(v, str) else None  # first: topic_problem's encode() would raise
    problem = problem or topic_problem(v)
    return f"a topic name to publish to ({problem})" if problem else None


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _share_group(v: Any) -> str | None:
    ok = isinstance(v, str) and v and not any(c in v for c in "/+#")
    return _string_problem(v) if ok else "a non-empty name without '/', '+' or '#'"


def _one_of(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else "one of " + ", ".join(f'"{o}"' for o in options)
    return check


def _table(v: Any) -> str | None:
    """A sub-table (``[mqtt.topics]``, ``[mqtt.tls]``...): set in TOML only, never from one environment variable."""
    return None if isinstance(v, dict) else "a table"


_MQTT_KEYS: dict[str, Check] = {
    "host": _text,
    "port": _integer(1, 65535),
    "client_id": _mqtt_text,
    "username": _mqtt_text,
    "password": _password_text,
    "password_env": _text,
    "password_file": _text,
    "keepalive": _integer(1, 65535),
    "protocol": _one_of(*PROTOCOLS),
    "clean_session": _boolean,
    "session_expiry": _integer(0, 2**32 - 1),
    "publish_buffer": _integer(1, MAX_PUBLISH_BUFFER),
    "publish_timeout": _seconds(0),
    "max_inflight": _integer(1, 65535),
    "connect_timeout": _seconds(0.1),
    "transport": _one_of(*TRANSPORTS),
    "ws_path": lambda v: _string_problem(v) if isinstance(v, str) and v.startswith("/") else "a path starting with '/'",
    "share_group": _share_group,
    "topics": _table,
    "tls": _table,
    "will": _table,
    "birth": _table,
}
_TLS_KEYS: dict[str, Check] = {"ca_certs": _text, "certfile": _text, "keyfile": _text, "insecure": _boolean}
_ANNOUNCEMENT_KEYS: dict[str, Check] = {"topic": _topic_name, "payload": _payload(None),
                                        "qos": _integer(0, 2), "retain": _boolean}
_WILL_KEYS = {**_ANNOUNCEMENT_KEYS, "payload": _payload(MAX_MQTT_STRING)}  # inside CONNECT: a 2-byte length
_WORKERS_KEYS: dict[str, Check] = {
    "count": _integer(1, MAX_SLOTS),
    "dispatch": _one_of(*DISPATCHERS),
    "prefetch": _integer(1, 65535),
    "graceful_timeout": _seconds(0),
    "timeout": _seconds(0),
    "max_attempts": _integer(1, 1000),
    "on_error": _one_of(*ON_ERROR),
    "dead_letter_topic": _topic_name,
    "max_messages": _integer(0),
    "max_messages_jitter": _integer(0),
    "max_memory_mb": _integer(0),
    "concurrency": _integer(1, MAX_CONCURRENCY),
}
_METRICS_KEYS: dict[str, Check] = {
    "port": _integer(1, 65535),
    "host": _text,
}
_TOPIC_KEYS: dict[str, Check] = {"qos": _integer(0, 2)}
_SECTIONS = {"mqtt": _MQTT_KEYS, "workers": _WORKERS_KEYS, "metrics": _METRICS_KEYS, "app": {}}


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) <= 60:
        return text
    size = f" ({len(value.encode(errors='replace')):,} UTF-8 bytes)" if isinstance(value, str) else ""
    return text[:57] + "..." + size


_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}


def _kind(value: Any) -> str:
    """What a secret is, without its value (nor its length)."""
    return _KINDS.get(type(value), "a TOML value") + " (value not shown)"


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
            got = _kind(value) if key in _SECRET_NAMES else _show(value)
            raise ConfigError(f"{source}: {where} {key}: expected {expected}, got {got}")
    return dict(table)


def _password(source: str, mqtt: dict[str, Any], environ: Mapping[str, str]) -> Secret | None:
    given = [k for k in ("password", "password_env", "password_file") if k in mqtt]
    if len(given) > 1:
        raise ConfigError(f"{source}: [mqtt] set only one of password, password_env, password_file "
                          f"(found {', '.join(given)})")
    if "password" in mqtt:
        return Secret(mqtt["password"])
    if "password_env" in mqtt:
        name = mqtt["password_env"]
        if name not in environ:
            raise ConfigError(f"{source}: [mqtt] password_env: environment variable {name} is not set")
        return _secret(f"{source}: [mqtt] password_env: environment variable {name}", environ[name])
    if "password_file" in mqtt:
        path = mqtt["password_file"]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_MQTT_STRING + 3)  # enough to tell "too long", however big the file
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ConfigError(f"{source}: [mqtt] password_file: cannot read {path}: {reason}") from None
        return _secret(f"{source}: [mqtt] password_file: {path}", text.rstrip("\r\n"))
    return None


def _secret(where: str, value: str) -> Secret:
    """A password read from elsewhere, checked like ``[mqtt] password`` and never shown."""
    expected = _string_problem(value, MAX_MQTT_STRING, nul=True)  # empty stays allowed, as before
    if expected:
        raise ConfigError(f"{where}: expected a password of {expected}, got {_kind(value)}")
    return Secret(value)


def _subscriptions(source: str, topics: dict[str, Any], share_group: str | None) -> tuple[Subscription, ...]:
    subs = []
    for topic_filter, options in topics.items():
        shown = str(topic_filter) if len(str(topic_filter)) <= 60 else f"{str(topic_filter)[:57]}..."
        where = f'[mqtt.topics] "{shown}"'
        problem = _string_problem(topic_filter) if isinstance(topic_filter, str) else None
        wire = f"$share/{share_group}/{topic_filter}" if share_group and isinstance(topic_filter, str) else ""
        problem = problem or filter_problem(topic_filter) or (filter_problem(wire) if wire else None)
        if problem:
            raise ConfigError(f"{source}: {where}: expected a valid MQTT topic filter ({problem})")
        options = _checked(source, where, options, _TOPIC_KEYS, "expected a table like { qos = 1 }")
        subs.append(Subscription(topic_filter, options.get("qos", 0)))
    return tuple(subs)


def _tls(source: str, table: Any) -> TlsConfig | None:
    if table is None:
        return None
    tls = _checked(source, "[mqtt.tls]", table, _TLS_KEYS)
    for key in ("ca_certs", "certfile", "keyfile"):
        path = tls.get(key)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{source}: [mqtt.tls] {key}: cannot read {path}")
    if "keyfile" in tls and "certfile" not in tls:
        raise ConfigError(f"{source}: [mqtt.tls] keyfile needs certfile (the client certificate)")
    _load_certificates(source, tls)
    return TlsConfig(**tls)


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    raise _EncryptedKey  # paho would ask for it on the terminal, in the agent, at every connect


def _load_certificates(source: str, tls: dict[str, Any]) -> None:
    """Load the files as paho will, so that a file that is not a certificate (or a key that does
    not match) is a one-line error now instead of a failure in the agent on every connect."""
    context = ssl.create_default_context()
    ca, cert, key = tls.get("ca_certs"), tls.get("certfile"), tls.get("keyfile")
    try:
        if ca is not None:
            context.load_verify_locations(cafile=ca)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"{source}: [mqtt.tls] ca_certs: {ca}: expected PEM certificates of the CAs "
                          f"to trust ({_ssl_reason(exc)})") from None
    if cert is None:
        return
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(f"{source}: [mqtt.tls] {'keyfile' if key else 'certfile'}: {key or cert}: the "
                          "private key is encrypted; procmqtt needs it unencrypted (readable by its user "
                          "only)") from None
    except (OSError, ValueError) as exc:
        keyfile = f"keyfile {key}" if key else "keyfile"
        raise ConfigError(f"{source}: [mqtt.tls] certfile: {cert}: expected a PEM client certificate with its "
                          f"private key (there, or in {keyfile}) ({_ssl_reason(exc)})") from None


def _ssl_reason(exc: Exception) -> str:
    """OpenSSL's short reason ("NO_CERTIFICATE_OR_CRL_FOUND"), else the OS error, without _ssl.c:NNN."""
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    if "PEM lib" in str(reason):  # OpenSSL's whole explanation of a file without the PEM blocks
        return "no PEM certificate and key found"
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(reason))


def _announcement(source: str, name: str, table: Any) -> Announcement | None:
    if table is None:
        return None
    where = f"[mqtt.{name}]"
    checked = _checked(source, where, table, _WILL_KEYS if name == "will" else _ANNOUNCEMENT_KEYS)
    if "topic" not in checked:
        raise ConfigError(f"{source}: {where} topic: required (the topic the message goes to)")
    size = 4 + len(checked["topic"].encode()) + len(checked.get("payload", "").encode())
    if size > MAX_MQTT_PACKET:  # a PUBLISH: topic, its length and a packet id, then the payload
        raise ConfigError(f"{source}: {where} payload: expected at most {MAX_MQTT_PACKET:,} bytes with "
                          f"the topic (the MQTT limit), got {size:,}")
    return Announcement(**checked)


def from_mapping(data: Mapping[str, Any], source: str = "<config>",
                 environ: Mapping[str, str] | None = None) -> Config:
    """Build a checked ``Config`` from parsed TOML (or any mapping of the same shape).

    ``environ`` (default ``os.environ``) is where ``password_env`` is looked up.
    """
    for key in data:
        if key not in _SECTIONS:
            raise _unknown(source, "", key, _SECTIONS)
    mqtt = _checked(source, "[mqtt]", data.get("mqtt", {}), _MQTT_KEYS)
    workers = _checked(source, "[workers]", data.get("workers", {}), _WORKERS_KEYS)
    _prefetch_for_concurrency(source, workers)
    metrics = _checked(source, "[metrics]", data.get("metrics", {}), _METRICS_KEYS)
    app = data.get("app", {})
    if not isinstance(app, dict):
        raise ConfigError(f"{source}: [app] must be a table, got {_show(app)}")
    plain = {k: v for k, v in mqtt.items()
             if k not in ("password", "password_env", "password_file", "topics", "tls", "will", "birth")}
    tls = _tls(source, mqtt.get("tls"))
    if tls is not None and "port" not in plain:
        plain["port"] = DEFAULT_TLS_PORT
    return Config(
        mqtt=MqttConfig(**plain, password=_password(source, mqtt, os.environ if environ is None else environ),
                        topics=_subscriptions(source, mqtt.get("topics", {}), mqtt.get("share_group")),
                        tls=tls,
                        will=_announcement(source, "will", mqtt.get("will")),
                        birth=_announcement(source, "birth", mqtt.get("birth"))),
        workers=WorkersConfig(**workers),
        metrics=MetricsConfig(**metrics),
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


def _read(path: str | None) -> tuple[dict[str, Any], str]:
    """The parsed TOML of ``path``, or of ``./procmqtt.toml`` when it exists, and its name."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return {}, Config.source
        path = DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError:  # a NUL in the path
        raise ConfigError(f"{path!r}: cannot read: not a file name") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: not a configuration file: larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        return tomllib.loads(raw.decode()), path
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a TOML file: byte {exc.start} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None


def load(path: str | None = None) -> Config:
    """Load ``path``, or ``./procmqtt.toml`` when no path is given and it exists, or defaults.

    The file alone: ``resolve`` adds the environment and the command line.
    """
    return from_mapping(*_read(path))


def with_overrides(config: Config, *, workers: int | None = None, broker: str | None = None) -> Config:
    """Apply command-line flags, which win over the file."""
    origins = dict(config.origins)
    if workers is not None:
        expected = _WORKERS_KEYS["count"](workers)
        if expected:
            raise ConfigError(f"--workers: expected {expected}, got {workers}")
        config = replace(config, workers=replace(config.workers, count=workers))
        origins["workers.count"] = "--workers"
    if broker is not None:
        mqtt = _broker_url(config.mqtt, broker)
        origins.update({f"mqtt.{key}": "--broker" for key in ("host", "port", "username")
                        if getattr(mqtt, key) != getattr(config.mqtt, key)})
        config = replace(config, mqtt=mqtt)
    return replace(config, origins=types.MappingProxyType(origins))


# --- the environment, and the whole precedence chain -------------------------------------------

ENV_PREFIX = "PROCMQTT_"
CONFIG_ENV = "PROCMQTT_CONFIG"
_PASSWORD_KEYS = ("password", "password_env", "password_file")
_SECRET_KEYS = {("mqtt", "password")}
_SECRET_NAMES = {key for _, key in _SECRET_KEYS}  # never shown, whatever their type
_INVALID = object()
_log = logging.getLogger("procmqtt.config")


def env_variables() -> dict[str, tuple[str, str]]:
    """Every settable variable, ``PROCMQTT_MQTT_HOST`` -> ("mqtt", "host").

    Derived from the schema tables, so a key or a section added there gets its variable for free;
    sub-tables (``[mqtt.topics]``) and the free-form ``[app]`` have none.
    """
    return {f"{ENV_PREFIX}{section}_{key}".upper(): (section, key)
            for section, keys in _SECTIONS.items() for key, check in keys.items() if check is not _table}


def _from_text(text: str, check: Check) -> Any:
    """The first reading of ``text`` that ``check`` accepts: as a string, an int, a float, a bool.

    Trying the key's own validator on each reading gives every key its type (``"1883"`` is an int
    for ``port``, ``"5"`` stays a string for ``protocol``) without a second schema.
    """
    readings: list[Any] = [text]
    for parse in (int, float):
        try:
            readings.append(parse(text))
        except ValueError:
            pass
    word = text.strip().lower()
    if word in ("true", "1", "false", "0"):
        readings.append(word in ("true", "1"))
    return next((value for value in readings if check(value) is None), _INVALID)


def from_environ(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The settings given as ``PROCMQTT_<SECTION>_<KEY>``, each checked, and the variable of each.

    A bad value is an error naming the variable; a variable under a known section that names no
    key is only a warning (with the nearest name), since the environment is shared with other tools.
    """
    known = env_variables()
    values: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    for name in sorted(environ):
        if name not in known:
            _warn_unknown(name, known)
            continue
        section, key = known[name]
        check = _SECTIONS[section][key]
        value = _from_text(environ[name], check)
        if value is _INVALID:
            secret = (section, key) in _SECRET_KEYS and environ[name]
            got = "'********'" if secret else _show(environ[name])
            raise ConfigError(f"{name}: expected {check(environ[name])}, got {got}")
        if key == "password_env" and value not in environ:
            raise ConfigError(f"{name}: environment variable {value} is not set")
        values.setdefault(section, {})[key] = value
        origins[f"{section}.{key}"] = name
    passwords = [f"{ENV_PREFIX}MQTT_{k.upper()}" for k in _PASSWORD_KEYS if k in values.get("mqtt", {})]
    if len(passwords) > 1:
        raise ConfigError(f"set only one of {', '.join(passwords)}")
    return values, origins


def _warn_unknown(name: str, known: Mapping[str, tuple[str, str]]) -> None:
    rest = name[len(ENV_PREFIX):].lower() if name.startswith(ENV_PREFIX) else ""
    section = next((s for s in sorted(_SECTIONS, key=len, reverse=True) if rest.startswith(s + "_")), None)
    if section is None:
        return  # PROCMQTT_CONFIG, PROCMQTT_LOG_FORMAT, or not ours
    key = rest[len(section) + 1:]
    tables = [k for k, check in _SECTIONS[section].items() if check is _table]
    if not _SECTIONS[section] or any(key == t or key.startswith(t + "_") for t in tables):
        table = next((f"{section}.{t}" for t in tables if key.startswith(t)), section)
        _log.warning("%s: ignored; [%s] is set in the configuration file only", name, table)
        return
    close = difflib.get_close_matches(name, [v for v, (s, _) in known.items() if s == section], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    _log.warning("%s: not a procmqtt setting, ignored%s", name, hint)


def resolve(path: str | None = None, *, environ: Mapping[str, str] | None = None,
            workers: int | None = None, broker: str | None = None) -> Config:
    """The effective configuration: defaults < TOML file < environment < command line.

    ``path`` is ``-c``; without it ``PROCMQTT_CONFIG``, then ``./procmqtt.toml``. Runs in the
    supervisor (and ``check``), before any fork; every mistake is one ``ConfigError`` line.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        try:
            data, source = _read(environ[CONFIG_ENV])
        except ConfigError as exc:
            raise ConfigError(f"{CONFIG_ENV}: {exc}") from None
    else:
        data, source = _read(path)
    env, env_origins = from_environ(environ)
    merged = {name: dict(table) if isinstance(table, dict) else table for name, table in data.items()}
    origins = {f"{name}.{key}": source for name, table in merged.items() if isinstance(table, dict)
               for key in table}
    for section, values in env.items():
        table = merged.setdefault(section, {})
        if not isinstance(table, dict):
            continue  # from_mapping names the file's mistake
        if section == "mqtt" and any(k in values for k in _PASSWORD_KEYS):
            for k in _PASSWORD_KEYS:  # the environment's password replaces the file's, whatever its form
                table.pop(k, None)
                origins.pop(f"mqtt.{k}", None)
        table.update(values)
    origins.update(env_origins)
    for k in _PASSWORD_KEYS[1:]:  # the one password value, whatever form it was given in
        if f"mqtt.{k}" in origins:
            origins["mqtt.password"] = f"{origins.pop(f'mqtt.{k}')} ({k})"
    config = replace(from_mapping(merged, source, environ), origins=types.MappingProxyType(origins))
    return with_overrides(config, workers=workers, broker=broker)


_SCHEMES = {  # scheme -> (TLS, transport, default port)
    "mqtt": (False, "tcp", DEFAULT_PORT), "tcp": (False, "tcp", DEFAULT_PORT),
    "mqtts": (True, "tcp", DEFAULT_TLS_PORT), "ssl": (True, "tcp", DEFAULT_TLS_PORT),
    "ws": (False, "websockets", 80), "wss": (True, "websockets", 443),
}


def _broker_url(mqtt: MqttConfig, url: str) -> MqttConfig:
    """``--broker``: the scheme decides TLS and transport; TLS certificates still come from [mqtt.tls]."""
    expected = "expected mqtt://, mqtts://, ws:// or wss:// followed by [user@]host[:port] (ws: [/path])"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"--broker: {expected}") from None
    if parts.password is not None:
        raise ConfigError("--broker: do not put a password in the URL (command lines are visible "
                          "in ps); use [mqtt] password_env or password_file")
    scheme = _SCHEMES.get(parts.scheme)
    websockets = scheme is not None and scheme[1] == "websockets"
    if scheme is None or not parts.hostname or (parts.path not in ("", "/") and not websockets):
        raise ConfigError(f"--broker: {expected}, got {_show(url)}")
    secure, transport, default_port = scheme
    tls = (mqtt.tls or TlsConfig()) if secure else None  # TlsConfig(): the system's CAs
    return replace(mqtt, host=parts.hostname, port=port or default_port, tls=tls, transport=transport,
                   ws_path=parts.path or DEFAULT_WS_PATH if websockets else mqtt.ws_path,
                   username=urllib.parse.unquote(parts.username) if parts.username else mqtt.username)


def default_client_id(app: str) -> str:
    """Stable across restarts (so a persistent session finds its messages), distinct per host and app."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32]
    return f"procmqtt-{host}-{hashlib.sha1(app.encode()).hexdigest()[:8]}"
