"""The configuration as frozen value objects: what workers see as ``self.config``.

Each field's default comes from its declaration in ``schema.py`` (``_MQTT["host"]`` is
``DEFAULT_HOST``); the types live here, where type checkers read them.
"""

from __future__ import annotations

import hashlib
import re
import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from procmqtt.config.schema import (
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_INFLIGHT_V5,
    defaults,
)

_MQTT = defaults("mqtt")
_TOPIC = defaults("mqtt.topics")
_TLS = defaults("mqtt.tls")
_ANNOUNCEMENT = defaults("mqtt.birth")  # [mqtt.will] declares the same defaults (a test checks)
_WORKERS = defaults("workers")
_METRICS = defaults("metrics")


@dataclass(frozen=True)
class Secret:
    """A password that never shows up in a repr, a log line or an error message."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True)
class Subscription:
    """One ``[mqtt.topics]`` entry, or a runtime ``self.subscribe``."""

    topic_filter: str
    qos: int = _TOPIC["qos"]


@dataclass(frozen=True)
class TlsConfig:
    """``[mqtt.tls]``: present means TLS. Certificates are checked by default (``insecure`` off);
    ``ca_certs`` None: the system's trusted CAs."""

    ca_certs: str | None = _TLS["ca_certs"]
    certfile: str | None = _TLS["certfile"]
    keyfile: str | None = _TLS["keyfile"]
    insecure: bool = _TLS["insecure"]


@dataclass(frozen=True)
class Announcement:
    """``[mqtt.will]`` and ``[mqtt.birth]``: one message about this app's presence."""

    topic: str
    payload: str = _ANNOUNCEMENT["payload"]
    qos: int = _ANNOUNCEMENT["qos"]
    retain: bool = _ANNOUNCEMENT["retain"]


@dataclass(frozen=True)
class MqttConfig:
    """``[mqtt]``. ``max_inflight`` None: the default for the protocol, see ``inflight()``."""

    host: str = _MQTT["host"]
    port: int = _MQTT["port"]
    client_id: str | None = _MQTT["client_id"]
    username: str | None = _MQTT["username"]
    password: Secret | None = _MQTT["password"]
    keepalive: int = _MQTT["keepalive"]
    protocol: str = _MQTT["protocol"]
    clean_session: bool = _MQTT["clean_session"]
    session_expiry: int = _MQTT["session_expiry"]
    publish_buffer: int = _MQTT["publish_buffer"]
    publish_timeout: float = _MQTT["publish_timeout"]
    max_inflight: int | None = _MQTT["max_inflight"]
    connect_timeout: float = _MQTT["connect_timeout"]
    transport: str = _MQTT["transport"]
    ws_path: str = _MQTT["ws_path"]
    share_group: str | None = _MQTT["share_group"]
    topics: tuple[Subscription, ...] = _MQTT["topics"]
    tls: TlsConfig | None = _MQTT["tls"]
    will: Announcement | None = _MQTT["will"]
    birth: Announcement | None = _MQTT["birth"]

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
    """``[workers]``."""

    count: int = _WORKERS["count"]
    dispatch: str = _WORKERS["dispatch"]
    order_key: str = _WORKERS["order_key"]
    prefetch: int = _WORKERS["prefetch"]
    graceful_timeout: float = _WORKERS["graceful_timeout"]
    timeout: float = _WORKERS["timeout"]
    max_attempts: int = _WORKERS["max_attempts"]
    on_error: str = _WORKERS["on_error"]
    retry_delay: float = _WORKERS["retry_delay"]
    retry_backoff: float = _WORKERS["retry_backoff"]
    retry_max_delay: float = _WORKERS["retry_max_delay"]
    dead_letter_topic: str | None = _WORKERS["dead_letter_topic"]
    middleware: tuple[str, ...] = _WORKERS["middleware"]  # "pkg.mod:Class", outermost first
    max_messages: int = _WORKERS["max_messages"]
    max_messages_jitter: int = _WORKERS["max_messages_jitter"]
    max_memory_mb: int = _WORKERS["max_memory_mb"]
    concurrency: int = _WORKERS["concurrency"]


@dataclass(frozen=True)
class MetricsConfig:
    """``port`` None: no metrics endpoint (the default)."""

    port: int | None = _METRICS["port"]
    host: str = _METRICS["host"]


@dataclass(frozen=True)
class Config:
    """The loaded configuration; workers see it as ``self.config``."""

    mqtt: MqttConfig = MqttConfig()
    workers: WorkersConfig = WorkersConfig()
    metrics: MetricsConfig = MetricsConfig()
    app: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    source: str = "<defaults>"
    origins: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}), repr=False, compare=False)
    """Where each value that is not a default came from: "mqtt.host" -> "PROCMQTT_MQTT_HOST", say."""


def default_client_id(app: str) -> str:
    """Stable across restarts (so a persistent session finds its messages), distinct per host and app."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32]
    return f"procmqtt-{host}-{hashlib.sha1(app.encode()).hexdigest()[:8]}"
