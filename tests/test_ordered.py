"""``dispatch = "ordered"`` against a real Mosquitto: per key, one handling at a time, in order.

Many topics of numbered messages, handlers of random length, four workers, one SIGKILLed
mid-stream. For every key, the handling intervals (received to done, or to the kill) never
overlap and the numbers never go back; every message is handled. Then the agent SIGKILLed twice,
where a message can come again (``test_ordered_holds_across_agent_sigkills`` says what holds).

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
import re
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


def handlings(record_dir: Path) -> list[dict]:
    """Each handling (one message run once) with its start and ``end``; a duplicate is its own
    handling (a worker's ``done`` ends its earliest open ``received`` of that message)."""
    events = sorted(records(record_dir, "received") + records(record_dir, "done"), key=lambda r: r["time"])
    open_: dict[tuple, list[dict]] = defaultdict(list)
    out = []
    for r in events:
        which = (r["pid"], r["topic"], r["payload"])
        if r["event"] == "received":
            open_[which].append({**r, "end": None})
            out.append(open_[which][-1])
        else:
            open_[which].pop(0)["end"] = r["time"]
    assert not any(open_.values()), "a handling never finished"
    return out


def number(handling: dict) -> int:
    return int(bytes.fromhex(handling["payload"]).decode())


SLOW = 3  # the number, in every key, whose handler takes ``slow`` seconds


def slow_running(record_dir: Path) -> int:
    """Handlers of a SLOW message started and not finished (before any kill: no duplicates)."""
    slow = str(SLOW).encode().hex()
    started = {r["topic"] for r in records(record_dir, "received") if r["payload"] == slow}
    return len(started - {r["topic"] for r in records(record_dir, "done") if r["payload"] == slow})


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("app", "workers_toml"),
    [
        ("tests/apps.py:Recorder", "prefetch = 1"),
        ("tests/apps_routes.py:AsyncOrdered", "concurrency = 4\nprefetch = 4"),
    ],
    ids=["sync", "async"],
)
def test_ordered_holds_across_agent_sigkills(tmp_path, broker, runs, app, workers_toml):
    """The agent is SIGKILLed twice mid-stream; the workers go on with what the dead agent gave them
    while the new agent gets every unacknowledged message again (README "An agent dies"). Per key:
    handlings never overlap, nothing is lost, each message's first handling follows the first
    handling of every earlier one; a message handled again is one the dead agent had not
    acknowledged, marked redelivered, and may follow later ones of its key: numbers go back only so.

    Handlers take 5-50 ms, except message SLOW of each key (0.4 s): the first kill comes while two
    of those run, so that the broker's copies reach the new agent long before they end (without the
    new agent waiting for what the workers still hold, a copy then ran beside its original)."""
    keys, per_key = 12, 8
    rec = tmp_path / "records"
    rec.mkdir()
    app_toml = {"record_dir": str(rec), "min_delay": 0.005, "max_delay": 0.05, "slow": 0.4, "slow_number": SLOW}
    cfg = write_config(
        tmp_path / "procmqtt.toml",
        broker,
        topics={"ord/#": 1},
        workers=3,
        app=app_toml,
        workers_toml=f'dispatch = "ordered"\n{workers_toml}',
    )
    run = Procmqtt(tmp_path, app, cfg)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=3)
    items = [(f"ord/{k}", str(n).encode()) for n in range(per_key) for k in range(keys)]
    publish_all(publisher(broker), items)
    wait_until(lambda: slow_running(rec) >= 2, 20, "two slow handlers running")
    os.kill(run.pids("agent")[-1], signal.SIGKILL)
    run.wait_for_log(r"started agent", count=2)
    wait_until(lambda: len(records(rec, "done")) >= 60, 20, "60 handled")
    os.kill(run.pids("agent")[-1], signal.SIGKILL)  # restarted after a backoff: the workers may be idle
    run.wait_for_log(r"started agent", count=3)
    want = {(t, p.hex()) for t, p in items}
    wait_until(lambda: want <= {(r["topic"], r["payload"]) for r in records(rec)}, 30, "all handled")
    assert run.stop() == 0
    if "Async" in app:  # it reads AgentStarted mid-handler; a sync worker only between messages (then
        # its answer holds what is queued behind: nothing at prefetch 1; the agent's wait was what mattered)
        assert re.search(r"worker \d still holds [1-9]\d* message", run.log()), "nothing held across a kill"
    by_key: dict[str, list[dict]] = defaultdict(list)
    for h in handlings(rec):
        by_key[h["topic"]].append(h)
    again = 0
    for key, spans in by_key.items():
        for before, after in itertools.pairwise(spans):
            assert after["time"] >= before["end"], f"{key}: {number(after)} began while {number(before)} ran"
        first: list[int] = []
        for h in spans:
            n = number(h)
            if n in first:
                again += 1
                assert h["redelivered"], f"{key}: {n} handled again, not marked redelivered"
            else:
                assert not first or n > first[-1], f"{key}: {n} first handled after {first[-1]}"
                first.append(n)
        assert first == list(range(per_key)), f"{key}: handled {first}"
    print(f"{sum(map(len, by_key.values()))} handlings of {len(items)} messages; {again} again after the kills")
