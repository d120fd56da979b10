"""Metrics: counted by the agent, served in Prometheus text format by a thread of the agent.

Where the numbers come from. The agent already sees every message: received, given to worker N,
finished by worker N (``Done`` carries the outcome and the handler's seconds), handed out again,
dead-lettered or dropped; every publish and its acknowledgement; every reconnect. So counting
there costs a few integer increments per message and needs no extra channel and none of
prometheus_client's multiprocess files. Worker restarts are the one thing only the supervisor
sees: it sends the agent its running total per cause (``channel.Restarts``).

Why serve from a thread in the agent. Serving from the supervisor would need the agent to ship
snapshots over a new channel, and a thread in the supervisor is unsafe: the supervisor forks, and a
child forked while that thread holds a lock (logging, imports) inherits the lock held forever. The
agent never forks, and its HTTP thread is kept harmless:

- it is one thread for every client (``endpoint.py``), with a bounded number of connections, a
  deadline for each, a bounded request and a bounded share of the time for rendering, so no client
  can take the agent's descriptors or keep its loop from the GIL;
- it never calls paho, never touches a socket of the agent's, and reads only ``Counters``;
- ``Counters`` is written by the agent's main thread alone, as plain ``int`` attributes, lists of a
  fixed length and one dict that is replaced whole, never changed in place. Under the GIL reading
  an attribute or copying a list (``list(x)`` is one C call) never sees a torn value, and with one
  writer no increment is lost. So the hot path takes no lock. A scrape may see one message counted
  as received but not yet dispatched: numbers of different metrics are not taken at one instant,
  which Prometheus does not need. The histogram's buckets and sum share one list, so they agree.

The listening socket is opened by the supervisor before anything starts (``listen``), so a port in
use stops ``procmqtt run`` with exit code 2, and it stays open while the agent restarts: a scrape
during a restart waits in the accept queue, as do clients beyond ``endpoint.MAX_CONNECTIONS``.
Counters restart from zero with a new agent (Prometheus ``rate()`` handles counter resets);
restarts per cause are kept by the supervisor.

Everything but ``listen`` runs in the agent process.
"""

from __future__ import annotations

import errno
import gzip
import socket
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from procmqtt.agent import endpoint
from procmqtt.errors import ConfigError
from procmqtt.message import Outcome

if TYPE_CHECKING:
    from procmqtt.config import Config

EXTRA_HINT = "pip install 'procmqtt[metrics]'"
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of ``procmqtt_processing_seconds``: 0.1 ms to 60 s, then +Inf."""

_OK, _UNROUTED = Outcome.OK, Outcome.UNROUTED  # an enum attribute lookup costs more than a whole increment


@dataclass(frozen=True)
class WorkerStats:
    dispatched: int = 0
    processed: int = 0  # finished, whatever the outcome
    failed: int = 0  # of those, the handler raised
    unrouted: int = 0  # of those, no route matched
    in_flight: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The numbers at one moment; what the HTTP side serves and what ``procmqtt status`` reads back."""

    received: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    invalid: int = 0
    publishes_sent: int = 0
    publishes_failed: int = 0
    reconnects: int = 0
    window: int = 0
    waiting_on_key: int = 0
    keys_active: int = 0
    workers: Mapping[int, WorkerStats] = field(default_factory=dict)
    restarts: Mapping[str, int] = field(default_factory=dict)
    buckets: tuple[tuple[float, int], ...] = ()  # (upper bound, cumulative count); the last is +Inf
    seconds_sum: float = 0.0
    taken: float = field(default=0.0, compare=False)  # time.monotonic() of the reader

    @property
    def processed(self) -> int:
        return sum(w.processed for w in self.workers.values())

    @property
    def failed(self) -> int:
        return sum(w.failed for w in self.workers.values())

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers.values())

    @property
    def processing_count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


