"""The benchmark harness still runs end to end (tiny counts; it asserts no speed, only that it works)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from harness import ROOT


@pytest.mark.timeout(120)
def test_benchmark_harness_runs_and_reports(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--scale",
            "0.01",
            "--reps",
            "1",
            "--peers",
            "A,C $share N=2,procmqtt -w 2",
            "--workloads",
            "W2,W4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert set(report["table"]) == {"W2", "W4"}
    for peer in ("A raw paho", "C $share N=2", "procmqtt -w 2"):
        row = report["table"]["W2"][peer]
        assert row["lost"] == 0 and row["rate"] > 0 and row["pss_mb"] > 0
    assert report["table"]["W4"]["procmqtt -w 2"]["p50_ms"] is not None
    assert report["machine"]["cores"]


@pytest.mark.timeout(120)
def test_benchmark_harness_runs_dispatch_peers_and_keyed_workloads(tmp_path):
    """Issue 13's options: peers with a [workers] dispatch, messages over K keys, the 1/50 ms mix."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--scale",
            "0.03",
            "--reps",
            "1",
            "--peers",
            "procmqtt -w 2 ordered,procmqtt -w 2 least_busy",
            "--workloads",
            "W3-K10,W8",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert [w["keys"] for w in report["workloads"]] == [10, 1]
    for peer in ("procmqtt -w 2 ordered", "procmqtt -w 2 least_busy"):
        assert report["table"]["W3-K10"][peer]["lost"] == 0 and report["table"]["W3-K10"][peer]["rate"] > 0
        assert report["table"]["W8"][peer]["p99_ms"] is not None
