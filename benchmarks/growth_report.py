"""benchmarks/growth.py's figures: medians per point, the CPU-scaling model, the four charts."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]


def medians(rows: Rows, key: Callable[[dict[str, Any]], tuple[Any, ...]], fields: Iterable[str]) -> Rows:
    """One row per key: the median (and range) of each field over the repetitions."""
    groups: dict[tuple[Any, ...], Rows] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = []
    for k, rs in groups.items():
        row: dict[str, Any] = {"key": list(k), "reps": len(rs)}
        for f in fields:
            vals = [r[f] for r in rs if r.get(f) is not None]
            row[f] = statistics.median(vals) if vals else None
            row[f + "_range"] = [min(vals), max(vals)] if vals else None
        cpu = [r["cpu_us"] for r in rs if "cpu_us" in r]
        if cpu:
            row["cpu_us"] = {role: statistics.median(c.get(role, 0.0) for c in cpu) for role in cpu[0]}
        pss = [r["pss_by_role_mb"] for r in rs if "pss_by_role_mb" in r]
        if pss:
            row["pss_mean_mb"] = {
                role: statistics.median(statistics.mean(p[role]) for p in pss if p.get(role)) for role in pss[0]
            }
        out.append(row)
    return out


def summarize(raw: dict[str, Rows]) -> dict[str, Rows]:
    return {
        "payload": medians(raw.get("payload", []), lambda r: (r["peer"], r["size"]), ["rate", "lost"]),
        "latency": medians(
            raw.get("latency", []), lambda r: (r["peer"], r["offered"]), ["achieved", "p50_ms", "p99_ms", "lost"]
        ),
        "workers": medians(
            raw.get("workers", []), lambda r: (r["peer"], r["workers"]), ["ready_s", "stop_s", "pss_total_mb"]
        ),
    }


def model(summary: dict[str, Rows], cores: Iterable[int] = (2, 4, 8, 16, 32)) -> dict[str, Any]:
    """What procmqtt could drain with more cores than this machine has, from the per-message CPU
    of each role at the smallest payload: the agent is one process, so it caps the rate at
    1 / its CPU per message; below that cap every message costs the agent's, a worker's and the
    handler's CPU (``work_us``) out of ``k`` cores. The broker and the publisher are taken to run
    elsewhere; with enough workers to fill the cores."""
    rows = [r for r in summary["payload"] if r["key"][0].startswith("procmqtt") and "cpu_us" in r]
    if not rows:
        return {}
    small = min(rows, key=lambda r: r["key"][1])
    agent, worker = small["cpu_us"].get("agent", 0.0), small["cpu_us"].get("worker", 0.0)
    out: dict[str, Any] = {"payload": small["key"][1], "agent_us": agent, "worker_us": worker, "cores": {}}
    for work_us in (0.0, 100.0, 1000.0):
        for k in cores:
            cap = 1e6 / agent if agent else float("inf")
            spread = k * 1e6 / (agent + worker + work_us) if agent + worker + work_us else float("inf")
            out["cores"].setdefault(str(k), {})[f"work_{work_us:.0f}us"] = min(cap, spread)
    return out


def charts(summary: dict[str, Rows], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def by_peer(rows: Rows) -> dict[str, Rows]:
        peers: dict[str, Rows] = {}
        for r in sorted(rows, key=lambda r: r["key"][1]):
            peers.setdefault(r["key"][0], []).append(r)
        return peers

    if summary["payload"]:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for peer, rs in by_peer(summary["payload"]).items():
            sizes = [r["key"][1] for r in rs]
            a.plot(sizes, [r["rate"] * s / 2**20 for r, s in zip(rs, sizes, strict=True)], "o-", label=peer)
            for role in rs[0].get("cpu_us", {}):
                if role in ("supervisor", "broker (in and out)") and not peer.startswith("A"):
                    continue
                cpu = [r["cpu_us"].get(role, 0) or None for r in rs]
                if any(cpu):  # a tiny run's CPU rounds to 0 ticks: nothing to draw on a log axis
                    b.plot(sizes, cpu, "o-", label=f"{peer}: {role}")
        a.set(xscale="log", yscale="log", xlabel="payload (bytes)", ylabel="MB/s drained (QoS 1)")
        b.set(xscale="log", xlabel="payload (bytes)", ylabel="CPU µs per message")
        if b.lines:
            b.set_yscale("log")
        a.set_title("throughput", fontsize=9)
        b.set_title("CPU per message, by role (start-up taken off)", fontsize=9)
        a.legend(fontsize=7)
        b.legend(fontsize=6)
        written.append(_save(fig, out / "cost-payload.png"))
    if summary["latency"]:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for peer, rs in by_peer(summary["latency"]).items():
            achieved = [r["achieved"] for r in rs]
            line = ax.plot(achieved, [r["p50_ms"] for r in rs], "o-", label=f"{peer} p50")[0]
            ax.plot(achieved, [r["p99_ms"] for r in rs], "s--", color=line.get_color(), label=f"{peer} p99")
        ax.set(xscale="log", yscale="log", xlabel="achieved msg/s (offered 250 .. 16,000)", ylabel="ms")
        ax.set_title("latency, publish to handled, QoS 1, as the offered rate grows", fontsize=9)
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "cost-latency.png"))
    if summary["workers"]:
        fig, a = plt.subplots(figsize=(8, 4.2))
        for peer, rs in by_peer(summary["workers"]).items():
            n = [r["key"][1] for r in rs]
            a.plot(n, [r["pss_total_mb"] for r in rs], "o-", label=f"{peer}: total")
            for role in rs[0].get("pss_mean_mb", {}):
                a.plot(n, [r["pss_mean_mb"].get(role) for r in rs], "x:", label=f"{peer}: per {role}")
        a.set(xscale="log", yscale="log", xlabel="workers / processes", ylabel="PSS (MB)")
        a.set_xticks(n, [str(x) for x in n])
        a.set_title("PSS after 20 messages per worker (smaps_rollup)", fontsize=9)
        a.legend(fontsize=7)
        written.append(_save(fig, out / "cost-pss.png"))
        fig, b = plt.subplots(figsize=(8, 4.2))
        for peer, rs in by_peer(summary["workers"]).items():
            n = [r["key"][1] for r in rs]
            line = b.plot(n, [r["ready_s"] for r in rs], "o-", label=f"{peer}: start to ready")[0]
            b.plot(n, [r["stop_s"] for r in rs], "s--", color=line.get_color(), label=f"{peer}: SIGTERM to exit")
        b.set(xscale="log", xlabel="workers / processes", ylabel="seconds")
        b.set_xticks(n, [str(x) for x in n])
        b.set_title("start to ready to deliver; graceful stop", fontsize=9)
        b.legend(fontsize=7)
        written.append(_save(fig, out / "cost-startup.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
