"""The speed targets of issue 16, as data, checked against one run of ``benchmarks/run.py``.

    python3 benchmarks/targets.py benchmarks/results/latest.json

Every target compares paired medians from the same run (``run.py``'s paired ratios: each
repetition's rate over A's, or for W4 its p99 over A's), so a noisy host moves both sides alike.
``run.py`` prints this check after its table; a target whose peers or workload the run left out is
reported as not measured. See docs/performance.md, "Issue 16: where the targets stand".
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

A = "A raw paho"


@dataclass(frozen=True)
class Target:
    """``workload``'s paired ratio for ``peer`` is at least ``factor`` times that of ``against`` (A:
    the ratio itself); with ``at_most``, W4's p99 ratio is at most ``factor`` times A's (1.0)."""

    workload: str
    peer: str
    against: str
    factor: float
    at_most: bool = False

    def describe(self) -> str:
        if self.at_most:
            return f"{self.workload} p99 {self.peer} <= {self.factor:g} x A's"
        return f"{self.workload} {self.peer} >= {self.factor:g} x {'A' if self.against == A else self.against}"


TARGETS = [
    *(Target(w, f"procmqtt -w {n}", f"C $share N={n}", 1.0) for w in ("W1", "W2") for n in (2, 4)),
    *(Target("W6", f"procmqtt -w {n}", A, 1.0) for n in (2, 4)),
    *(Target("W6", f"procmqtt -w {n}", f"C $share N={n}", 0.9) for n in (2, 4)),
    Target("W4", "procmqtt -w 4", A, 1.0, at_most=True),
]


def _ratio(table: dict[str, Any], workload: str, peer: str) -> float | None:
    if peer == A:
        return 1.0 if A in table.get(workload, {}) else None
    row = table.get(workload, {}).get(peer)
    return None if row is None or row.get("paired_ratio") is None else float(row["paired_ratio"])


def check(table: dict[str, Any]) -> list[tuple[Target, float | None, float | None, bool | None]]:
    """Each target with its peer's paired ratio, the bound it is held to, and whether it is met
    (None: the run did not measure it)."""
    rows: list[tuple[Target, float | None, float | None, bool | None]] = []
    for t in TARGETS:
        mine, theirs = _ratio(table, t.workload, t.peer), _ratio(table, t.workload, t.against)
        if mine is None or theirs is None:
            rows.append((t, mine, None, None))
            continue
        bound = t.factor * theirs
        rows.append((t, mine, bound, mine <= bound if t.at_most else mine >= bound))
    return rows


def report(table: dict[str, Any]) -> str:
    """One line per target: its paired ratio, the bound, met or not."""
    lines = ["Issue 16 targets (paired medians of this run):"]
    for t, mine, bound, met in check(table):
        if met is None:
            lines.append(f"  {t.describe():42} not measured in this run")
        else:
            verdict = "met" if met else "NOT met"
            lines.append(f"  {t.describe():42} {mine:5.2f} against {bound:5.2f}  {verdict}")
    return "\n".join(lines)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json")
    try:
        table = json.loads(path.read_text())["table"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"targets.py: cannot read a run's report from {path}: {exc}", file=sys.stderr)
        return 2
    print(report(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