class Counters:
    """The agent's numbers. Written only by the agent's main thread; see the module docstring."""

    def __init__(self, workers: int) -> None:
        self.received = 0
        self.redelivered = 0
        self.dead_lettered = 0
        self.dropped = 0
        self.invalid = 0  # Outcome.INVALID: a typed body that did not validate (also counted failed)
        self.publishes_sent = 0
        self.publishes_failed = 0
        self.reconnects = 0
        self.window = 0
        self.waiting_on_key = 0  # dispatch = "ordered": messages behind a busy key
        self.keys_active = 0  # dispatch = "ordered": keys with a message in the agent
        # per worker slot; fixed length (slots are 0 .. count-1), so a reader never sees a resize
        self.dispatched = [0] * workers
        self.processed = [0] * workers
        self.failed = [0] * workers
        self.unrouted = [0] * workers
        self.in_flight = [0] * workers
        self.restarts: Mapping[str, int] = {}  # replaced whole on change, never mutated
        self._histogram: list[float] = [0] * (len(BUCKETS) + 1) + [0.0]  # counts per bucket, then the sum

    def done(self, slot: int, outcome: Outcome, seconds: float) -> None:
        """Worker ``slot`` finished a message in ``seconds``. Once per message: kept to a few operations."""
        self.processed[slot] += 1
        if outcome is not _OK:
            (self.unrouted if outcome is _UNROUTED else self.failed)[slot] += 1  # RETRY counts as failed
        h = self._histogram
        h[bisect_left(BUCKETS, seconds)] += 1
        h[-1] += seconds

    def ensure_slots(self, workers: int) -> None:
        """Room for ``workers`` slots (SIGTTIN adds one): each list is replaced whole by a longer one."""
        grow = workers - len(self.dispatched)
        if grow > 0:
            for name in ("dispatched", "processed", "failed", "unrouted", "in_flight"):
                setattr(self, name, getattr(self, name) + [0] * grow)

    def published(self, error: int) -> None:
        """A worker's publish is settled: 0 = sent (acknowledged, or written for QoS 0)."""
        if error:
            self.publishes_failed += 1
        else:
            self.publishes_sent += 1

    def sample(self, held: Mapping[int, int], window: int, waiting: int = 0, keys: int = 0) -> None:
        """Once a second: messages each worker holds, the window of the workers taking messages, and
        (ordered dispatch) the messages waiting on their key and the keys active."""
        for slot in range(len(self.in_flight)):
            self.in_flight[slot] = held.get(slot, 0)
        self.window = window
        self.waiting_on_key = waiting
        self.keys_active = keys

    def set_restarts(self, cause: str, total: int) -> None:
        if total > self.restarts.get(cause, 0):
            self.restarts = {**self.restarts, cause: total}

    def summary(self) -> str:
        """For the agent's closing log line."""
        return (
            f"{self.received} received, {sum(self.processed)} processed ({sum(self.unrouted)} unrouted), "
            f"{sum(self.failed)} failed ({self.invalid} invalid), "
            f"{self.redelivered} redelivered, {self.dead_lettered} dead-lettered, {self.dropped} dropped"
        )

    def snapshot(self, taken: float = 0.0) -> Snapshot:
        """Safe from any thread (one writer, copies taken under the GIL)."""
        lists = [list(x) for x in (self.dispatched, self.processed, self.failed, self.unrouted, self.in_flight)]
        h = list(self._histogram)
        cumulative, buckets = 0, []
        for bound, n in zip((*BUCKETS, float("inf")), h[:-1], strict=True):
            cumulative += int(n)
            buckets.append((bound, cumulative))
        return Snapshot(
            received=self.received,
            redelivered=self.redelivered,
            dead_lettered=self.dead_lettered,
            dropped=self.dropped,
            invalid=self.invalid,
            publishes_sent=self.publishes_sent,
            publishes_failed=self.publishes_failed,
            reconnects=self.reconnects,
            window=self.window,
            waiting_on_key=self.waiting_on_key,
            keys_active=self.keys_active,
            workers={slot: WorkerStats(*values) for slot, values in enumerate(zip(*lists, strict=True))},
            restarts=self.restarts,
            buckets=tuple(buckets),
            seconds_sum=float(h[-1]),
            taken=taken,
        )


# --- Prometheus exposition ----------------------------------------------------------------------

_COUNTERS = (  # name without _total, help, Snapshot attribute
    ("procmqtt_messages_received", "Messages received from the broker.", "received"),
    ("procmqtt_messages_redelivered", "Messages handed to a worker again (a worker died, or retry).", "redelivered"),
    (
        "procmqtt_messages_dead_lettered",
        "Messages published to the dead-letter topic after max_attempts.",
        "dead_lettered",
    ),
    ("procmqtt_messages_dropped", "Messages given up after max_attempts without a dead-letter topic.", "dropped"),
    (
        "procmqtt_messages_invalid",
        "Messages whose typed body did not validate: dead-lettered or dropped at once, never retried.",
        "invalid",
    ),
    ("procmqtt_publishes_sent", "Worker publishes the broker acknowledged (QoS 0: written to it).", "publishes_sent"),
    ("procmqtt_publishes_failed", "Worker publishes that failed.", "publishes_failed"),
    ("procmqtt_reconnects", "Connections to the broker made again after the first one.", "reconnects"),
)
_GAUGES = (  # name, help, Snapshot attribute
    (
        "procmqtt_messages_waiting_on_key",
        'dispatch = "ordered": messages waiting for the previous message of their key.',
        "waiting_on_key",
    ),
    ("procmqtt_keys_active", 'dispatch = "ordered": keys with a message in the agent.', "keys_active"),
)
_PER_WORKER = (  # name, help, WorkerStats attribute, counter?
    ("procmqtt_messages_dispatched", "Messages given to the worker.", "dispatched", True),
    ("procmqtt_messages_processed", "Messages the worker finished, whatever the outcome.", "processed", True),
    ("procmqtt_messages_failed", "Messages whose handler raised.", "failed", True),
    ("procmqtt_messages_unrouted", "Messages no route matched.", "unrouted", True),
    ("procmqtt_in_flight", "Messages the worker holds (given, not finished).", "in_flight", False),
)


