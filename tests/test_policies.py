"""Delivery policies on a real broker: recycling, retry on error, publish backpressure, crash loops."""

from __future__ import annotations

import itertools
import os
import signal
from collections import Counter

import pytest
from harness import (
    Procmqtt,
    Subscriber,
    publish_all,
    publisher,
    records,
    start,
    wait_until,
    write_config,
)


@pytest.mark.timeout(60)
def test_recycling_after_max_messages_loses_and_repeats_nothing(tmp_path, broker, runs):
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"load/#": 1},
        workers=2,
        workers_toml="max_messages = 40\nmax_messages_jitter = 10",
    )
    pub = publisher(broker)
    publish_all(pub, [(f"load/{i}", str(i).encode()) for i in range(400)])
    wait_until(lambda: len({r["payload"] for r in records(rec)}) >= 400, 30, "all 400 handled")
    done = records(rec)
    pids = Counter(r["pid"] for r in done)
    assert len(done) == 400, "a message was handled twice"
    assert not any(r["redelivered"] for r in done)
    # each process retires after 40..50 messages and finishes what it holds (prefetch 16)
    assert len(pids) >= 7 and max(pids.values()) <= 50 + 16, pids
    assert "recycling: " in run.log() and "killed" not in run.log()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_recycling_above_max_memory(tmp_path, broker, runs):
    run, _rec = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=1, workers_toml="max_memory_mb = 1")
    pub = publisher(broker)
    publish_all(pub, [("load/1", b"1")])
    run.wait_for_log(r"recycling: resident memory \d+ MB > max_memory_mb")
    run.wait_for_log(r"started worker 0", count=2)
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_on_error_retry_then_dead_letter(tmp_path, broker, runs):
    dlq = Subscriber(broker, "dead/#")
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"boom": 1, "load/#": 1},
        workers=2,
        workers_toml='on_error = "retry"\nmax_attempts = 3\ndead_letter_topic = "dead"',
    )
    pub = publisher(broker)
    publish_all(pub, [("boom", b"bad"), ("load/1", b"good")])
    wait_until(lambda: dlq.payloads() == [b"bad"], 20, "the failing message dead-lettered")
    tries = [r for r in records(rec, "received") if r["topic"] == "boom"]
    assert len(tries) == 3 and [r["redelivered"] for r in tries] == [False, True, True]
    assert any(r["topic"] == "load/1" for r in records(rec))
    dlq.close()
    assert run.stop() == 0


def gaps(tries: list[dict]) -> list[float]:
    return [b["time"] - a["time"] for a, b in itertools.pairwise(tries)]


@pytest.mark.timeout(60)
def test_delayed_retries_follow_the_backoff_while_others_flow(tmp_path, broker, runs):
    dlq = Subscriber(broker, "dead/#")
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"boom": 1, "load/#": 1},
        workers=2,
        workers_toml='on_error = "retry"\nmax_attempts = 4\ndead_letter_topic = "dead"\n'
        "retry_delay = 0.3\nretry_backoff = 2.0\nretry_max_delay = 1.0",
    )
    pub = publisher(broker)
    publish_all(pub, [("boom", b"bad")])
    wait_until(lambda: any(r["topic"] == "boom" for r in records(rec, "received")), 10, "the first try")
    publish_all(pub, [(f"load/{i}", str(i).encode()) for i in range(20)])  # while it waits
    wait_until(lambda: dlq.payloads() == [b"bad"], 20, "the failing message dead-lettered")
    tries = [r for r in records(rec, "received") if r["topic"] == "boom"]
    assert len(tries) == 4 and [r["redelivered"] for r in tries] == [False, True, True, True]
    for gap, delay in zip(gaps(tries), [0.3, 0.6, 1.0], strict=True):  # 0.3 * 2 ** n, capped at 1.0, + <= 10 % jitter
        assert delay <= gap < delay * 1.1 + 0.5, (gaps(tries), delay)
    load = [r for r in records(rec) if r["topic"].startswith("load/")]
    assert len(load) == 20 and max(r["time"] for r in load) < tries[-1]["time"], "others waited for the retries"
    dlq.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_retry_after_is_honoured_even_with_on_error_ack(tmp_path, broker, runs):
    dlq = Subscriber(broker, "dead/#")
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"retry/#": 1},
        workers=1,
        workers_toml='max_attempts = 3\ndead_letter_topic = "dead"\nretry_delay = 5.0',
    )
    publish_all(publisher(broker), [("retry/0.4", b"later")])
    wait_until(lambda: dlq.payloads() == [b"later"], 20, "dead-lettered after max_attempts")
    tries = [r for r in records(rec, "received") if r["topic"] == "retry/0.4"]
    assert len(tries) == 3
    assert all(0.4 <= gap < 0.4 + 0.5 for gap in gaps(tries)), gaps(tries)  # its own delay, not retry_delay
    assert "asked for a retry (3 attempts)" in run.log()
    dlq.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_on_error_ack_is_the_default(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"boom": 1}, workers=1)
    publish_all(publisher(broker), [("boom", b"bad")])
    run.wait_for_log(r"on_message failed for topic 'boom'")
    assert run.stop() == 0
    # acknowledged: a new run on the same session gets nothing again
    run2, _ = start(runs, tmp_path, broker, topics={"boom": 1}, workers=1)
    publish_all(publisher(broker), [("boom", b"marker")])
    wait_until(lambda: len(records(rec, "received")) >= 2, 10, "the marker")
    assert [bytes.fromhex(r["payload"]) for r in records(rec, "received")] == [b"bad", b"marker"]
    assert run2.stop() == 0


