"""End to end: `procmqtt run` against a private Mosquitto, with real processes and signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import (
    Mosquitto,
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
def test_each_message_handled_exactly_once_and_spread_over_workers(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=4)
    pub = publisher(broker)
    publish_all(pub, [(f"load/{i % 7}", str(i).encode()) for i in range(1000)])
    wait_until(lambda: len(records(rec)) >= 1000, 30, "1000 messages handled")
    done = records(rec)
    counts = Counter(bytes.fromhex(r["payload"]).decode() for r in done)
    assert set(counts) == {str(i) for i in range(1000)}
    assert max(counts.values()) == 1, "a message was handled twice"
    per_worker = Counter(r["worker"] for r in done)
    assert set(per_worker) == {0, 1, 2, 3}, per_worker
    print("per worker:", dict(sorted(per_worker.items())))
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_binary_payloads_are_byte_exact_both_ways(tmp_path, broker, runs):
    run, _rec = start(runs, tmp_path, broker, topics={"echo/#": 1})
    sub = Subscriber(broker, "echoed/#")
    payloads = [bytes(range(256)), b"\x00" * 10, b"", os.urandom(100_000), b"\xff\xfe not utf-8 \x80"]
    pub = publisher(broker)
    publish_all(pub, [(f"echo/{i}", p) for i, p in enumerate(payloads)])
    wait_until(lambda: len(sub.payloads()) >= len(payloads), 20, "echoes")
    got = {m.topic: m.payload for m in sub.messages}
    assert got == {f"echoed/{i}": p for i, p in enumerate(payloads)}
    sub.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_publish_from_worker_seen_by_mosquitto_sub(tmp_path, broker, runs):
    """Interop with Mosquitto's own clients, in both directions."""
    run, _ = start(runs, tmp_path, broker, topics={"echo/#": 1})
    sub = subprocess.Popen(
        ["mosquitto_sub", "-p", str(broker.port), "-t", "echoed/#", "-v", "-C", "3", "-W", "20"], stdout=subprocess.PIPE
    )
    wait_until(lambda: " echoed/#" in broker.log_path.read_text(), 10, "mosquitto_sub subscribed")
    for i in range(3):
        subprocess.run(
            ["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t", f"echo/{i}", "-m", f"hello {i}"],
            check=True,
            timeout=10,
        )
    out, _ = sub.communicate(timeout=25)
    assert sorted(out.decode().splitlines()) == [f"echoed/{i} hello {i}" for i in range(3)]
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_runtime_subscribe_and_unsubscribe(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"ctl/#": 1})
    pub = publisher(broker)
    publish_all(pub, [("extra/1", b"before")])
    publish_all(pub, [("ctl/subscribe", b"extra/#")])
    run.wait_for_log(r"subscribed to extra/#")
    publish_all(pub, [("extra/2", b"during")])
    wait_until(lambda: any(r["topic"] == "extra/2" for r in records(rec)), 10, "extra/2 handled")
    publish_all(pub, [("ctl/unsubscribe", b"extra/#")])
    run.wait_for_log(r"unsubscribed from extra/#")
    publish_all(pub, [("extra/3", b"after"), ("ctl/marker", b"m")])
    wait_until(lambda: any(r["topic"] == "ctl/marker" for r in records(rec)), 10, "marker handled")
    topics = {r["topic"] for r in records(rec)}
    assert "extra/1" not in topics and "extra/3" not in topics and "extra/2" in topics
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_sigterm_finishes_everything_workers_received(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"slow/#": 1}, app={"delay": 0.02})
    pub = publisher(broker)
    for i in range(400):
        pub.publish("slow/x", str(i).encode(), qos=1)
    wait_until(lambda: len(records(rec)) >= 20, 20, "some messages handled")
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0
    received = Counter(r["payload"] for r in records(rec, "received"))
    done = Counter(r["payload"] for r in records(rec, "done"))
    assert received == done, "a worker stopped without finishing a message it had received"
    assert 20 <= sum(done.values()) < 400
    log = run.log()
    assert "Traceback" not in log
    print(f"handled before stop: {sum(done.values())} of 400")


