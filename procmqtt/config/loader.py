"""Loading: a TOML file into a checked ``Config``, and the command-line flags over it.

Every check happens here, in the supervisor (and ``check``) before any fork, so a mistake stops
``procmqtt`` with one line that names the file, the key and what was expected. The keys and their
checks come from ``schema.py``; only what spans keys (the password's forms, TLS files, the will's
size, prefetch against concurrency) is written out here.
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
import sys
import types
import urllib.parse
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from procmqtt.config.checks import (
    MAX_MQTT_PACKET,
    MAX_MQTT_STRING,
    Check,
    string_problem,
    subtable,
)
from procmqtt.config.schema import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PATH,
    DEFAULT_PORT,
    DEFAULT_PREFETCH,
    DEFAULT_RETRY_DELAY,
    DEFAULT_RETRY_MAX_DELAY,
    DEFAULT_TLS_PORT,
    DEFAULT_WS_PATH,
    KEYS,
    PASSWORD_KEYS,
    SECRET_NAMES,
    SECTIONS,
    SUBTABLES,
)
from procmqtt.config.values import (
    Announcement,
    Config,
    MetricsConfig,
    MqttConfig,
    Secret,
    Subscription,
    TlsConfig,
    WorkersConfig,
)
from procmqtt.errors import ConfigError
from procmqtt.topics import filter_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

MAX_FILE_BYTES = 16 * 2**20  # a configuration file; -c /dev/zero is a mistake, not a wait
_AS_GIVEN = {
    s: tuple(
        k.name for k in KEYS if k.section == s and k.field and k.check is not subtable and k.name not in PASSWORD_KEYS
    )
    for s in SECTIONS
}
"""The keys of each table that go into its dataclass as they are (not a password form, not a table)."""


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


def _checked(
    source: str, where: str, table: Any, keys: Mapping[str, Check], not_a_table: str = "must be a table"
) -> dict[str, Any]:
    """The table's values, each checked against ``keys``; ``where`` names the table in errors."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} {not_a_table}, got {_show(table)}")
    for key, value in table.items():
        if key not in keys:
            raise _unknown(source, f"{where} ", key, keys)
        expected = keys[key](value)
        if expected:
            got = _kind(value) if key in SECRET_NAMES else _show(value)
            raise ConfigError(f"{source}: {where} {key}: expected {expected}, got {got}")
    return dict(table)


def _password(source: str, mqtt: dict[str, Any], environ: Mapping[str, str]) -> Secret | None:
    given = [k for k in PASSWORD_KEYS if k in mqtt]
    if len(given) > 1:
        raise ConfigError(
            f"{source}: [mqtt] set only one of password, password_env, password_file (found {', '.join(given)})"
        )
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
    expected = string_problem(value, MAX_MQTT_STRING, nul=True)  # empty stays allowed, as before
    if expected:
        raise ConfigError(f"{where}: expected a password of {expected}, got {_kind(value)}")
    return Secret(value)


def _subscriptions(source: str, topics: dict[str, Any], share_group: str | None) -> tuple[Subscription, ...]:
    subs = []
    for topic_filter, options in topics.items():
        shown = str(topic_filter) if len(str(topic_filter)) <= 60 else f"{str(topic_filter)[:57]}..."
        where = f'[mqtt.topics] "{shown}"'
        problem = string_problem(topic_filter) if isinstance(topic_filter, str) else None
        wire = f"$share/{share_group}/{topic_filter}" if share_group and isinstance(topic_filter, str) else ""
        problem = problem or filter_problem(topic_filter) or (filter_problem(wire) if wire else None)
        if problem:
            raise ConfigError(f"{source}: {where}: expected a valid MQTT topic filter ({problem})")
        options = _checked(source, where, options, SUBTABLES["mqtt.topics"], "expected a table like { qos = 1 }")
        subs.append(Subscription(topic_filter, options.get("qos", 0)))
    return tuple(subs)


def _tls(source: str, table: Any) -> TlsConfig | None:
    if table is None:
        return None
    tls = _checked(source, "[mqtt.tls]", table, SUBTABLES["mqtt.tls"])
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
        raise ConfigError(
            f"{source}: [mqtt.tls] ca_certs: {ca}: expected PEM certificates of the CAs to trust ({_ssl_reason(exc)})"
        ) from None
    if cert is None:
        return
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(
            f"{source}: [mqtt.tls] {'keyfile' if key else 'certfile'}: {key or cert}: the "
            "private key is encrypted; procmqtt needs it unencrypted (readable by its user "
            "only)"
        ) from None
    except (OSError, ValueError) as exc:
        keyfile = f"keyfile {key}" if key else "keyfile"
        raise ConfigError(
            f"{source}: [mqtt.tls] certfile: {cert}: expected a PEM client certificate with its "
            f"private key (there, or in {keyfile}) ({_ssl_reason(exc)})"
        ) from None


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
    checked = _checked(source, where, table, SUBTABLES[f"mqtt.{name}"])
    if "topic" not in checked:
        raise ConfigError(f"{source}: {where} topic: required (the topic the message goes to)")
    size = 4 + len(checked["topic"].encode()) + len(checked.get("payload", "").encode())
    if size > MAX_MQTT_PACKET:  # a PUBLISH: topic, its length and a packet id, then the payload
        raise ConfigError(
            f"{source}: {where} payload: expected at most {MAX_MQTT_PACKET:,} bytes with "
            f"the topic (the MQTT limit), got {size:,}"
        )
    return Announcement(**checked)


