#!/usr/bin/env python3
"""Health check for a procmqtt run with --pid: exit 0 when its supervisor is alive and has its agent
and at least one worker running, 1 otherwise (one line on stderr says why). Stdlib only, Linux.

    python3 healthcheck.py --pid /run/procmqtt/procmqtt.pid

A supervisor restarting a dead child passes; one whose children are gone for good (stopping, or
wedged) fails. It cannot see the broker connection: with [metrics] set, `procmqtt status` (or a
scrape of the metrics port) also shows whether messages flow.
"""

from __future__ import annotations

import argparse
import sys


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def check(pidfile: str) -> str | None:
    """None when healthy, else why not."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as exc:
        return f"cannot read the pid from {pidfile}: {exc}"
    if not alive(pid):
        return f"procmqtt (pid {pid}) is not running"
    running = [c for c in children(pid) if alive(c)]
    if len(running) < 2:
        return f"procmqtt (pid {pid}) has {len(running)} child process(es); expected the agent and a worker"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", required=True, metavar="FILE", help="the file given to procmqtt run --pid")
    problem = check(parser.parse_args().pid)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