@pytest.mark.timeout(60)
def test_sigterm_then_new_run_handles_the_rest(tmp_path, broker, runs):
    """Undispatched QoS 1 messages stay at the broker (persistent session) for the next run."""
    run, rec = start(runs, tmp_path, broker, topics={"slow/#": 1}, app={"delay": 0.01})
    pub = publisher(broker)
    publish_all(pub, [("slow/x", str(i).encode()) for i in range(300)])
    wait_until(lambda: len(records(rec)) >= 20, 20, "some messages handled")
    assert run.stop() == 0
    run2, _ = start(runs, tmp_path, broker, topics={"slow/#": 1}, app={"delay": 0.0})
    wait_until(lambda: len({r["payload"] for r in records(rec)}) >= 300, 30, "all 300 handled across runs")
    assert run2.stop() == 0


@pytest.mark.timeout(60)
def test_killed_worker_is_replaced_and_its_messages_redelivered(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"slow/#": 1}, workers=2, app={"delay": 0.05})
    victim = run.pids("worker")[0]
    pub = publisher(broker)
    publish_all(pub, [("slow/x", str(i).encode()) for i in range(60)])
    wait_until(lambda: any(r["pid"] == victim for r in records(rec, "received")), 10, "victim busy")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: run.pids("worker").get(0) not in (None, victim), 10, "worker 0 replaced")
    wait_until(lambda: len({r["payload"] for r in records(rec)}) >= 60, 30, "all 60 handled")
    assert any(r["redelivered"] for r in records(rec)), "nothing held by the killed worker was redelivered"
    assert "worker 0 is gone" in run.log()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_killed_agent_is_replaced_and_resubscribes(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"a/#": 1, "ctl/#": 1})
    pub = publisher(broker)
    publish_all(pub, [("ctl/subscribe", b"runtime/#")])
    run.wait_for_log(r"subscribed to runtime/#")
    agent = run.pids("agent")[-1]
    os.kill(agent, signal.SIGKILL)
    run.wait_for_log(r"started agent", count=2)
    run.wait_for_log(r"\[agent\] INFO subscribed to", count=3)
    publish_all(pub, [("a/1", b"after"), ("runtime/1", b"after")])
    wait_until(lambda: {"a/1", "runtime/1"} <= {r["topic"] for r in records(rec)}, 10, "both handled")
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_broker_unreachable_at_start_then_up(tmp_path, runs):
    broker = Mosquitto(tmp_path / "late-broker")
    run, rec = start(runs, tmp_path, broker, topics={"x/#": 1}, wait_ready=False)
    run.wait_for_log(r"broker 127\.0\.0\.1:\d+: cannot connect: Connection refused; retrying in", count=2)
    broker.start()
    try:
        run.ready(timeout=30)
        pub = publisher(broker)
        publish_all(pub, [("x/1", b"hi")])
        wait_until(lambda: records(rec), 10, "message handled")
        assert run.stop() == 0
        assert "Traceback" not in run.log()
    finally:
        broker.stop()


@pytest.mark.timeout(60)
def test_wrong_credentials_exit_4_without_leaking_the_password(tmp_path, runs, monkeypatch):
    broker = Mosquitto(tmp_path / "auth-broker", users={"svc": "right-password"})
    broker.start()
    try:
        cfg = write_config(tmp_path / "auth.toml", broker, topics={"x/#": 1}, app={"record_dir": str(tmp_path)})
        text = Path(cfg).read_text().replace("[mqtt]\n", '[mqtt]\nusername = "svc"\npassword_env = "PMQ_PW"\n')
        Path(cfg).write_text(text)
        run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg, env={"PMQ_PW": "Sup3r-Secret-Wrong"})
        runs.append(run)
        assert run.wait(30) == 4
        log = run.log()
        assert "refused the credentials" in log and "Sup3r-Secret-Wrong" not in log
        assert re.search(
            r"refused the credentials of user 'svc': Not authorized \(CONNACK reason code 5\)", log
        ) or re.search(r"Bad user name or password \(CONNACK reason code 4\)", log), log
        # and the right password works
        run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg, env={"PMQ_PW": "right-password"})
        runs.append(run)
        run.ready()
        for pid in [run.pid, *run.pids("agent").values(), *run.pids("worker").values()]:
            assert b"right-password" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert run.stop() == 0
        assert "right-password" not in run.log()
    finally:
        broker.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("app", "why"),
    [
        ("FailsToBoot", "database unreachable (on purpose)"),
        ("MiddlewareFailsToBoot", "tracing collector unreachable (on purpose)"),  # a middleware's on_start
    ],
)
def test_worker_that_fails_to_boot_stops_procmqtt_with_exit_3(tmp_path, broker, runs, app, why):
    cfg = write_config(tmp_path / "boot.toml", broker, topics={"x/#": 1})
    run = Procmqtt(tmp_path, f"tests/apps.py:{app}", cfg)
    runs.append(run)
    assert run.wait(30) == 3
    assert "worker 0 failed to boot" in run.log() or "worker 1 failed to boot" in run.log()
    assert why in run.log()