def from_mapping(data: Mapping[str, Any], source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Build a checked ``Config`` from parsed TOML (or any mapping of the same shape).

    ``environ`` (default ``os.environ``) is where ``password_env`` is looked up.
    """
    for key in data:
        if key not in SECTIONS:
            raise _unknown(source, "", key, SECTIONS)
    mqtt = _checked(source, "[mqtt]", data.get("mqtt", {}), SECTIONS["mqtt"])
    workers = _checked(source, "[workers]", data.get("workers", {}), SECTIONS["workers"])
    _prefetch_for_concurrency(source, workers)
    if "middleware" in workers:  # a TOML list, or names joined by commas from the environment
        given = workers["middleware"]
        workers["middleware"] = tuple(n.strip() for n in (given.split(",") if isinstance(given, str) else given))
    _retry_delays(source, workers)
    metrics = _checked(source, "[metrics]", data.get("metrics", {}), SECTIONS["metrics"])
    app = data.get("app", {})
    if not isinstance(app, dict):
        raise ConfigError(f"{source}: [app] must be a table, got {_show(app)}")
    plain = {k: v for k, v in mqtt.items() if k in _AS_GIVEN["mqtt"]}
    tls = _tls(source, mqtt.get("tls"))
    if tls is not None and "port" not in plain:
        plain["port"] = DEFAULT_TLS_PORT
    return Config(
        mqtt=MqttConfig(
            **plain,
            password=_password(source, mqtt, os.environ if environ is None else environ),
            topics=_subscriptions(source, mqtt.get("topics", {}), mqtt.get("share_group")),
            tls=tls,
            will=_announcement(source, "will", mqtt.get("will")),
            birth=_announcement(source, "birth", mqtt.get("birth")),
        ),
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
        raise ConfigError(
            f"{source}: [workers] prefetch ({workers['prefetch']}) must be at least "
            f"concurrency ({concurrency}): a worker can only run the messages it holds"
        )


def _retry_delays(source: str, workers: dict[str, Any]) -> None:
    """The cap must not cut the first wait short: refuse a ``retry_max_delay`` below ``retry_delay``."""
    delay = workers.get("retry_delay", DEFAULT_RETRY_DELAY)
    cap = workers.get("retry_max_delay", DEFAULT_RETRY_MAX_DELAY)
    if cap < delay:
        raise ConfigError(f"{source}: [workers] retry_max_delay ({cap:g}) must be at least retry_delay ({delay:g})")


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
        expected = SECTIONS["workers"]["count"](workers)
        if expected:
            raise ConfigError(f"--workers: expected {expected}, got {workers}")
        config = replace(config, workers=replace(config.workers, count=workers))
        origins["workers.count"] = "--workers"
    if broker is not None:
        mqtt = _broker_url(config.mqtt, broker)
        origins.update(
            {
                f"mqtt.{key}": "--broker"
                for key in ("host", "port", "username")
                if getattr(mqtt, key) != getattr(config.mqtt, key)
            }
        )
        config = replace(config, mqtt=mqtt)
    return replace(config, origins=types.MappingProxyType(origins))


_SCHEMES = {  # scheme -> (TLS, transport, default port)
    "mqtt": (False, "tcp", DEFAULT_PORT),
    "tcp": (False, "tcp", DEFAULT_PORT),
    "mqtts": (True, "tcp", DEFAULT_TLS_PORT),
    "ssl": (True, "tcp", DEFAULT_TLS_PORT),
    "ws": (False, "websockets", 80),
    "wss": (True, "websockets", 443),
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
        raise ConfigError(
            "--broker: do not put a password in the URL (command lines are visible "
            "in ps); use [mqtt] password_env or password_file"
        )
    scheme = _SCHEMES.get(parts.scheme)
    websockets = scheme is not None and scheme[1] == "websockets"
    if scheme is None or not parts.hostname or (parts.path not in ("", "/") and not websockets):
        raise ConfigError(f"--broker: {expected}, got {_show(url)}")
    secure, transport, default_port = scheme
    tls = (mqtt.tls or TlsConfig()) if secure else None  # TlsConfig(): the system's CAs
    return replace(
        mqtt,
        host=parts.hostname,
        port=port or default_port,
        tls=tls,
        transport=transport,
        ws_path=parts.path or DEFAULT_WS_PATH if websockets else mqtt.ws_path,
        username=urllib.parse.unquote(parts.username) if parts.username else mqtt.username,
    )
