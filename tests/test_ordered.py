"""``dispatch = "ordered"`` against a real Mosquitto: per key, one handling at a time, in order.

Many topics of numbered messages, handlers of random length, four workers, one SIGKILLed
mid-stream. For every key, the handling intervals (received to done, or to the kill) never
overlap and the numbers never go back; every message is handled.

procmqtt keeps each key in the order messages reach the agent. Mosquitto keeps one topic's QoS 1
messages in publish order only while it need not queue them behind a full in-flight window
(``max_inflight_messages``, 20 by default: its documentation promises order only at 1): with the
window full and acknowledgements coming back out of order, as they do from any consumer that
runs messages in parallel, it sends queued messages out of publish order (seen with a plain paho
client acknowledging at random: hundreds of inversions in 480 messages). So these tests run their
broker with no in-flight maximum, and docs/delivery.md's "Ordered delivery" says what to configure.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Mosquitto, Procmqtt, publish_all, publisher, records, start, wait_until, write_config

KEYS = 12
PER_KEY = 40


@pytest.fixture
def broker(tmp_path: Path):
    """A private broker that sends one topic's messages in publish order (see the module docstring)."""
    b = Mosquitto(tmp_path / "ordered-broker", extra=("max_inflight_messages 0",))
    b.start()
    yield b
    b.stop()


def check_order(record_dir: Path, key_of: Callable[[str], str], kills: dict[int, float], sent: int) -> None:
    """Per key: intervals disjoint, numbers never back; all handled."""
    done = {(r["pid"], r["topic"], r["payload"]): r["time"] for r in records(record_dir, "done")}
    handlings: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for r in records(record_dir, "received"):
        end = done.get((r["pid"], r["topic"], r["payload"]))
        if end is None:
            assert r["pid"] in kills, f"{r['topic']} {r['payload']} received, never done, worker not killed"
            end = kills[r["pid"]]
        handlings[key_of(r["topic"])].append((r["time"], end, int(bytes.fromhex(r["payload"]).decode())))
    assert len(handlings) == KEYS
    for key, spans in handlings.items():
        spans.sort()
        for (_, end, number), (began, _, following) in itertools.pairwise(spans):
            assert began >= end, f"key {key}: {following} started before {number} was settled"
            assert following >= number, f"key {key}: {following} after {number}"
    numbers = {(key_of(t), bytes.fromhex(p).decode()) for _, t, p in done}
    assert len(numbers) == sent, f"handled {len(numbers)} of {sent}"


def run_ordered(tmp_path: Path, broker, runs: list[Procmqtt], order_key: str, topic: Callable[[int, int], str]) -> None:
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"ord/#": 1},
        workers=4,
        app={"max_delay": 0.01},
        workers_toml=f'dispatch = "ordered"\norder_key = "{order_key}"\nprefetch = 4',
    )
    items = [(topic(k, n), str(n).encode()) for n in range(PER_KEY) for k in range(KEYS)]
    pub = publisher(broker)
    publish_all(pub, items[: len(items) // 2])
    wait_until(lambda: len(records(rec, "done")) >= 60, 20, "60 handled")
    kills: dict[int, float] = {}
    victim = random.choice(list(run.pids("worker").values()))
    kills[victim] = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    publish_all(pub, items[len(items) // 2 :])
    want = {(t, str(n).encode().hex()) for t, n in ((t, int(p)) for t, p in items)}
    wait_until(lambda: want <= {(r["topic"], r["payload"]) for r in records(rec)}, 60, "all handled")
    return_code = run.stop()
    key_of = (lambda t: t) if order_key == "topic" else (lambda t: "/".join(t.split("/")[:2]))
    check_order(rec, key_of, kills, len(items))
    assert return_code == 0


@pytest.mark.timeout(120)
def test_ordered_per_topic_with_a_worker_sigkilled(tmp_path, broker, runs):
    run_ordered(tmp_path, broker, runs, "topic", lambda k, n: f"ord/{k}")


@pytest.mark.timeout(120)
def test_ordered_on_a_named_level_with_a_worker_sigkilled(tmp_path, broker, runs):
    run_ordered(tmp_path, broker, runs, "ord/{device}/#", lambda k, n: f"ord/{k}/{'abc'[n % 3]}")


@pytest.mark.timeout(60)
def test_ordered_holds_with_async_handlers_and_concurrency(tmp_path, broker, runs):
    """Two event-loop workers with four slots each: keys overlap, one key's messages never do."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = write_config(
        tmp_path / "procmqtt.toml",
        broker,
        topics={"ord/#": 1},
        workers=2,
        app={"record_dir": str(record_dir), "max_delay": 0.02},
        workers_toml='dispatch = "ordered"\nconcurrency = 4',
    )
    run = Procmqtt(tmp_path, "tests/apps_routes.py:AsyncOrdered", cfg)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=2)
    items = [(f"ord/{k}", str(n).encode()) for n in range(PER_KEY) for k in range(KEYS)]
    publish_all(publisher(broker), items)
    wait_until(lambda: len(records(record_dir, "done")) >= len(items), 30, "all handled")
    assert run.stop() == 0
    check_order(record_dir, lambda t: t, {}, len(items))
    events = sorted(
        [(r["time"], 1, r["pid"]) for r in records(record_dir, "received")]
        + [(r["time"], -1, r["pid"]) for r in records(record_dir, "done")]
    )
    running: dict[int, int] = defaultdict(int)
    most = 0
    for _, step, pid in events:
        running[pid] += step
        most = max(most, running[pid])
    assert most > 1, "no worker ever ran two handlers at once: concurrency was not exercised"
