"""Every configuration key, declared once: section, name, default, check, reload effect, secrecy, doc.

Everything else derives from ``KEYS``: the dataclass defaults (``values.py``), the tables the
loader checks against (``SECTIONS``), the ``PROCMQTT_<SECTION>_<KEY>`` variables, what a SIGHUP
restarts (``reload.py``), what ``check`` masks, and README's reference table (``reference.py``).
Adding a key is one ``Key(...)`` line here and its typed field in ``values.py``; a test fails
until both agree. Imports no runtime module: the agent and the IPC layer import these names.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from procmqtt.config.checks import (
    MAX_MQTT_STRING,
    Check,
    boolean,
    class_specs,
    integer,
    mqtt_text,
    number,
    one_of,
    order_key,
    password_text,
    payload,
    seconds,
    share_group,
    subtable,
    text,
    topic_name,
    ws_path,
)
from procmqtt.orderkey import WHOLE_TOPIC

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
PROTOCOLS = ("3.1.1", "5")
DEFAULT_SESSION_EXPIRY = 3600
DEFAULT_WORKERS = 1
MAX_SLOTS = 1024  # workers at most: the size of the shared state's slot table (ipc/shared.py)
DISPATCH_MODES = ("random", "round_robin", "least_busy", "ordered")  # agent/dispatch.py has one Dispatcher per name
DEFAULT_DISPATCH = "random"
DEFAULT_PREFETCH = 16
DEFAULT_CONCURRENCY = 1
MAX_CONCURRENCY = 1000
DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_ATTEMPTS = 3
ON_ERROR = ("ack", "retry")
DEFAULT_ON_ERROR = "ack"
DEFAULT_RETRY_DELAY = 0.0  # at once, as before retry delays existed
DEFAULT_RETRY_BACKOFF = 2.0
DEFAULT_RETRY_MAX_DELAY = 60.0
MAX_RETRY_BACKOFF = 1000
DEFAULT_PUBLISH_BUFFER = 1_000
MAX_PUBLISH_BUFFER = 60_000  # per worker: what the agent may hold for each (outbox.py), not paho's ids
DEFAULT_PUBLISH_TIMEOUT = 30.0
DEFAULT_MAX_INFLIGHT = 1_000  # MQTT 3.1.1: paho's own 20 holds back an agent publishing for many workers
DEFAULT_MAX_INFLIGHT_V5 = 20  # MQTT 5 brokers announce a Receive Maximum (Mosquitto 20, HiveMQ 10)
DEFAULT_METRICS_HOST = "127.0.0.1"  # loopback: the numbers are for this host unless asked otherwise

ENV_PREFIX = "PROCMQTT_"
REQUIRED: Any = dataclasses.MISSING
"""The default of a key that has none: the table it belongs to must set it."""


class Reload(enum.Enum):
    """What a SIGHUP that changes the key does, beyond replacing every worker (which each reload does)."""

    AGENT = "agent restarts"  # read by the agent at start: a graceful agent restart, a new connection
    WORKERS = "new workers"  # read by the workers or the supervisor: the replaced workers apply it
    LIVE = "live"  # sent to the running agent ([mqtt.topics]: subscribe / unsubscribe)
    RESTART = "procmqtt restart"  # nothing running can adopt it: kept until procmqtt restarts


@dataclass(frozen=True)
class Key:
    """One configuration key. ``section`` is the TOML table: "mqtt", or "mqtt.tls" for a sub-table."""

    section: str
    name: str
    default: Any
    check: Check
    reload: Reload
    doc: str
    secret: bool = False  # never shown: not in errors, logs, titles or check
    fills: str | None = None  # another key's field this one sets instead of its own (password_env)
    shown: str | None = None  # the default in words, when it is decided at run time

    @property
    def field(self) -> str | None:
        """The dataclass field the key sets, or None for an alternative form of another key."""
        return None if self.fills else self.name

    @property
    def accepts(self) -> str:
        """What the check accepts, in the words of its error message ("an integer from 1 to 65535")."""
        expected = self.check(object()) or "any value"  # no value of no type passes a check
        return expected.split(" (")[0]

    @property
    def env(self) -> str | None:
        """``PROCMQTT_<SECTION>_<KEY>``; None for a table and the keys inside one (TOML only)."""
        if self.check is subtable or "." in self.section:
            return None
        return f"{ENV_PREFIX}{self.section}_{self.name}".upper()


_A, _W, _L, _R = Reload.AGENT, Reload.WORKERS, Reload.LIVE, Reload.RESTART

KEYS: tuple[Key, ...] = (
    Key("mqtt", "host", DEFAULT_HOST, text, _A, "the broker's host name or address"),
    Key(
        "mqtt",
        "port",
        DEFAULT_PORT,
        integer(1, 65535),
        _A,
        "the broker's port",
        shown=f"{DEFAULT_PORT}, {DEFAULT_TLS_PORT} with [mqtt.tls]",
    ),
    Key(
        "mqtt",
        "client_id",
        None,
        mqtt_text,
        _A,
        "keep it stable: a persistent session is found by it",
        shown="procmqtt-<hostname>-<hash of APP>",
    ),
    Key("mqtt", "username", None, mqtt_text, _A, "the user name to log in with"),
    Key("mqtt", "password", None, password_text, _A, "the password (or password_env, or password_file)", secret=True),
    Key("mqtt", "password_env", None, text, _A, "the environment variable that holds the password", fills="password"),
    Key("mqtt", "password_file", None, text, _A, "the file that holds the password (one line)", fills="password"),
    Key("mqtt", "keepalive", DEFAULT_KEEPALIVE, integer(1, 65535), _A, "seconds between pings"),
    Key("mqtt", "protocol", DEFAULT_PROTOCOL, one_of(*PROTOCOLS), _A, "the MQTT version"),
    Key(
        "mqtt",
        "clean_session",
        False,
        boolean,
        _A,
        "false: a persistent session keeps QoS 1 messages while procmqtt is away",
    ),
    Key(
        "mqtt",
        "session_expiry",
        DEFAULT_SESSION_EXPIRY,
        integer(0, 2**32 - 1),
        _A,
        "MQTT 5: seconds the broker keeps the session after a disconnection",
    ),
    Key(
        "mqtt",
        "publish_buffer",
        DEFAULT_PUBLISH_BUFFER,
        integer(1, MAX_PUBLISH_BUFFER),
        _W,
        "unconfirmed publishes (QoS 0 too) per worker before publish() blocks",
    ),
    Key(
        "mqtt",
        "publish_timeout",
        DEFAULT_PUBLISH_TIMEOUT,
        seconds(0),
        _W,
        "seconds publish() blocks on a full buffer, then PublishBufferFull",
    ),
    Key(
        "mqtt",
        "max_inflight",
        None,
        integer(1, 65535),
        _A,
        "QoS 1/2 publishes awaiting the broker's acknowledgement at once (keep it <= the broker's Receive Maximum)",
        shown=f"{DEFAULT_MAX_INFLIGHT}, MQTT 5: {DEFAULT_MAX_INFLIGHT_V5}",
    ),
    Key(
        "mqtt",
        "connect_timeout",
        DEFAULT_CONNECT_TIMEOUT,
        seconds(0.1),
        _A,
        "seconds for TCP, TLS handshake and CONNACK; then a clear error and a retry",
    ),
    Key("mqtt", "transport", DEFAULT_TRANSPORT, one_of(*TRANSPORTS), _A, "how to reach the broker"),
    Key("mqtt", "ws_path", DEFAULT_WS_PATH, ws_path, _A, "the HTTP path of the websockets endpoint"),
    Key("mqtt", "share_group", None, share_group, _A, "subscribe every filter as $share/<group>/<filter>"),
    Key("mqtt", "topics", (), subtable, _L, "the subscriptions: filter = { qos = 0|1|2 }"),
    Key("mqtt", "tls", None, subtable, _A, "present: TLS"),
    Key("mqtt", "will", None, subtable, _A, "sent by the broker when the connection dies without DISCONNECT"),
    Key("mqtt", "birth", None, subtable, _A, "published by the agent on every (re)connection"),
    Key("mqtt.topics", "qos", 0, integer(0, 2), _L, "the QoS of one filter's subscription"),
    Key(
        "mqtt.tls", "ca_certs", None, text, _A, "PEM certificates of the CAs to trust", shown="the system's trusted CAs"
    ),
    Key("mqtt.tls", "certfile", None, text, _A, "mutual TLS: the client certificate (PEM)"),
    Key("mqtt.tls", "keyfile", None, text, _A, "its unencrypted key, when not inside certfile"),
    Key("mqtt.tls", "insecure", False, boolean, _A, "true skips the host name check: never in production"),
    Key("mqtt.will", "topic", REQUIRED, topic_name, _A, "where the broker publishes the will"),
    Key("mqtt.will", "payload", "", payload(MAX_MQTT_STRING), _A, "the will's text"),
    Key("mqtt.will", "qos", 0, integer(0, 2), _A, "the will's QoS"),
    Key("mqtt.will", "retain", False, boolean, _A, "whether the will is retained"),
    Key("mqtt.birth", "topic", REQUIRED, topic_name, _A, "where the agent publishes the birth message"),
    Key("mqtt.birth", "payload", "", payload(None), _A, "the birth message's text"),
    Key("mqtt.birth", "qos", 0, integer(0, 2), _A, "its QoS"),
    Key("mqtt.birth", "retain", False, boolean, _A, "whether it is retained"),
    Key("workers", "count", DEFAULT_WORKERS, integer(1, MAX_SLOTS), _W, "worker processes; -w overrides"),
    Key(
        "workers", "dispatch", DEFAULT_DISPATCH, one_of(*DISPATCH_MODES), _A, "which ready worker gets the next message"
    ),
    Key(
        "workers",
        "order_key",
        WHOLE_TOPIC,
        order_key,
        _A,
        'dispatch = "ordered": what one key is (README "Ordered delivery")',
    ),
    Key(
        "workers",
        "prefetch",
        DEFAULT_PREFETCH,
        integer(1, 65535),
        _A,
        "unfinished messages one worker may hold",
        shown=f"{DEFAULT_PREFETCH}, at least concurrency",
    ),
    Key(
        "workers",
        "graceful_timeout",
        DEFAULT_GRACEFUL_TIMEOUT,
        seconds(0),
        _A,
        "seconds to finish on SIGTERM before a forced stop",
    ),
    Key(
        "workers",
        "timeout",
        DEFAULT_TIMEOUT,
        seconds(0),
        _W,
        "seconds one message may take before the worker is killed; 0 = no limit",
    ),
    Key(
        "workers",
        "max_attempts",
        DEFAULT_MAX_ATTEMPTS,
        integer(1, 1000),
        _A,
        'deaths/timeouts (and failures with on_error = "retry") per message',
    ),
    Key(
        "workers",
        "on_error",
        DEFAULT_ON_ERROR,
        one_of(*ON_ERROR),
        _A,
        'on_message raised: "ack" (log, count, acknowledge) or "retry"',
    ),
    Key(
        "workers",
        "retry_delay",
        DEFAULT_RETRY_DELAY,
        seconds(0),
        _A,
        "seconds a failed message waits before its first retry (0 = at once)",
    ),
    Key(
        "workers",
        "retry_backoff",
        DEFAULT_RETRY_BACKOFF,
        number(1, MAX_RETRY_BACKOFF),
        _A,
        "each further retry waits this many times longer",
    ),
    Key(
        "workers",
        "retry_max_delay",
        DEFAULT_RETRY_MAX_DELAY,
        seconds(0),
        _A,
        "the longest retry wait (at least retry_delay); up to 10 % jitter is added",
    ),
    Key(
        "workers",
        "dead_letter_topic",
        None,
        topic_name,
        _A,
        "where a message goes after max_attempts; unset: dropped with an error",
    ),
    Key(
        "workers",
        "middleware",
        (),
        class_specs,
        _W,
        'procmqtt.Middleware classes ("pkg.mod:Class", made with no arguments) around the app\'s own, '
        "first outermost (docs/middleware.md)",
    ),
    Key("workers", "max_messages", 0, integer(0), _W, "recycle a worker after this many messages (0 = never)"),
    Key(
        "workers",
        "max_messages_jitter",
        0,
        integer(0),
        _W,
        "plus a random 0..jitter, so workers do not recycle together",
    ),
    Key(
        "workers", "max_memory_mb", 0, integer(0), _W, "recycle a worker whose resident memory exceeds this (0 = never)"
    ),
    Key(
        "workers",
        "concurrency",
        DEFAULT_CONCURRENCY,
        integer(1, MAX_CONCURRENCY),
        _W,
        "messages in flight per worker, for async handlers",
    ),
    Key("metrics", "port", None, integer(1, 65535), _R, "serve Prometheus metrics on this port; unset: off"),
    Key("metrics", "host", DEFAULT_METRICS_HOST, text, _R, "the address the metrics endpoint listens on"),
)
"""In the order the tables are shown and their keys listed in errors; a table's keys after it."""