@pytest.mark.timeout(60)
def test_handler_exception_is_logged_and_worker_goes_on(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"boom": 1, "ok/#": 1}, workers=1)
    pub = publisher(broker)
    publish_all(pub, [("boom", b"1"), ("ok/1", b"2")])
    wait_until(lambda: any(r["topic"] == "ok/1" for r in records(rec)), 10, "ok/1 handled after the exception")
    log = run.log()
    assert "on_message failed for topic 'boom'" in log and "ValueError: boom requested" in log
    assert len(run.pids("worker")) == 1 and "restarting" not in log
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_mqtt5_with_qos2_subscription(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"q2/#": 2, "echo/#": 1}, mqtt='protocol = "5"')
    assert "(p5, c0" in broker.log_path.read_text()  # MQTT 5, clean start off
    sub = Subscriber(broker, "echoed/#")
    pub = publisher(broker)
    publish_all(pub, [(f"q2/{i}", str(i).encode()) for i in range(50)], qos=2)
    publish_all(pub, [("echo/v5", b"five")])
    wait_until(
        lambda: len({r["payload"] for r in records(rec) if r["topic"].startswith("q2/")}) >= 50,
        20,
        "50 QoS 2 messages handled",
    )
    wait_until(lambda: b"five" in sub.payloads(), 10, "the echo over MQTT 5")
    assert {r["topic"]: r for r in records(rec)}["q2/0"]["size"] == 1
    sub.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_supervisor_sigkilled_leaves_no_orphans(tmp_path, broker, runs):
    run, _ = start(runs, tmp_path, broker, topics={"x/#": 1}, workers=2)
    children = [*run.pids("agent").values(), *run.pids("worker").values()]
    assert len(children) == 3
    run.proc.kill()
    run.wait(10)
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in children),
        15,
        "the agent and workers to exit after the supervisor died",
    )


@pytest.mark.timeout(60)
def test_sigterm_to_the_agent_restarts_the_pipeline_without_loss(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"slow/#": 1}, workers=2, app={"delay": 0.01})
    pub = publisher(broker)
    publish_all(pub, [("slow/x", str(i).encode()) for i in range(200)])
    wait_until(lambda: len(records(rec)) >= 10, 10, "some handled")
    os.kill(run.pids("agent")[-1], signal.SIGTERM)
    run.wait_for_log(r"started agent", count=2)
    wait_until(lambda: len({r["payload"] for r in records(rec)}) >= 200, 30, "all 200 handled")
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_ctrl_c_to_the_process_group_stops_gracefully(tmp_path, broker, runs):
    """A terminal's Ctrl-C reaches every process; only the supervisor acts on it."""
    run, rec = start(runs, tmp_path, broker, topics={"slow/#": 1}, app={"delay": 0.02})
    publish_all(publisher(broker), [("slow/x", str(i).encode()) for i in range(100)])
    wait_until(lambda: len(records(rec)) >= 5, 10, "some handled")
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(30) == 0
    assert Counter(r["payload"] for r in records(rec, "received")) == Counter(r["payload"] for r in records(rec))
    assert "Traceback" not in run.log() and "KeyboardInterrupt" not in run.log()


@pytest.mark.timeout(60)
def test_second_signal_stops_at_once_with_exit_1(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"slow/#": 1}, app={"delay": 20})
    publish_all(publisher(broker), [("slow/x", b"1")])
    wait_until(lambda: records(rec, "received"), 10, "the slow handler to start")
    run.signal(signal.SIGTERM)
    run.wait_for_log(r"stopping gracefully")
    began = time.monotonic()
    run.signal(signal.SIGTERM)
    assert run.wait(10) == 1
    assert time.monotonic() - began < 5
    assert "SIGTERM: stopping now" in run.log()
