"""``procmqtt check`` and ``--print-config``: what ``run`` would do, shown without connecting anywhere.

Runs in the one ``procmqtt`` process, after the configuration is resolved and the app imported,
exactly as ``run`` does before it forks. Secrets are masked here, in one place.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from procmqtt.config import Config, Secret, default_client_id
from procmqtt.config.checks import subtable
from procmqtt.config.schema import keys
from procmqtt.errors import ConfigError
from procmqtt.orderkey import key_function
from procmqtt.topics import topic_problem
from procmqtt.worker.base import Worker
from procmqtt.worker.payloads import Body, message_body
from procmqtt.worker.routes import Route

MASK = "********"
SECRET_NAME = re.compile(r"pass|secret|token|credential|api_?key|private", re.IGNORECASE)
"""Keys of the free-form ``[app]`` table whose values are masked when printed."""


@dataclasses.dataclass(frozen=True)
class Subscribed:
    """One filter the agent subscribes to at start, and what a message on it reaches."""

    topic_filter: str
    qos: int
    reaches: tuple[str, ...]


def subscriptions(config: Config, routes: Iterable[Route], body: Body | None = None) -> list[Subscribed]:
    """``[mqtt.topics]`` entries reach ``on_message``; routes reach their method; a filter in both
    shows both. The agent holds one subscription per filter, so its QoS is the highest asked for.
    A typed body (``body``: on_message's) is shown after the handler: ``[body reading: Reading (dataclass)]``."""
    targets: dict[str, list[tuple[str, int]]] = {}
    on_message = "on_message" + _body(body)
    for sub in config.mqtt.topics:
        targets.setdefault(sub.topic_filter, []).append((on_message, sub.qos))
    for route in routes:
        shown = route.name if route.pattern == route.topic_filter else f"{route.name} ({route.pattern})"
        targets.setdefault(route.topic_filter, []).append((shown + _body(route.body), route.qos))
    rows = []
    for topic_filter, found in targets.items():
        qos = max(q for _, q in found)
        reaches = tuple(name if q == qos else f"{name} [qos {q}]" for name, q in found)
        rows.append(Subscribed(config.mqtt.wire_filter(topic_filter), qos, reaches))  # as the broker sees it
    return rows


def _middleware(app: type, config: Config) -> str:
    """The middleware, outermost first: ``[workers] middleware`` as written, then the class's by name."""
    listed = getattr(app, "middleware", ()) if issubclass(app, Worker) else ()
    return ", ".join([*config.workers.middleware, *(type(m).__qualname__ for m in listed)]) or "none"


def _body(body: Body | None) -> str:
    return "" if body is None else f" [body {body.described}]"


def render_subscriptions(rows: list[Subscribed]) -> str:
    if not rows:
        return "subscriptions: none (the app receives only what it subscribes to at runtime)\n"
    table = [("FILTER", "QOS", "REACHES"), *((r.topic_filter, str(r.qos), ", ".join(r.reaches)) for r in rows)]
    width = max(len(f) for f, _, _ in table)
    lines = [f"  {f:<{width}}  {q:<3}  {reach}".rstrip() for f, q, reach in table]
    return f"subscriptions ({len(rows)}):\n" + "\n".join(lines) + "\n"


def render_config(config: Config, app_spec: str | None = None) -> str:
    """The effective configuration as TOML, secrets masked; a comment says where a value came from."""
    file = "no file" if config.source == Config.source else config.source
    lines = [f"# effective configuration: defaults < {file} < environment < command line"]
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section):
            lines += _section(f.name, section, config.origins, app_spec)
    lines += ["", "[app]"]
    lines += [f"{_key(k)} = {_toml(_masked(k, v))}" for k, v in config.app.items()]
    return "\n".join(lines) + "\n"


def render_check(app_spec: str, app: type, config: Config, routes: Iterable[Route]) -> str:
    mqtt = config.mqtt
    overrides = sorted({o.split(" ")[0] for o in config.origins.values() if o.split(" ")[0] != config.source})
    head = [
        f"app: {app_spec} (class {app.__module__}.{app.__qualname__})",
        f"config: {'no file (defaults)' if config.source == Config.source else config.source}",
        f"from the environment and command line: {', '.join(overrides) or 'nothing'}",
        f"broker: {mqtt.host}:{mqtt.port} (not contacted by check)",
        f"client id: {mqtt.client_id or default_client_id(app_spec)}",
        f"workers: {config.workers.count}",
        f"middleware: {_middleware(app, config)}",
    ]
    return (
        "\n".join(head)
        + "\n\n"
        + render_subscriptions(subscriptions(config, routes, message_body(app) if issubclass(app, Worker) else None))
        + "\n"
        + render_config(config, app_spec)
    )


def render_keys(config: Config, topics: Iterable[str]) -> str:
    """``check --key-of``: the order key of each sample topic, one line each."""
    w = config.workers
    key_of = key_function(w.order_key)
    note = "" if w.dispatch == "ordered" else f'  (unused: dispatch = "{w.dispatch}")'
    lines = []
    for topic in topics:
        problem = topic_problem(topic)
        if problem:
            raise ConfigError(f"--key-of {topic!r}: expected a topic name ({problem})")
        lines.append(f"{topic} -> {key_of(topic)}  # order_key = {_toml(w.order_key)}{note}")
    return "\n".join(lines) + "\n"


def _section(name: str, section: Any, origins: Mapping[str, str], app_spec: str | None) -> list[str]:
    """The table's declared keys in schema order; a key declared secret is masked whatever its value."""
    lines = ["", f"[{name}]"]
    tables: list[str] = []
    for key in keys(name):
        if key.field is None:
            continue  # password_env, password_file: shown as the password they give
        value = getattr(section, key.field)
        origin = origins.get(f"{name}.{key.field}")
        comment = f"  # {origin}" if origin else ""
        if key.secret and value is not None:
            lines.append(f"{key.field} = {_toml(Secret(MASK))}{comment}")
        elif dataclasses.is_dataclass(value):  # [mqtt.tls], [mqtt.will] ...
            tables += _section(f"{name}.{key.field}", value, origins, None)
        elif key.check is subtable and isinstance(value, tuple):  # [mqtt.topics]: the subscriptions
            tables += ["", f"[{name}.{key.field}]"]
            tables += [f"{_key(s.topic_filter)} = {{ qos = {s.qos} }}" for s in value]
        elif value is None and key.field == "client_id" and app_spec:
            lines.append(f"client_id = {_toml(default_client_id(app_spec))}  # default for {app_spec}")
        elif value is None and key.field == "max_inflight":
            lines.append(f"max_inflight = {section.inflight()}  # default for MQTT {section.protocol}")
        elif value is None:
            lines.append(f"# {key.field} is not set")
        else:
            lines.append(f"{key.field} = {_toml(value)}{comment}")
    return lines + tables


def _masked(key: Any, value: Any, secret: bool = False) -> Any:
    """``value`` with every leaf under a secret-looking key replaced by a ``Secret``."""
    secret = secret or (isinstance(key, str) and SECRET_NAME.search(key) is not None)
    if isinstance(value, Mapping):
        return {k: _masked(k, v, secret) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(key, v, secret) for v in value]
    return Secret(str(value)) if secret else value


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml(value: Any) -> str:
    if isinstance(value, Secret):
        return json.dumps(MASK)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    return json.dumps(str(value), ensure_ascii=False)
