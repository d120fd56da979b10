"""``procmqtt status``: read a running procmqtt's ``[metrics]`` endpoint and print a compact table.

``fetch`` and ``render`` are the one reader of the numbers, used by ``procmqtt status`` and by the
demo's live view. Runs in whatever process calls it; needs prometheus_client (its parser).
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from typing import Any

from procmqtt.agent.metrics import (
    _COUNTERS,
    _GAUGES,
    _PER_WORKER,
    Snapshot,
    WorkerStats,
    require_client,
)
from procmqtt.config import Config
from procmqtt.errors import ConfigError, ExitCode, ProcmqttError

__all__ = ["Snapshot", "Unreachable", "fetch", "parse", "render"]

ONE_SHOT_INTERVAL = 1.0
"""Seconds between the two reads of a one-shot ``procmqtt status``, so it can show msg/s."""


class Unreachable(ProcmqttError):
    """Nothing answered on the metrics endpoint (procmqtt is not running, or on another port)."""

    exit_code = ExitCode.FORCED


def fetch(host: str, port: int, timeout: float = 2.0) -> Snapshot:
    """Scrape ``http://host:port/metrics`` once; raises ``Unreachable`` with one readable line."""
    require_client("procmqtt status reads the metrics with prometheus_client")
    url = f"http://{_url_host(host)}:{port}/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        reason = getattr(reason, "strerror", None) or reason
        raise Unreachable(
            f"nothing answers on {url} ({reason}); is procmqtt running with [metrics] port = {port}?"
        ) from None
    return parse(text, taken=time.monotonic())


def parse(text: str, taken: float = 0.0) -> Snapshot:
    """A ``Snapshot`` from Prometheus text format (what ``metrics.exposition`` makes)."""
    from prometheus_client.parser import text_string_to_metric_families

    counters = {name: attr for name, _, attr in _COUNTERS}
    per_worker = {name: attr for name, _, attr, _ in _PER_WORKER}
    gauges = {name: attr for name, _, attr in _GAUGES}
    totals: dict[str, Any] = {}
    workers: dict[int, dict[str, int]] = {}
    restarts: dict[str, int] = {}
    buckets: list[tuple[float, int]] = []
    seconds_sum = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if family.name in counters:
                totals[counters[family.name]] = int(sample.value)
            elif family.name in per_worker:
                slot = int(sample.labels["worker"])
                workers.setdefault(slot, {})[per_worker[family.name]] = int(sample.value)
            elif family.name == "procmqtt_window":
                totals["window"] = int(sample.value)
            elif family.name in gauges:
                totals[gauges[family.name]] = int(sample.value)
            elif family.name == "procmqtt_worker_restarts":
                restarts[sample.labels["cause"]] = int(sample.value)
            elif sample.name == "procmqtt_processing_seconds_bucket":
                buckets.append((float(sample.labels["le"]), int(sample.value)))
            elif sample.name == "procmqtt_processing_seconds_sum":
                seconds_sum = sample.value
    return Snapshot(
        **totals,
        workers={slot: WorkerStats(**w) for slot, w in sorted(workers.items())},
        restarts=restarts,
        buckets=tuple(sorted(buckets)),
        seconds_sum=seconds_sum,
        taken=taken,
    )


def render(snapshot: Snapshot, previous: Snapshot | None) -> str:
    """A compact table: per worker processed, msg/s since ``previous``, in-flight, failed; totals."""
    elapsed = snapshot.taken - previous.taken if previous is not None else 0.0

    def rate(now: int, before: int | None) -> str:
        if before is None or elapsed <= 0 or now < before:  # no earlier read, or the agent restarted
            return "-"
        return f"{(now - before) / elapsed:.1f}"

    rows = [("worker", "processed", "msg/s", "in-flight", "failed")]
    for slot, w in snapshot.workers.items():
        before = previous.workers.get(slot) if previous is not None else None
        rows.append(
            (
                str(slot),
                str(w.processed),
                rate(w.processed, before.processed if before else None),
                str(w.in_flight),
                str(w.failed),
            )
        )
    rows.append(
        (
            "total",
            str(snapshot.processed),
            rate(snapshot.processed, previous.processed if previous is not None else None),
            str(snapshot.in_flight),
            str(snapshot.failed),
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in rows
    ]
    s = snapshot
    restarts = ", ".join(f"{cause} {n}" for cause, n in sorted(s.restarts.items()))
    mean = f"{1000 * s.seconds_sum / s.processing_count:.2f} ms" if s.processing_count else "-"
    lines.append(
        f"received {s.received}, redelivered {s.redelivered}, dead-lettered {s.dead_lettered}, "
        f"dropped {s.dropped}, invalid {s.invalid}; window {s.window}; handler time mean {mean}"
    )
    lines.append(
        f"publishes {s.publishes_sent} sent, {s.publishes_failed} failed; reconnects {s.reconnects}; "
        f"restarts {sum(s.restarts.values())}" + (f" ({restarts})" if restarts else "")
    )
    return "\n".join(lines)


def main(config: Config, watch: float | None) -> int:
    """``procmqtt status``: one table (two reads a second apart, for msg/s), or one every ``watch`` s."""
    m = config.metrics
    if m.port is None:
        raise ConfigError(
            f"{config.source}: [metrics] port is not set, so procmqtt serves no metrics; "
            "set it (e.g. port = 9464) and restart procmqtt"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(m.host, m.host)  # listening on all
    if watch is None:
        first = fetch(host, m.port)
        time.sleep(ONE_SHOT_INTERVAL)
        print(render(fetch(host, m.port), first))
        return ExitCode.OK
    previous: Snapshot | None = None
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                snapshot = fetch(host, m.port)
                text, previous = render(snapshot, previous), snapshot
            except Unreachable as exc:  # keep watching: procmqtt may be starting or restarting
                text, previous = f"procmqtt: {exc}", None
            print(f"{clear}{time.strftime('%H:%M:%S')}\n{text}\n", flush=True)
            time.sleep(watch)
    except KeyboardInterrupt:
        return ExitCode.OK


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