APP_SECTION = "app"  # free-form: no keys declared, read by the workers as self.config.app


def keys(section: str) -> tuple[Key, ...]:
    return tuple(k for k in KEYS if k.section == section)


def defaults(section: str) -> dict[str, Any]:
    """The dataclass defaults of ``section``'s fields, by field name (a required key has none)."""
    return {k.name: k.default for k in keys(section) if k.field and k.default is not REQUIRED}


def checks_of(section: str) -> dict[str, Check]:
    """What the loader checks ``section``'s table against: every key a file may set there."""
    return {k.name: k.check for k in keys(section)}


SECTIONS: dict[str, dict[str, Check]] = {
    **{s: checks_of(s) for s in dict.fromkeys(k.section for k in KEYS if "." not in k.section)},
    APP_SECTION: {},
}
"""The top-level tables a file may hold. The loader and the environment read these very dicts."""
SUBTABLES: dict[str, dict[str, Check]] = {
    s: checks_of(s) for s in dict.fromkeys(k.section for k in KEYS if "." in k.section)
}
SECRET_KEYS = frozenset((k.section, k.name) for k in KEYS if k.secret)
SECRET_NAMES = frozenset(k.name for k in KEYS if k.secret)  # never shown, whatever their type
PASSWORD_KEYS = tuple(k.name for k in KEYS if k.section == "mqtt" and "password" in (k.name, k.fills))
"""The forms of the one password; a file or the environment sets at most one."""
