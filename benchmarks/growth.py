"""How cost grows (issue 16): payload size, offered rate and worker count, in one run.

    python3 benchmarks/growth.py                      # every curve, about 10 minutes on 2 cores
    python3 benchmarks/growth.py --curves workers     # one curve
    python3 benchmarks/growth.py --scale 0.01 --reps 1 --sizes 16 --rates 200 --workers 1 --peers procmqtt

Curves (each peer measured one after the other on the same private Mosquitto, so compare peers
within a run, never a run with another):

- payload: a QoS 1 drain per payload size; msg/s, MB/s and CPU per message of each role (the
  CPU of a one-message run of the same peer is subtracted, so start-up is not counted);
- latency: p50/p99 from publish to handled at a steady offered rate, up to saturation;
- workers: procmqtt -w N (and C, N paho processes) for N = 1..32: PSS per process and in total
  (/proc/<pid>/smaps_rollup, after 20 messages per worker), time to ready (subscribed and every
  worker ready) and the time a graceful stop (SIGTERM) takes.

Writes growth.json and cost-{payload,latency,pss,startup}.png (matplotlib, the `bench` extra)
under --out. Reuses benchmarks/run.py's broker, peers and measurement. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import growth_report  # noqa: E402
import run as bench  # noqa: E402
from common import calibrate, read_progress  # noqa: E402

SIZES = [16, 256, 4096, 65536, 1 << 20, 4 << 20]
RATES = [250, 500, 1000, 2000, 4000, 8000, 16000]
WORKERS = [1, 2, 4, 8, 16, 32]
BYTES_PER_POINT = 96 << 20  # a payload point drains about this much (fewer messages for big payloads)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def peers_for(wanted: str, n: int) -> list[bench.Peer]:
    table = {"A": bench.Peer("A raw paho", "raw"), "C": bench.Peer(f"C $share N={n}", "share", n)}
    table["procmqtt"] = bench.Peer(f"procmqtt -w {n}", "procmqtt", n)
    return [table[k] for k in wanted.split(",") if k in table]


def per_message(cpu: dict[str, float], idle: dict[str, float], n: int) -> dict[str, float]:
    """CPU microseconds per message of each role, the start-up (a one-message run) taken off."""
    return {role: max(0.0, (s - idle.get(role, 0.0))) / n * 1e6 for role, s in cpu.items()}


def payload_curve(args: argparse.Namespace, port: int, work: Path, spin: int, broker: int) -> list[dict[str, Any]]:
    out = []
    for rep in range(args.reps):
        for peer in peers_for(args.peers, 2):
            one = bench.Workload("idle", "one message", 1, "drain", 1)
            idle = bench.measure(peer, one, port, work, f"g{rep}-idle-{peer.run_name}", spin).cpu
            for size in args.sizes:
                n = max(10, int(min(20_000, BYTES_PER_POINT // size) * args.scale))
                w = bench.Workload(f"P{size}", f"{size} B", 1, "drain", n, payload=size)
                before = bench.cpu_seconds(broker)
                r = bench.measure(peer, w, port, work, f"g{rep}-p{size}-{peer.run_name}", spin)
                cpu = {**r.cpu, "broker (in and out)": bench.cpu_seconds(broker) - before}
                us = per_message(cpu, idle, n)
                out.append({"rep": rep, "peer": peer.key, "size": size, "n": n, "rate": r.rate, "lost": r.lost})
                out[-1].update(cpu_us=us, load=loadavg())
                print(f"payload {size:>8} B {peer.key:16} {r.rate:9,.0f} msg/s  " + fmt_cpu(us), flush=True)
    return out


def fmt_cpu(us: dict[str, float]) -> str:
    return "  ".join(f"{role} {v:,.0f} us" for role, v in sorted(us.items()))


def latency_curve(args: argparse.Namespace, port: int, work: Path, spin: int) -> list[dict[str, Any]]:
    out = []
    for rep in range(args.reps):
        for rate in args.rates:
            n = max(100, int(rate * 3 * args.scale))
            w = bench.Workload(f"L{rate}", f"{rate}/s", 1, "paced", n, handler="latency", rate=float(rate))
            for peer in peers_for(args.peers, 2):
                r = bench.measure(peer, w, port, work, f"g{rep}-l{rate}-{peer.run_name}", spin)
                row = {"rep": rep, "peer": peer.key, "offered": rate, "achieved": r.rate, "lost": r.lost}
                row.update(p50_ms=r.p50_ms, p99_ms=r.p99_ms, load=loadavg())
                out.append(row)
                print(
                    f"latency {rate:>6}/s {peer.key:16} achieved {r.rate:9,.0f}/s  "
                    f"p50 {r.p50_ms or 0:.2f} ms p99 {r.p99_ms or 0:.2f} ms",
                    flush=True,
                )
    return out


def start_peer(peer: bench.Peer, port: int, work: Path, run_id: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The peer subscribed to a fresh filter, logging at DEBUG (procmqtt logs "worker N ready")."""
    count_dir = work / f"{run_id}-counts"
    count_dir.mkdir()
    topic_filter = f"bench/{run_id}/#"
    config = work / f"{run_id}.toml"
    config.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nclient_id = "bench-{run_id}"\n'
        f'[mqtt.topics]\n"{topic_filter}" = {{ qos = 1 }}\n'
    )
    command = peer.command(port, f"bench-{run_id}", topic_filter, 1, config)
    command = [("DEBUG" if a == "INFO" else a) for a in command]
    env = {
        **os.environ,
        "BENCH_DIR": str(count_dir),
        "BENCH_WORKLOAD": "noop",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    log_path = work / f"{run_id}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=HERE, start_new_session=True
        )
    return proc, log_path, count_dir