class Collector:
    """A prometheus_client collector that yields the families of one ``Snapshot`` per scrape."""

    def __init__(self, source: Any) -> None:
        """``source()`` returns a ``Snapshot`` (``Counters.snapshot`` in the agent)."""
        self.source = source

    def describe(self) -> list[Any]:
        return []  # nothing to check at registration; names are fixed

    def collect(self) -> Iterator[Any]:
        from prometheus_client import core

        snap: Snapshot = self.source()
        for name, help_text, attr in _COUNTERS:
            yield core.CounterMetricFamily(name, help_text, value=getattr(snap, attr))
        for name, help_text, attr, is_counter in _PER_WORKER:
            kind = core.CounterMetricFamily if is_counter else core.GaugeMetricFamily
            family = kind(name, help_text, labels=["worker"])
            for slot, stats in sorted(snap.workers.items()):
                family.add_metric([str(slot)], getattr(stats, attr))
            yield family
        yield core.GaugeMetricFamily(
            "procmqtt_window",
            "Unfinished messages the workers that take messages may hold in all (prefetch x such workers).",
            value=snap.window,
        )
        for name, help_text, attr in _GAUGES:
            yield core.GaugeMetricFamily(name, help_text, value=getattr(snap, attr))
        restarts = core.CounterMetricFamily(
            "procmqtt_worker_restarts",
            "Worker processes replaced, by cause: exit_<code>, a signal name, recycled, hung.",
            labels=["cause"],
        )
        for cause, total in sorted(snap.restarts.items()):
            restarts.add_metric([cause], total)
        yield restarts
        yield core.HistogramMetricFamily(
            "procmqtt_processing_seconds",
            "Seconds a worker's handler spent on one message.",
            buckets=[(_le(bound), count) for bound, count in snap.buckets],
            sum_value=snap.seconds_sum,
        )


def _le(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    text: str = floatToGoString(bound)
    return text


def exposition(snapshot: Snapshot) -> bytes:
    """The Prometheus text format of one snapshot (tests, and the one place the format is made)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(lambda: snapshot))
    return generate_latest(registry)


# --- serving ------------------------------------------------------------------------------------


def require_client(why: str) -> None:
    """Fail with one line (exit 2) naming the extra when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(f"{why}, but prometheus_client is not installed: {EXTRA_HINT}") from None


def listen(config: Config) -> socket.socket | None:
    """In the supervisor, before any fork: the listening socket for ``[metrics]``, or None when off.

    Raises ``ConfigError`` (exit 2) when prometheus_client is missing or the address is unusable.
    """
    m = config.metrics
    if m.port is None:
        return None
    require_client(f"{config.source}: [metrics] port is set")
    where = f"{config.source}: [metrics] cannot listen on {m.host}:{m.port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            m.host, m.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        hint = " (another process uses that port; pick another [metrics] port)" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"{where}: {exc.strerror or exc}{hint}") from None
    return sock


def serve(sock: socket.socket, counters: Counters) -> endpoint.Endpoint:
    """In the agent, after fork: answer ``GET /metrics`` on ``sock`` from one daemon thread.

    The thread only reads ``counters`` (see the module docstring); it dies with the agent. Its
    bounds (connections, deadline, request size, time spent rendering) are ``endpoint``'s.
    """
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(lambda: counters.snapshot(time.monotonic())))
    return endpoint.serve(sock, {"/metrics": lambda request: scrape(registry, request)}, name="procmqtt-metrics")


def scrape(registry: Any, request: endpoint.Request) -> endpoint.Response:
    """What prometheus_client's own handler answers: the format the Accept header asks for
    (Prometheus text, or OpenMetrics), ``name[]`` filters, gzip when accepted."""
    from prometheus_client.exposition import choose_encoder, gzip_accepted

    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    names = request.query.get("name[]")
    output = encoder(registry.restricted_registry(names) if names else registry)
    headers = [("Content-Type", content_type)]
    if gzip_accepted(request.headers.get("accept-encoding", "")):
        output = gzip.compress(output)
        headers.append(("Content-Encoding", "gzip"))
    return endpoint.Response(200, output, tuple(headers))
