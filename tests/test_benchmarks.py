"""The benchmark harness still runs end to end (tiny counts; it asserts no speed, only that it works)."""

from __future__ import annotations

import importlib
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT


def run_script(name: str, *args: str, timeout: float = 55) -> str:
    """``benchmarks/<name>`` with ``args``; its standard output, after it exited 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def bench_module(name: str) -> Any:
    """A module of ``benchmarks/``, imported for its pure functions."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def run_harness(out: Path, scale: str, peers: str, workloads: str) -> dict[str, Any]:
    """``benchmarks/run.py`` with one repetition; its report (latest.json)."""
    run_script(
        "run.py",
        "--scale",
        scale,
        "--reps",
        "1",
        "--peers",
        peers,
        "--workloads",
        workloads,
        "--out",
        str(out),
        timeout=110,
    )
    report: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return report


@pytest.mark.timeout(120)
def test_benchmark_harness_runs_and_reports(tmp_path):
    report = run_harness(tmp_path, "0.01", "A,C $share N=2,procmqtt -w 2", "W2,W4")
    assert set(report["table"]) == {"W2", "W4"}
    for peer in ("A raw paho", "C $share N=2", "procmqtt -w 2"):
        row = report["table"]["W2"][peer]
        assert row["lost"] == 0 and row["rate"] > 0 and row["pss_mb"] > 0
    assert report["table"]["W4"]["procmqtt -w 2"]["p50_ms"] is not None
    assert report["machine"]["cores"]


@pytest.mark.timeout(120)
def test_benchmark_harness_runs_dispatch_peers_and_keyed_workloads(tmp_path):
    """Issue 13's options: peers with a [workers] dispatch, messages over K keys, the 1/50 ms mix."""
    report = run_harness(tmp_path, "0.03", "procmqtt -w 2 ordered,procmqtt -w 2 least_busy", "W3-K10,W8")
    assert [w["keys"] for w in report["workloads"]] == [10, 1]
    for peer in ("procmqtt -w 2 ordered", "procmqtt -w 2 least_busy"):
        assert report["table"]["W3-K10"][peer]["lost"] == 0 and report["table"]["W3-K10"][peer]["rate"] > 0
        assert report["table"]["W8"][peer]["p99_ms"] is not None


@pytest.mark.timeout(60)
def test_growth_curves_run_and_report(tmp_path):
    """Issue 16's curves (benchmarks/growth.py), one point each: payload, offered rate, workers."""
    run_script(
        "growth.py",
        *("--scale", "0.002", "--reps", "1", "--peers", "procmqtt", "--sizes", "65536"),
        *("--rates", "200", "--workers", "2", "--out", str(tmp_path)),
    )
    report = json.loads((tmp_path / "growth.json").read_text())
    (payload,) = report["summary"]["payload"]
    assert payload["key"] == ["procmqtt -w 2", 65536] and payload["lost"] == 0 and payload["rate"] > 0
    assert {"agent", "worker"} <= set(payload["cpu_us"])
    (latency,) = report["summary"]["latency"]
    assert latency["lost"] == 0 and latency["p99_ms"] is not None
    (workers,) = report["summary"]["workers"]
    assert workers["ready_s"] > 0 and workers["stop_s"] > 0 and set(workers["pss_mean_mb"]) >= {"agent", "worker"}
    assert report["machine"]["cores"] and report["model"]["agent_us"] >= 0


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_latencies_leave_out_the_start_up_transient(tmp_path):
    """A paced run's first messages arrive together ~20 ms late for every peer: they would be
    its p99. The warm-up share, by publish time across every process's file, is left out."""
    read_latencies = bench_module("common").read_latencies

    # two processes; messages published 1 ms apart; the first 20 (of 1,000) wait for 20 ms
    sent = [100.0 + i / 1000 for i in range(1000)]
    latency = [0.020 - i / 1000 if i < 20 else 0.0002 for i in range(1000)]
    for pid in (1, 2):
        with open(tmp_path / f"{pid}.lat", "wb") as f:
            for i in range(pid - 1, 1000, 2):
                f.write(struct.pack("=dd", sent[i], latency[i]))
    kept = sorted(read_latencies(str(tmp_path)))
    assert len(kept) == 950
    assert kept[int(len(kept) * 0.99)] == pytest.approx(0.0002)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["sync", "async"])
def test_worker_cost_runs(loop):
    """Issue 16's per-message worker cost (benchmarks/worker_cost.py): every Done comes back."""
    out = run_script("worker_cost.py", "--messages", "200", "--runs", "1", *(["--async"] if loop == "async" else []))
    assert f"{loop} loop:" in out and "per message" in out


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_paired_ratios_compare_p99_latencies_for_paced_workloads():
    """W4's paired ratio is a p99 over A's (it was the paced rate over A's, always 1.00)."""
    run = bench_module("run")
    results = [
        run.Result("A raw paho", "W4", rate=1000.0, p99_ms=2.0),
        run.Result("procmqtt -w 2", "W4", rate=1000.0, p99_ms=3.0),
        run.Result("A raw paho", "W1", rate=100.0),
        run.Result("procmqtt -w 2", "W1", rate=150.0),
    ]
    ratios = run.paired_ratios(results)
    assert ratios[("W4", "procmqtt -w 2")] == [1.5]
    assert ratios[("W1", "procmqtt -w 2")] == [1.5]


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_the_targets_are_checked_against_paired_medians_of_one_run():
    """benchmarks/targets.py: each target against its bound from the same run; what the run left
    out is not measured, never met."""
    targets = bench_module("targets")
    table = {
        "W1": {"A raw paho": {}, "C $share N=2": {"paired_ratio": 1.5}, "procmqtt -w 2": {"paired_ratio": 1.6}},
        "W6": {"A raw paho": {}, "C $share N=2": {"paired_ratio": 1.2}, "procmqtt -w 2": {"paired_ratio": 1.05}},
        "W4": {"A raw paho": {}, "procmqtt -w 4": {"paired_ratio": 1.3}},
    }
    verdicts = {t.describe(): met for t, _, _, met in targets.check(table)}
    assert verdicts["W1 procmqtt -w 2 >= 1 x C $share N=2"] is True
    assert verdicts["W1 procmqtt -w 4 >= 1 x C $share N=4"] is None  # not in this run
    assert verdicts["W6 procmqtt -w 2 >= 1 x A"] is True
    assert verdicts["W6 procmqtt -w 2 >= 0.9 x C $share N=2"] is False  # 1.05 < 0.9 x 1.2
    assert verdicts["W4 p99 procmqtt -w 4 <= 1 x A's"] is False
    assert "NOT met" in targets.report(table) and "not measured" in targets.report(table)