def wait_ready(proc: subprocess.Popen[bytes], peer: bench.Peer, log_path: Path, began: float) -> float:
    """Seconds from the start until the peer can deliver: subscribed, and for procmqtt every
    worker has said Ready."""
    bench.ready(proc, peer, log_path, timeout=60)
    if peer.kind == "procmqtt":
        deadline = time.monotonic() + 60
        while len(set(re.findall(r"worker (\d+) ready", log_path.read_text(errors="replace")))) < peer.n:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{peer.key}: workers not ready: {log_path.read_text()[-2000:]}")
            time.sleep(0.005)
    return time.monotonic() - began


def workers_curve(args: argparse.Namespace, port: int, work: Path) -> list[dict[str, Any]]:
    out = []
    for rep in range(args.reps):
        for n in args.workers:
            for peer in peers_for(",".join(k for k in args.peers.split(",") if k != "A"), n):
                run_id = f"g{rep}-w{n}-{peer.run_name}"
                began = time.monotonic()
                proc, log_path, count_dir = start_peer(peer, port, work, run_id)
                try:
                    ready_s = wait_ready(proc, peer, log_path, began)
                    bench.publish(port, f"bench/{run_id}/x", [b"x" * 32] * (20 * n), 1)
                    deadline = time.monotonic() + 60
                    while read_progress(str(count_dir))[0] < 20 * n and time.monotonic() < deadline:
                        time.sleep(0.02)
                    roles = bench.roles(peer, proc.pid, log_path.read_text(errors="replace"))
                    pss = {pid: bench.pss_mb([pid]) for pid in roles}
                    by_role: dict[str, list[float]] = {}
                    for pid, role in roles.items():
                        by_role.setdefault(role, []).append(pss[pid])
                    stop_began = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
                    stop_s = time.monotonic() - stop_began
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                label = "C $share" if peer.kind == "share" else peer.kind
                row = {"rep": rep, "peer": label, "workers": n, "ready_s": ready_s, "stop_s": stop_s}
                row.update(pss_total_mb=sum(pss.values()), pss_by_role_mb=by_role, load=loadavg())
                out.append(row)
                print(
                    f"workers {n:>3} {peer.key:16} ready {ready_s:.2f} s  stop {stop_s:.2f} s  "
                    f"PSS {sum(pss.values()):.0f} MB",
                    flush=True,
                )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curves", default="payload,latency,workers", help="which curves, comma-separated")
    parser.add_argument("--peers", default="A,C,procmqtt", help="of A, C, procmqtt (the workers curve skips A)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every message count")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="payload sizes in bytes")
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="offered msg/s")
    parser.add_argument("--workers", default=",".join(map(str, WORKERS)), help="worker counts")
    parser.add_argument("--out", default=str(HERE / "results"), help="where growth.json and the charts go")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the charts of a growth.json into --out")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print("wrote", *growth_report.charts(saved["summary"], Path(args.out)))
        return 0
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.rates = [int(x) for x in args.rates.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    curves = args.curves.split(",")
    spin = calibrate()
    work = Path(tempfile.mkdtemp(prefix="procmqtt-growth-"))
    broker, port = bench.start_broker(work)
    raw: dict[str, list[dict[str, Any]]] = {}
    load = [loadavg()]
    started = time.time()
    try:
        if "payload" in curves:
            raw["payload"] = payload_curve(args, port, work, spin, broker.pid)
        if "latency" in curves:
            raw["latency"] = latency_curve(args, port, work, spin)
        if "workers" in curves:
            raw["workers"] = workers_curve(args, port, work)
    finally:
        broker.terminate()
        broker.wait(10)
    load += [r["load"] for rows in raw.values() for r in rows]
    summary = growth_report.summarize(raw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": bench.machine(),
        "load_average_1min": {"min": min(load), "median": statistics.median(load), "max": max(load)},
        "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "minutes": round((time.time() - started) / 60, 1),
        "args": {k: v for k, v in vars(args).items()},
        "summary": summary,
        "model": growth_report.model(summary),
        "runs": raw,
    }
    (out / "growth.json").write_text(json.dumps(report, indent=1))
    drawn = growth_report.charts(summary, out)
    print(f"machine: {report['machine']}; load average {report['load_average_1min']}")
    print(f"wrote {out / 'growth.json'}" + "".join(f", {p.name}" for p in drawn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
