#!/usr/bin/env python3
"""Health check for a procmqtt run: exit 0 when healthy, 1 otherwise (one line on stderr says why).
Stdlib only.

    python3 healthcheck.py --url http://127.0.0.1:8081/livez    # with [health] port = 8081
    python3 healthcheck.py --pid /run/procmqtt/procmqtt.pid      # without [health]; Linux

--url asks procmqtt's own health endpoint (docs/health.md): /livez passes while the supervisor's
and the agent's loops run, whatever the broker does; /readyz only while connected, subscribed and
with a worker ready. Prefer it. --pid looks at the process tree only: a supervisor alive with its
agent and at least one worker running passes (one restarting a dead child too); it cannot see a
wedged loop or the broker connection.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

TIMEOUT = 5.0
"""Seconds for the whole request (the endpoint closes a connection after 2)."""


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


def ask(url: str) -> str | None:
    """None when ``url`` answers 200, else why not (the endpoint's first problem when it gives one)."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            response.read()
            return None
    except urllib.error.HTTPError as exc:
        try:
            problems = json.loads(exc.read()).get("problems") or []
        except (ValueError, AttributeError, OSError):
            problems = []
        return f"{url} answered {exc.code}" + (f": {problems[0]}" if problems else "")
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="procmqtt's /livez or /readyz, e.g. http://127.0.0.1:8081/livez")
    where.add_argument("--pid", metavar="FILE", help="the file given to procmqtt run --pid")
    args = parser.parse_args()
    problem = ask(args.url) if args.url else check(args.pid)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
