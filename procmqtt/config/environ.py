"""The environment, and the whole precedence chain: defaults < TOML file < environment < command line.

Every scalar key of every top-level table has its ``PROCMQTT_<SECTION>_<KEY>`` variable, derived
from ``schema.SECTIONS``; a value is read as the key's type by trying the key's own check.
"""

from __future__ import annotations

import difflib
import logging
import os
import types
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from procmqtt.config.checks import Check, subtable
from procmqtt.config.loader import _read, _show, from_mapping, with_overrides
from procmqtt.config.schema import ENV_PREFIX, PASSWORD_KEYS, SECRET_KEYS, SECTIONS
from procmqtt.config.values import Config
from procmqtt.errors import ConfigError

CONFIG_ENV = "PROCMQTT_CONFIG"
_INVALID = object()
_log = logging.getLogger("procmqtt.config")


def env_variables() -> dict[str, tuple[str, str]]:
    """Every settable variable, ``PROCMQTT_MQTT_HOST`` -> ("mqtt", "host").

    Derived from the schema tables, so a key or a section added there gets its variable for free;
    sub-tables (``[mqtt.topics]``) and the free-form ``[app]`` have none.
    """
    return {
        f"{ENV_PREFIX}{section}_{key}".upper(): (section, key)
        for section, keys in SECTIONS.items()
        for key, check in keys.items()
        if check is not subtable
    }


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
        check = SECTIONS[section][key]
        value = _from_text(environ[name], check)
        if value is _INVALID:
            secret = (section, key) in SECRET_KEYS and environ[name]
            got = "'********'" if secret else _show(environ[name])
            raise ConfigError(f"{name}: expected {check(environ[name])}, got {got}")
        if key == "password_env" and value not in environ:
            raise ConfigError(f"{name}: environment variable {value} is not set")
        values.setdefault(section, {})[key] = value
        origins[f"{section}.{key}"] = name
    passwords = [f"{ENV_PREFIX}MQTT_{k.upper()}" for k in PASSWORD_KEYS if k in values.get("mqtt", {})]
    if len(passwords) > 1:
        raise ConfigError(f"set only one of {', '.join(passwords)}")
    return values, origins


def _warn_unknown(name: str, known: Mapping[str, tuple[str, str]]) -> None:
    rest = name[len(ENV_PREFIX) :].lower() if name.startswith(ENV_PREFIX) else ""
    section = next((s for s in sorted(SECTIONS, key=len, reverse=True) if rest.startswith(s + "_")), None)
    if section is None:
        return  # PROCMQTT_CONFIG, PROCMQTT_LOG_FORMAT, or not ours
    key = rest[len(section) + 1 :]
    tables = [k for k, check in SECTIONS[section].items() if check is subtable]
    if not SECTIONS[section] or any(key == t or key.startswith(t + "_") for t in tables):
        where = next((f"{section}.{t}" for t in tables if key.startswith(t)), section)
        _log.warning("%s: ignored; [%s] is set in the configuration file only", name, where)
        return
    close = difflib.get_close_matches(name, [v for v, (s, _) in known.items() if s == section], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    _log.warning("%s: not a procmqtt setting, ignored%s", name, hint)


def resolve(
    path: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    workers: int | None = None,
    broker: str | None = None,
) -> Config:
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
    origins = {f"{name}.{key}": source for name, table in merged.items() if isinstance(table, dict) for key in table}
    for section, values in env.items():
        table = merged.setdefault(section, {})
        if not isinstance(table, dict):
            continue  # from_mapping names the file's mistake
        if section == "mqtt" and any(k in values for k in PASSWORD_KEYS):
            for k in PASSWORD_KEYS:  # the environment's password replaces the file's, whatever its form
                table.pop(k, None)
                origins.pop(f"mqtt.{k}", None)
        table.update(values)
    origins.update(env_origins)
    for k in PASSWORD_KEYS[1:]:  # the one password value, whatever form it was given in
        if f"mqtt.{k}" in origins:
            origins["mqtt.password"] = f"{origins.pop(f'mqtt.{k}')} ({k})"
    config = replace(from_mapping(merged, source, environ), origins=types.MappingProxyType(origins))
    return with_overrides(config, workers=workers, broker=broker)
