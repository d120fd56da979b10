"""Configuration: frozen value objects, loaded from TOML and checked once, in the supervisor.

Every check happens at load time, so a mistake stops ``procmqtt`` before any process is forked,
with one line that names the file, the key and what was expected. The modules, one job each:

- ``schema``: every key declared once (default, check, variable, reload effect, secrecy, doc);
- ``checks``: the value checks the declarations use;
- ``values``: the frozen dataclasses, their defaults taken from ``schema``;
- ``loader``: a TOML file into a ``Config``, and the command-line flags;
- ``environ``: the ``PROCMQTT_*`` variables and the precedence chain (``resolve``);
- ``reload``: what a SIGHUP changes; ``reference``: the key table in docs/configuration.md.

This package imports no runtime module (agent, worker, supervisor, ipc): they import it.
"""

from __future__ import annotations

from procmqtt.config.checks import (
    MAX_MQTT_PACKET,
    MAX_MQTT_STRING,
    MAX_SECONDS,
    Check,
    integer,
    subtable,
    text,
)
from procmqtt.config.environ import CONFIG_ENV, env_variables, from_environ, resolve
from procmqtt.config.loader import MAX_FILE_BYTES, from_mapping, load, with_overrides
from procmqtt.config.schema import (
    DEFAULT_CONCURRENCY,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DISPATCH,
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HEALTH_HOST,
    DEFAULT_HOST,
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_INFLIGHT_V5,
    DEFAULT_METRICS_HOST,
    DEFAULT_ON_ERROR,
    DEFAULT_PATH,
    DEFAULT_PORT,
    DEFAULT_PREFETCH,
    DEFAULT_PROTOCOL,
    DEFAULT_PUBLISH_BUFFER,
    DEFAULT_PUBLISH_TIMEOUT,
    DEFAULT_SESSION_EXPIRY,
    DEFAULT_TIMEOUT,
    DEFAULT_TLS_PORT,
    DEFAULT_TRANSPORT,
    DEFAULT_WORKERS,
    DEFAULT_WS_PATH,
    DISPATCH_MODES,
    ENV_PREFIX,
    KEYS,
    MAX_CONCURRENCY,
    MAX_PUBLISH_BUFFER,
    MAX_SLOTS,
    ON_ERROR,
    PROTOCOLS,
    SECTIONS,
    SUBTABLES,
    TRANSPORTS,
    Key,
    Reload,
)
from procmqtt.config.values import (
    Announcement,
    Config,
    HealthConfig,
    MetricsConfig,
    MqttConfig,
    Secret,
    Subscription,
    TlsConfig,
    WorkersConfig,
    default_client_id,
)

# The schema's tables under their former private names (tests reach for them); the very same dicts.
_SECTIONS = SECTIONS
_MQTT_KEYS = SECTIONS["mqtt"]
_WORKERS_KEYS = SECTIONS["workers"]
_METRICS_KEYS = SECTIONS["metrics"]
_TOPIC_KEYS = SUBTABLES["mqtt.topics"]
_TLS_KEYS = SUBTABLES["mqtt.tls"]
_WILL_KEYS = SUBTABLES["mqtt.will"]
_ANNOUNCEMENT_KEYS = SUBTABLES["mqtt.birth"]
_integer = integer
_text = text
_table = subtable

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DISPATCH",
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_HEALTH_HOST",
    "DEFAULT_HOST",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_INFLIGHT_V5",
    "DEFAULT_METRICS_HOST",
    "DEFAULT_ON_ERROR",
    "DEFAULT_PATH",
    "DEFAULT_PORT",
    "DEFAULT_PREFETCH",
    "DEFAULT_PROTOCOL",
    "DEFAULT_PUBLISH_BUFFER",
    "DEFAULT_PUBLISH_TIMEOUT",
    "DEFAULT_SESSION_EXPIRY",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TLS_PORT",
    "DEFAULT_TRANSPORT",
    "DEFAULT_WORKERS",
    "DEFAULT_WS_PATH",
    "DISPATCH_MODES",
    "ENV_PREFIX",
    "KEYS",
    "MAX_CONCURRENCY",
    "MAX_FILE_BYTES",
    "MAX_MQTT_PACKET",
    "MAX_MQTT_STRING",
    "MAX_PUBLISH_BUFFER",
    "MAX_SECONDS",
    "MAX_SLOTS",
    "ON_ERROR",
    "PROTOCOLS",
    "TRANSPORTS",
    "Announcement",
    "Check",
    "Config",
    "HealthConfig",
    "Key",
    "MetricsConfig",
    "MqttConfig",
    "Reload",
    "Secret",
    "Subscription",
    "TlsConfig",
    "WorkersConfig",
    "default_client_id",
    "env_variables",
    "from_environ",
    "from_mapping",
    "load",
    "resolve",
    "with_overrides",
]
