"""At-least-once under faults: every process dies at some point, and nothing is lost.

Each test prints `sent=… processed=… lost=… duplicates=…`; duplicates are allowed only for
messages in flight at the moment of a fault.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import (
    Procmqtt,
    Subscriber,
    _alive,
    publish_all,
    publisher,
    records,
    start,
    wait_until,
    write_config,
)


def tally(sent: list[str], record_dir: Path, label: str = "") -> tuple[int, int]:
    """Print the figures; returns (lost, duplicates)."""
    done = Counter(bytes.fromhex(r["payload"]).decode() for r in records(record_dir) if r["topic"].startswith("load/"))
    lost = len(set(sent) - set(done))
    duplicates = sum(done.values()) - len(done)
    print(f"{label}sent={len(sent)} processed={len(done)} lost={lost} duplicates={duplicates}")
    return lost, duplicates


def handled_all(sent: list[str], record_dir: Path):
    want = set(sent)
    return lambda: (
        want <= {bytes.fromhex(r["payload"]).decode() for r in records(record_dir) if r["topic"].startswith("load/")}
    )


@pytest.mark.timeout(120)
def test_1_random_worker_sigkilled_every_200ms(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=4)
    sent = [str(i) for i in range(10_000)]
    pub = publisher(broker)
    stop = threading.Event()
    kills = []

    def killer() -> None:
        while not stop.wait(0.2):
            pids = list(run.pids("worker").values())
            if pids:
                victim = random.choice(pids)
                os.kill(victim, signal.SIGKILL)
                kills.append(victim)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        for start_at in range(0, len(sent), 400):  # a steady stream over about 5 s
            batch = sent[start_at : start_at + 400]
            publish_all(pub, [(f"load/{int(i) % 10}", i.encode()) for i in batch], timeout=60)
            time.sleep(0.2)
        wait_until(handled_all(sent, rec), 60, "all 10,000 handled")
    finally:
        stop.set()
        thread.join()
    lost, duplicates = tally(sent, rec, f"kills={len(kills)} ")
    assert lost == 0 and len(kills) >= 10
    assert duplicates <= len(kills) * 16  # at most what each killed worker held (its prefetch window)
    assert run.stop() == 0


@pytest.mark.timeout(120)
def test_2_agent_sigkilled_twice_mid_stream(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=2, app={"delay": 0.0005})
    sent = [str(i) for i in range(5_000)]
    pub = publisher(broker)
    publish_all(pub, [(f"load/{i}", i.encode()) for i in sent], timeout=60)
    for n, threshold in enumerate((1_000, 3_000), start=2):
        wait_until(lambda t=threshold: len(records(rec)) >= t, 60, f"{threshold} handled")
        os.kill(run.pids("agent")[-1], signal.SIGKILL)
        run.wait_for_log(r"started agent", count=n)
    wait_until(handled_all(sent, rec), 60, "all 5,000 handled")
    lost, _duplicates = tally(sent, rec)
    assert lost == 0
    assert run.stop() == 0


@pytest.mark.timeout(150)
def test_3_broker_sigkilled_and_restarted_while_workers_publish(tmp_path, persistent_broker, runs):
    broker = persistent_broker
    run, rec = start(runs, tmp_path, broker, topics={"echo/#": 1}, workers=3)
    echoes = Subscriber(broker, "echoed/#", qos=1, persistent=True)
    pub = publisher(broker)
    sent = [str(i) for i in range(1_500)]
    infos = []
    for i, seq in enumerate(sent):
        infos.append(pub.publish(f"echo/{seq}", seq.encode(), qos=1))
        if i == 500:
            # Mosquitto acknowledges a publish before it saves it, so a message acknowledged
            # in the instant before SIGKILL can die with the broker. Let the test's own
            # publisher settle first: what is in flight at the kill is procmqtt's.
            wait_until(lambda: all(info.is_published() for info in infos), 20, "publisher to settle")
            time.sleep(0.2)
            in_flight = 501 - len(records(rec))
            broker.kill()
            time.sleep(0.5)
            broker.start()
            # paho returns an error for a publish made while it is disconnected, so the test
            # publisher waits; what it had in flight is resent by paho itself.
            wait_until(pub.is_connected, 20, "the test publisher to reconnect")
        time.sleep(0.001)
    wait_until(lambda: all(info.is_published() for info in infos), 60, "the test publisher to finish")

    def handled() -> set[str]:
        return {r["topic"][5:] for r in records(rec) if r["topic"].startswith("echo/")}

    wait_until(lambda: set(sent) <= handled(), 60, "every message handled")
    wait_until(lambda: set(sent) <= {m.topic[7:] for m in echoes.messages}, 60, "every echo delivered")
    got = Counter(r["topic"][5:] for r in records(rec) if r["topic"].startswith("echo/"))
    echoed = Counter(m.topic[7:] for m in echoes.messages)
    print(f"messages not yet handled by procmqtt when the broker was killed: {in_flight}")
    print(
        f"in: sent={len(sent)} processed={len(got)} lost={len(set(sent) - set(got))} "
        f"duplicates={sum(got.values()) - len(got)}"
    )
    print(
        f"out: sent={len(got)} processed={len(echoed)} lost={len(set(got) - set(echoed))} "
        f"duplicates={sum(echoed.values()) - len(echoed)}"
    )
    assert set(got) == set(sent) and set(echoed) == set(sent)
    assert in_flight > 0, "the broker was not killed mid-stream"
    assert "connection lost" in run.log()
    echoes.close()
    assert run.stop() == 0


@pytest.mark.timeout(120)
def test_4_sigterm_mid_stream_then_a_new_run(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=2, app={"delay": 0.002})
    sent = [str(i) for i in range(2_000)]
    pub = publisher(broker)
    publish_all(pub, [(f"load/{i}", i.encode()) for i in sent])
    wait_until(lambda: len(records(rec)) >= 200, 30, "200 handled")
    assert run.stop() == 0
    first = len(records(rec))
    run2, _ = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=2)
    wait_until(handled_all(sent, rec), 60, "all handled across the two runs")
    lost, duplicates = tally(sent, rec, f"first_run={first} ")
    assert lost == 0 and duplicates == 0  # a graceful stop holds nothing in flight
    assert run2.stop() == 0


@pytest.mark.timeout(120)
def test_5_poison_message_is_dead_lettered_after_max_attempts(tmp_path, broker, runs):
    dlq = Subscriber(broker, "dlq/#")
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"load/#": 1, "poison": 1},
        workers=3,
        workers_toml='max_attempts = 3\ndead_letter_topic = "dlq"',
    )
    sent = [str(i) for i in range(300)]
    pub = publisher(broker)
    items = [(f"load/{i}", i.encode()) for i in sent]
    items.insert(100, ("poison", b"deadly payload"))
    publish_all(pub, items)
    wait_until(handled_all(sent, rec), 60, "every other message handled")
    wait_until(lambda: dlq.payloads() == [b"deadly payload"], 30, "the poison message in the dead-letter topic")
    assert dlq.messages[0].topic == "dlq/poison"
    deaths = run.log().count("was killed by SIGKILL")
    lost, _duplicates = tally(sent, rec, f"poison_deaths={deaths} dead_lettered={len(dlq.messages)} ")
    assert lost == 0 and deaths == 3
    assert "dead-lettering the message on 'poison'" in run.log()
    dlq.close()
    assert run.stop() == 0
    assert ", 1 dead-lettered," in run.log()  # the agent's closing summary


@pytest.mark.timeout(120)
def test_6_hung_handler_is_killed_with_its_stack_logged(tmp_path, broker, runs):
    run, rec = start(
        runs, tmp_path, broker, topics={"load/#": 1, "hang": 1}, workers=2, workers_toml="timeout = 2\nmax_attempts = 1"
    )
    pub = publisher(broker)
    publish_all(pub, [("hang", b"forever")])
    hung = wait_until(lambda: [r for r in records(rec, "received") if r["topic"] == "hang"], 10, "hang started")[0]
    sent = [str(i) for i in range(200)]
    publish_all(pub, [(f"load/{i}", i.encode()) for i in sent])
    wait_until(lambda: not _alive(hung["pid"]), 10, "the hung worker to be killed")
    killed_after = time.monotonic() - hung["time"]
    wait_until(handled_all(sent, rec), 30, "the others handled")
    log = run.log()
    lost, _ = tally(sent, rec, f"hung_worker_killed_after={killed_after:.1f}s ")
    assert lost == 0 and killed_after <= 2 + 1.0 + 0.5 + 1.0  # timeout + check interval + dump grace + slack
    assert "has spent" in log and "timeout 2s" in log
    assert 'tests/apps.py", line' in log and " in on_message" in log, "no stack dump in the log"
    assert "dropping the message on 'hang'" in log  # max_attempts = 1 and no dead-letter topic
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_7_worker_failing_on_start_exits_3_with_a_one_line_cause(tmp_path, broker, runs):
    cfg = write_config(tmp_path / "boot.toml", broker, topics={"x/#": 1})
    run = Procmqtt(tmp_path, "tests/apps.py:FailsToBoot", cfg)
    runs.append(run)
    began = time.monotonic()
    assert run.wait(30) == 3
    took = time.monotonic() - began
    errors = [line for line in run.log().splitlines() if "stopping with exit code 3" in line]
    print(f"exit=3 after {took:.1f}s: {errors[0].split(' ERROR ')[-1]}")
    assert took < 10 and len(errors) == 1
    assert "worker 0 failed to boot" in errors[0] or "worker 1 failed to boot" in errors[0]
