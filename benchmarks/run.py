"""procmqtt against its peers, in one run, on one private Mosquitto.

    python3 benchmarks/run.py            # every peer and workload, 3 repetitions (about 15 min)
    python3 benchmarks/run.py --quick    # smaller counts, 1 repetition (about 3 min)
    python3 benchmarks/run.py --workloads W3-K1000 --peers "procmqtt -w 4 ordered,procmqtt -w 4 random"

A peer named "procmqtt -w N DISPATCH" runs procmqtt with [workers] dispatch = DISPATCH. The
workloads W3-K* and W8 are not in the default run: name them with --workloads (issue 13).

Prints a table of medians (msg/s and the ratio to A, raw paho), and writes
benchmarks/results/latest.json and, with matplotlib installed (pip install -e '.[bench]'),
benchmarks/results/latest.png. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import targets  # noqa: E402
from common import calibrate, read_latencies, read_progress  # noqa: E402


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    qos: int
    mode: str  # drain (preloaded, then timed), live (published after ready), paced (steady rate)
    n: int
    payload: int = 32
    handler: str = "noop"
    keys: int = 1  # messages go round-robin to this many topics (order keys) under the peer's filter
    rate: float = 1000.0  # msg/s, for mode "paced"


WORKLOADS = [
    Workload("W1", "no-op, QoS 0, drain", 0, "drain", 100_000),
    Workload("W2", "no-op, QoS 1, drain", 1, "drain", 50_000),
    Workload("W3", "1 ms CPU, QoS 1, live", 1, "live", 4_000, handler="cpu"),
    Workload("W4", "latency, QoS 1, 1000/s", 1, "paced", 2_000, handler="latency"),
    Workload("W5", "one QoS 1 publish each", 1, "live", 20_000, handler="publish"),
    Workload("W6", "64 KiB payloads, QoS 1, drain", 1, "drain", 4_000, payload=65536),
]

# Issue 13 (ordered and least_busy dispatch): only run when named with --workloads.
EXTRA_WORKLOADS = [
    *(Workload(f"W3-K{k}", f"W3 over {k:,} keys", 1, "live", 4_000, handler="cpu", keys=k) for k in (1, 10, 1000)),
    Workload("W8", "1 ms + 1 in 20 50 ms, QoS 1, 150/s", 1, "paced", 1_500, handler="mix", rate=150.0),
]


@dataclass(frozen=True)
class Peer:
    key: str
    kind: str  # raw, pool, share, procmqtt
    n: int = 1
    dispatch: str = ""  # procmqtt only: [workers] dispatch ("" = the default)

    @property
    def run_name(self) -> str:
        return f"{self.kind}{self.n}{self.dispatch}"

    def command(self, port: int, client_id: str, topic_filter: str, qos: int, config: Path) -> list[str]:
        if self.kind == "procmqtt":
            return [
                sys.executable,
                "-m",
                "procmqtt",
                "run",
                "bench_app:Bench",
                "-c",
                str(config),
                "-w",
                str(self.n),
                "--log-level",
                "INFO",
            ]
        return [
            sys.executable,
            str(HERE / "peers.py"),
            self.kind,
            "127.0.0.1",
            str(port),
            client_id,
            topic_filter,
            str(qos),
            str(self.n),
        ]

    def client_ids(self, client_id: str) -> list[str]:
        return [f"{client_id}-{i}" for i in range(self.n)] if self.kind == "share" else [client_id]


PEERS = [
    Peer("A raw paho", "raw"),
    Peer("B Pool N=2", "pool", 2),
    Peer("B Pool N=4", "pool", 4),
    Peer("C $share N=2", "share", 2),
    Peer("C $share N=4", "share", 4),
    Peer("procmqtt -w 2", "procmqtt", 2),
    Peer("procmqtt -w 4", "procmqtt", 4),
]


@dataclass
class Result:
    peer: str
    workload: str
    rate: float = 0.0
    lost: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    pss_mb: float = 0.0
    startup_s: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    note: str = ""


# --- the broker -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(directory: Path, extra: list[str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = directory / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "max_queued_messages 2000000",
        "max_queued_bytes 0",
        "queue_qos0_messages true",
        "log_type error",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    lines += extra or []
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def paho_client(port: int, client_id: str, clean: bool = True) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not c.is_connected():  # paced publishing starts its clock only once the broker answered
        if time.monotonic() > deadline:
            raise RuntimeError(f"{client_id}: no CONNACK from the broker on port {port} within 10 s")
        time.sleep(0.001)
    return c


def prepare_sessions(port: int, client_ids: list[str], topic_filter: str, qos: int) -> None:
    """Persistent sessions subscribed and then offline, so the broker queues for them."""
    for cid in client_ids:
        c = paho_client(port, cid, clean=False)
        _rc, mid = c.subscribe(topic_filter, qos)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and mid in c._out_messages:  # paho's own table: setup only
            time.sleep(0.01)
        time.sleep(0.05)
        c.disconnect()
        c.loop_stop()


def publish(port: int, topic: str, payloads: list[bytes], qos: int, rate: float | None = None, keys: int = 1) -> None:
    """Message i goes to ``topic`` with one key, else to ``topic/<i mod keys>``."""
    c = paho_client(port, f"bench-pub-{time.monotonic_ns()}")
    start = time.monotonic()
    infos = []
    for i, payload in enumerate(payloads):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            payload = struct.pack("=d", time.monotonic()) + payload[8:]
        infos.append(c.publish(topic if keys == 1 else f"{topic}/{i % keys}", payload, qos))
        if len(infos) % 2000 == 0:  # keep paho's queue short
            infos[-1000].wait_for_publish(30)
    marker = c.publish(topic + "/end", b"", 1)  # the broker handles a client's packets in order
    marker.wait_for_publish(60)
    for info in infos[-100:]:
        info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()


# --- measuring a peer ------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in tree(k)]


def pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def roles(peer: Peer, root: int, log: str) -> dict[int, str]:
    pids = [root, *tree(root)]
    if peer.kind == "procmqtt":
        named = {
            int(p): ("agent" if r == "agent" else "worker")
            for r, p in re.findall(r"started (agent|worker \d+) \(pid (\d+)\)", log)
        }
        return {p: named.get(p, "supervisor") for p in pids}
    if peer.kind == "pool":
        return {p: ("paho" if p == root else "pool worker") for p in pids}
    if peer.kind == "share":
        return {p: "paho" for p in pids if p != root}
    return {root: "paho"}


def ready(proc: subprocess.Popen[bytes], peer: Peer, log_path: Path, timeout: float = 20) -> float:
    """Seconds until the peer is subscribed."""
    want = peer.n if peer.kind == "share" else 1
    pattern = "subscribed to" if peer.kind == "procmqtt" else "READY"
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if log_path.read_text(errors="replace").count(pattern) >= want:
            return time.monotonic() - start
        if proc.poll() is not None:
            raise RuntimeError(f"{peer.key} exited: {log_path.read_text()[-2000:]}")
        time.sleep(0.005)
    raise RuntimeError(f"{peer.key} not ready after {timeout}s")


def measure(peer: Peer, w: Workload, port: int, work: Path, run_id: str, spin: int) -> Result:
    result = Result(peer.key, w.key)
    count_dir = work / f"{run_id}-counts"
    count_dir.mkdir()
    topic_filter = f"bench/{run_id}/#"
    client_id = f"bench-{run_id}"
    config = work / f"{run_id}.toml"
    config.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nclient_id = "{client_id}"\n'
        f'[mqtt.topics]\n"{topic_filter}" = {{ qos = {w.qos} }}\n'
        + (f'[workers]\ndispatch = "{peer.dispatch}"\n' if peer.dispatch else "")
    )
    payloads = [os.urandom(w.payload) for _ in range(min(w.n, 64))]
    items = [payloads[i % len(payloads)] for i in range(w.n)]
    if w.handler == "mix":  # byte 8 marks the long (50 ms) messages: one in 20
        items = [p[:8] + (b"\1" if i % 20 == 0 else b"\0") + p[9:] for i, p in enumerate(items)]
    subscriber = None
    if w.handler == "publish":
        subscriber = Counter(port, "bench/out")
    prepare_sessions(
        port,
        peer.client_ids(client_id),
        f"$share/bench/{topic_filter}" if peer.kind == "share" else topic_filter,
        w.qos,
    )
    if w.mode == "drain":
        publish(port, f"bench/{run_id}/x", items, w.qos, keys=w.keys)
    env = {
        **os.environ,
        "BENCH_DIR": str(count_dir),
        "BENCH_WORKLOAD": w.handler,
        "BENCH_SPIN": str(spin),
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    log_path = work / f"{run_id}.log"
    with open(log_path, "wb") as log:
        began = time.monotonic()
        proc = subprocess.Popen(
            peer.command(port, client_id, topic_filter, w.qos, config),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=HERE,
            start_new_session=True,
        )
    try:
        if w.mode != "drain":  # a drain needs no wait: its messages are already queued
            result.startup_s = ready(proc, peer, log_path)
        published_at = time.monotonic()
        if w.mode == "live":
            publish(port, f"bench/{run_id}/x", items, w.qos, keys=w.keys)
        elif w.mode == "paced":
            publish(port, f"bench/{run_id}/x", [b"\0" * 8 + p[8:] for p in items], w.qos, rate=w.rate, keys=w.keys)
        deadline = time.monotonic() + 120
        peak = 0.0
        while time.monotonic() < deadline:
            handled, first, last = read_progress(str(count_dir))
            peak = max(peak, pss_mb([proc.pid, *tree(proc.pid)]))
            outputs = subscriber.count if subscriber else w.n
            if handled >= w.n and outputs >= w.n:
                break
            time.sleep(0.02)
        handled, first, last = read_progress(str(count_dir))
        if subscriber is not None:
            end = subscriber.last or time.monotonic()
            result.rate = min(subscriber.count, w.n) / max(1e-9, end - published_at)
            result.lost = max(0, w.n - subscriber.count)
        elif w.mode == "drain":
            result.rate = (handled - 1) / max(1e-9, last - first)
            result.lost = max(0, w.n - handled)
        else:
            result.rate = handled / max(1e-9, last - published_at)
            result.lost = max(0, w.n - handled)
        if w.handler in ("latency", "mix"):
            lat = sorted(read_latencies(str(count_dir)))
            if lat:
                result.p50_ms = lat[len(lat) // 2] * 1000
                result.p99_ms = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        result.pss_mb = peak
        for pid, role in roles(peer, proc.pid, log_path.read_text(errors="replace")).items():
            result.cpu[role] = result.cpu.get(role, 0.0) + cpu_seconds(pid)
        if w.mode == "drain" and handled:
            result.startup_s = first - began  # process start to first message handled
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the peer left behind
        except ProcessLookupError:
            pass
        if subscriber is not None:
            subscriber.close()
    return result


class Counter:
    """An independent subscriber that counts what the handlers published."""

    def __init__(self, port: int, topic: str) -> None:
        self.count = 0
        self.last = 0.0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-out-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        done = []
        self.client.on_subscribe = lambda *a: done.append(1)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, 1)
        self.client.loop_start()
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.count += 1
        self.last = time.monotonic()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- the report -----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    import importlib.metadata as md

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": f"{mem:.0f}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "paho_mqtt": md.version("paho-mqtt"),
        "procmqtt": md.version("procmqtt"),
        "broker": version,
    }


def summarize(results: list[Result]) -> dict[str, dict[str, dict[str, Any]]]:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for w in {r.workload for r in results}:
        for p in {r.peer for r in results if r.workload == w}:
            rs = [r for r in results if r.workload == w and r.peer == p]
            rates = [r.rate for r in rs]
            row = {
                "rate": statistics.median(rates),
                "spread": (min(rates), max(rates)),
                "lost": max(r.lost for r in rs),
                "pss_mb": statistics.median(r.pss_mb for r in rs),
                "reps": len(rs),
            }
            for k in ("p50_ms", "p99_ms", "startup_s"):
                vals = [getattr(r, k) for r in rs if getattr(r, k) is not None]
                row[k] = statistics.median(vals) if vals else None
            roles_ = {role for r in rs for role in r.cpu}
            row["cpu_s"] = {role: statistics.median(r.cpu.get(role, 0.0) for r in rs) for role in roles_}
            table.setdefault(w, {})[p] = row
    for (w, p), ratios in paired_ratios(results).items():
        table[w][p]["paired_ratio"] = statistics.median(ratios)
    for rows in table.values():
        base = rows.get(PEERS[0].key, {}).get("rate") or 0
        base_p99 = rows.get(PEERS[0].key, {}).get("p99_ms") or 0
        for row in rows.values():
            row["ratio"] = row["rate"] / base if base else None
            row["p99_ratio"] = row["p99_ms"] / base_p99 if base_p99 and row["p99_ms"] is not None else None
    return table


def paired_ratios(results: list[Result]) -> dict[tuple[str, str], list[float]]:
    """Each repetition's rate over A's rate in the same repetition (measured minutes apart, not a
    whole run apart), per workload and peer. Results arrive in run order, so the i-th result of a
    (workload, peer) belongs to the same repetition as A's i-th result for that workload. A paced
    latency workload (W4, W8) compares p99 latencies instead: lower is better there."""
    seen: dict[tuple[str, str], list[float]] = {}
    for r in results:
        seen.setdefault((r.workload, r.peer), []).append(r.rate if r.p99_ms is None else r.p99_ms)
    out = {}
    for (w, p), rates in seen.items():
        base = seen.get((w, PEERS[0].key), [])
        if p != PEERS[0].key and len(base) == len(rates) and all(base):
            out[(w, p)] = [r / a for r, a in zip(rates, base, strict=True)]
    return out


def paired_markdown(results: list[Result], peers: list[Peer], workloads: list[Workload]) -> str:
    """Median of the per-repetition ratios to A, with their range: less sensitive to one disturbed
    repetition than the ratio of medians in the main table."""
    ratios = paired_ratios(results)
    lines = ["| peer | " + " | ".join(w.key for w in workloads) + " |", "|" + "---|" * (len(workloads) + 1)]
    for p in peers[1:]:
        cells = []
        for w in workloads:
            rs = ratios.get((w.key, p.key))
            cells.append(f"{statistics.median(rs):.2f} [{min(rs):.2f}-{max(rs):.2f}]" if rs else "n/a")
        lines.append(f"| {p.key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(table: dict[str, dict[str, dict[str, Any]]], peers: list[Peer], workloads: list[Workload]) -> str:
    lines = []
    head = f"{'peer':16}" + "".join(f"{w.key + ' ' + w.title[:18]:>27}" for w in workloads)
    lines.append(head)
    for p in peers:
        cells = []
        for w in workloads:
            row = table.get(w.key, {}).get(p.key)
            if not row:
                cells.append(f"{'n/a':>27}")
                continue
            text = f"{row['rate']:,.0f}/s ({row['ratio']:.2f})" if row["ratio"] else f"{row['rate']:,.0f}/s"
            if row["p50_ms"] is not None:
                text = f"{row['p50_ms']:.2f}/{row['p99_ms']:.2f} ms ({row['p99_ratio'] or 0:.2f})"
            if row["lost"]:
                text += f" lost {row['lost']}"
            cells.append(f"{text:>27}")
        lines.append(f"{p.key:16}" + "".join(cells))
    lines.append("")
    lines.append(
        f"{'peak PSS (MB), W3':16}"
        + "".join(f"{p.key}: {table.get('W3', {}).get(p.key, {}).get('pss_mb', 0):.0f}  " for p in peers)
    )
    return "\n".join(lines)


def markdown(table: dict[str, dict[str, dict[str, Any]]], peers: list[Peer], workloads: list[Workload]) -> str:
    """The table for docs/performance.md: median msg/s (ratio to A) [spread]; W4 p50/p99."""
    head = "| peer | " + " | ".join(f"{w.key} {w.title}" for w in workloads) + " | PSS W3 | startup |"
    lines = [head, "|" + "---|" * (len(workloads) + 3)]
    for p in peers:
        cells = []
        for w in workloads:
            row = table.get(w.key, {}).get(p.key)
            if not row:
                cells.append("n/a")
            elif row["p50_ms"] is not None:
                cells.append(f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f} ms (p99 {row['p99_ratio'] or 0:.2f} × A)")
            else:
                lo, hi = row["spread"]
                ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}"  # A not in this run
                cells.append(
                    f"{row['rate']:,.0f} ({ratio}) [{lo:,.0f}-{hi:,.0f}]"
                    + (f" lost {row['lost']}" if row["lost"] else "")
                )
        w3 = table.get("W3", {}).get(p.key, {})
        starts = [
            table[w.key][p.key]["startup_s"]
            for w in workloads
            if w.mode != "drain" and table.get(w.key, {}).get(p.key, {}).get("startup_s") is not None
        ]
        cells.append(f"{w3.get('pss_mb', 0):.0f} MB")
        cells.append(f"{statistics.median(starts):.2f} s" if starts else "")
        lines.append(f"| {p.key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(
    table: dict[str, dict[str, dict[str, Any]]], peers: list[Peer], workloads: list[Workload], path: Path
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(peers)
    for i, p in enumerate(peers):
        ratios = [table.get(w.key, {}).get(p.key, {}).get("ratio") or 0 for w in workloads]
        ax.bar([x + i * width for x in range(len(workloads))], ratios, width, label=p.key)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))])
    ax.set_xticklabels([f"{w.key}\n{w.title}" for w in workloads], fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("msg/s relative to A (raw paho); W4: rate at 1000/s")
    ax.set_title("procmqtt and its peers, medians of one run (higher is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def select_peers(wanted: str) -> list[Peer]:
    """The listed peers by key prefix, plus any "procmqtt -w N DISPATCH"."""
    if not wanted:
        return PEERS
    names = wanted.split(",")
    chosen = [p for p in PEERS if any(p.key.startswith(k) for k in names)]
    for name in names:
        m = re.fullmatch(r"procmqtt -w (\d+) (\w+)", name)
        if m:
            chosen.append(Peer(name, "procmqtt", int(m.group(1)), m.group(2)))
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages, one repetition")
    parser.add_argument("--scale", type=float, default=None, help="multiply every message count (--quick: 0.1)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, or 1 with --quick)")
    parser.add_argument("--peers", default="", help="comma-separated peer key prefixes, e.g. 'A,procmqtt'")
    parser.add_argument("--workloads", default="", help="comma-separated workload keys, e.g. 'W1,W2'")
    parser.add_argument("--out", default=str(HERE / "results"), help="where latest.json/png go")
    parser.add_argument(
        "--broker-line",
        action="append",
        default=[],
        metavar="LINE",
        help="an extra mosquitto.conf line for experiments, e.g. 'max_inflight_messages 100' "
        "(recorded in the JSON; the documented runs use none)",
    )
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        print("benchmarks need the mosquitto binary (apt-get install mosquitto)", file=sys.stderr)
        return 2
    reps = args.reps or (1 if args.quick else 3)
    peers = select_peers(args.peers)
    workloads = [w for w in WORKLOADS + EXTRA_WORKLOADS if w.key in args.workloads.split(",")] or WORKLOADS
    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    if scale != 1.0:
        workloads = [dataclasses.replace(w, n=max(100, int(w.n * scale))) for w in workloads]
    spin = calibrate()
    work = Path(tempfile.mkdtemp(prefix="procmqtt-bench-"))
    broker, port = start_broker(work, args.broker_line)
    results: list[Result] = []
    try:
        for rep in range(reps):
            for w in workloads:
                for p in peers:
                    if w.handler == "publish" and p.kind == "pool":
                        continue  # a Pool worker has no connection to publish on
                    run_id = f"{rep}-{w.key}-{p.run_name}"
                    r = measure(p, w, port, work, run_id, spin)
                    results.append(r)
                    print(
                        f"rep {rep + 1}/{reps} {w.key} {p.key:16} {r.rate:10,.0f} msg/s  lost {r.lost}"
                        + (f"  p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms" if r.p50_ms is not None else ""),
                        flush=True,
                    )
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    table = summarize(results)
    text = print_table(table, peers, workloads)
    print()
    print(text)
    print()
    print(targets.report(table))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "broker_lines": args.broker_line,
        "spin_iterations_per_ms": spin,
        "reps": reps,
        "scale": scale,
        "workloads": [w.__dict__ for w in workloads],
        "table": table,
        "runs": [r.__dict__ for r in results],
    }
    (out / "latest.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "latest.md").write_text(
        markdown(table, peers, workloads) + "\n\nPaired ratios (median of each "
        "repetition's rate over A's in the same repetition; for W4 and W8, its p99 latency over A's) [range]:\n\n"
        + paired_markdown(results, peers, workloads)
        + "\n"
    )
    drawn = chart(table, peers, workloads, out / "latest.png")
    print(f"\nmachine: {report['machine']}")
    print(
        f"wrote {out / 'latest.json'}"
        + (f" and {out / 'latest.png'}" if drawn else " (install matplotlib for the chart)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