@pytest.mark.timeout(60)
def test_sigterm_to_a_worker_hands_its_queue_on_without_counting_attempts(tmp_path, broker, runs):
    run, rec = start(
        runs, tmp_path, broker, topics={"load/#": 1}, workers=2, app={"delay": 0.05}, workers_toml="max_attempts = 1"
    )
    pub = publisher(broker)
    publish_all(pub, [(f"load/{i}", str(i).encode()) for i in range(40)])
    wait_until(lambda: len(records(rec)) >= 2, 10, "work started")
    os.kill(run.pids("worker")[0], signal.SIGTERM)
    wait_until(lambda: len({r["payload"] for r in records(rec)}) >= 40, 20, "all 40 handled")
    assert "dropping" not in run.log()  # with max_attempts = 1 a counted attempt would drop it
    assert len(records(rec)) == 40
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_publish_buffer_full_blocks_then_raises_and_keeps_what_it_holds(tmp_path, persistent_broker, runs):
    broker = persistent_broker
    out = Subscriber(broker, "buf/#", qos=1, persistent=True)
    cfg = write_config(
        tmp_path / "p.toml",
        broker,
        topics={"pub/#": 0},
        workers=1,
        mqtt="publish_buffer = 5\npublish_timeout = 1",
        app={"record_dir": str(tmp_path), "pub_delay": 1.0},
    )
    run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg)
    runs.append(run)
    run.ready()
    publish_all(publisher(broker), [("pub/8", b"")], qos=0)
    wait_until(lambda: list(tmp_path.glob("*.jsonl")) and records(tmp_path, "received"), 10, "trigger")
    broker.stop()  # the handler publishes 8 while the broker is down
    run.wait_for_log(r"PublishBufferFull: publish to 'buf/5': this worker already has 5 unconfirmed")
    broker.start()
    wait_until(lambda: len(out.messages) >= 5, 20, "the 5 buffered publishes")
    assert sorted(m.topic for m in out.messages) == [f"buf/{i}" for i in range(5)]
    out.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_crash_loop_stops_with_exit_3(tmp_path, broker, runs):
    (tmp_path / "crashy.py").write_text(
        "import os\nfrom procmqtt import Worker\n"
        "class Crashy(Worker):\n"
        "    def on_start(self):\n        os._exit(9)  # dies at boot without raising\n"
        "    def on_message(self, message):\n        pass\n"
    )
    cfg = write_config(tmp_path / "c.toml", broker, topics={"x/#": 1}, workers=1)
    run = Procmqtt(tmp_path, f"{tmp_path}/crashy.py:Crashy", cfg)
    runs.append(run)
    assert run.wait(40) == 3
    assert "worker 0 died 5 times in a row within 5s of starting, before handling any message" in run.log()


@pytest.mark.timeout(60)
def test_slow_workers_hold_back_the_broker_instead_of_dropping(tmp_path, broker, runs):
    """Backpressure: the agent reads ahead at most count x prefetch messages; a QoS 0 flood waits
    at the broker and in TCP, and nothing is dropped on the way."""
    run, rec = start(
        runs, tmp_path, broker, topics={"fast/#": 0}, workers=1, app={"delay": 0.005}, workers_toml="prefetch = 4"
    )
    pub = publisher(broker)
    publish_all(pub, [(f"fast/{i}", str(i).encode()) for i in range(600)], qos=0)
    wait_until(lambda: len(records(rec)) >= 600, 30, "all 600 QoS 0 messages handled")
    assert sorted(int(bytes.fromhex(r["payload"])) for r in records(rec)) == list(range(600))
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_handlers_waiting_on_publishes_are_not_stalled_by_backpressure(tmp_path, broker, runs):
    """With the read-ahead full, the agent must still read the PUBACKs handlers are waiting for."""
    run, _rec = start(runs, tmp_path, broker, topics={"echo/#": 1}, workers=1, workers_toml="prefetch = 1")
    out = Subscriber(broker, "echoed/#")
    publish_all(publisher(broker), [(f"echo/{i}", b"x") for i in range(300)])
    wait_until(lambda: len(out.messages) >= 300, 20, "300 echoes confirmed one by one")
    assert "not confirmed" not in run.log()
    out.close()
    assert run.stop() == 0
