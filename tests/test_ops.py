"""Operations end to end: SIGHUP reload, SIGTTIN/SIGTTOU, --pid, --log-file with SIGUSR1.

Real processes, real signals, a private Mosquitto (tests/harness.py); nothing mocked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from harness import (
    ROOT,
    Mosquitto,
    Procmqtt,
    publish_all,
    publisher,
    records,
    start,
    wait_until,
    write_config,
)
from paho.mqtt.enums import CallbackAPIVersion

APP = '''"""An app whose code the tests rewrite between reloads."""
import json, os, time
from procmqtt import Worker

VERSION = {version!r}


class App(Worker):
    def on_start(self):
        {on_start}
        self.fd = os.open(os.path.join(self.config.app["record_dir"], f"{{os.getpid()}}.jsonl"),
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def on_message(self, message):
        time.sleep(float(self.config.app.get("delay", 0)))
        line = {{"event": "done", "version": VERSION, "topic": message.topic, "payload": message.payload.hex(),
                 "pid": os.getpid(), "worker": self.worker_id, "time": time.monotonic(),
                 "redelivered": message.redelivered}}
        os.write(self.fd, (json.dumps(line) + "\\n").encode())
'''


def write_app(path: Path, version: str, on_start: str = "pass") -> None:
    path.write_text(APP.format(version=version, on_start=on_start))


def start_versioned(
    runs: list[Procmqtt],
    tmp_path: Path,
    broker,
    *,
    topics: dict[str, int],
    workers: int = 2,
    app: dict | None = None,
    mqtt: str = "",
    args: tuple[str, ...] = (),
) -> tuple[Procmqtt, Path, Path]:
    """Run the rewritable app (version "v1"); returns the run, its record directory and its source file."""
    rec = tmp_path / "records"
    rec.mkdir(exist_ok=True)
    source = tmp_path / "versioned_app.py"
    write_app(source, "v1")
    cfg = write_config(
        tmp_path / "procmqtt.toml",
        broker,
        topics=topics,
        workers=workers,
        mqtt=mqtt,
        app={"record_dir": str(rec), **(app or {})},
    )
    run = Procmqtt(tmp_path, f"{source}:App", cfg, *args)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=workers)
    return run, rec, source


def rewrite_config(
    tmp_path: Path,
    broker,
    rec: Path,
    *,
    topics: dict[str, int],
    workers: int = 2,
    app: dict | None = None,
    mqtt: str = "",
) -> None:
    write_config(
        tmp_path / "procmqtt.toml",
        broker,
        topics=topics,
        workers=workers,
        mqtt=mqtt,
        app={"record_dir": str(rec), **(app or {})},
    )


class Stream:
    """Publishes ``count`` numbered QoS 1 messages at a steady rate from a thread, like a live source."""

    def __init__(self, broker, topic: str, count: int, rate: float) -> None:
        self.client = publisher(broker)
        self.topic, self.count, self.rate = topic, count, rate
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        began = time.monotonic()
        infos = []
        for i in range(self.count):
            delay = began + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            infos.append(self.client.publish(self.topic, str(i).encode(), qos=1))
            self.sent = i + 1
        for info in infos:
            info.wait_for_publish(30)

    def join(self) -> None:
        self.thread.join(60)
        self.client.loop_stop()
        self.client.disconnect()


def check_nothing_lost(rec: Path, count: int, timeout: float = 40) -> Counter:
    """Every message 0..count-1 handled; returns how often each was handled (duplicates > 1)."""
    expected = {str(i).encode().hex() for i in range(count)}
    wait_until(lambda: expected <= {r["payload"] for r in records(rec)}, timeout, f"all {count} handled")
    handled = Counter(r["payload"] for r in records(rec))
    lost = len(expected - set(handled))
    duplicates = sum(n - 1 for n in handled.values())
    print(f"sent={count} processed={len(handled)} lost={lost} duplicates={duplicates}")
    assert lost == 0
    return handled


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


# --- SIGHUP ---------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_sighup_applies_subscription_changes_and_replaces_workers(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"old/#": 1, "kept/#": 1, "qos/#": 0})
    old_workers = set(run.pids("worker").values())
    agent = run.pids("agent")
    rewrite_config(tmp_path, broker, rec, topics={"new/#": 1, "kept/#": 1, "qos/#": 1}, workers=3)
    run.signal(signal.SIGHUP)
    run.wait_for_log(r"reload: subscribe new/# \(qos 1\), qos/# \(qos 1\); unsubscribe old/#; 3 worker\(s\)")
    run.wait_for_log(r"\[agent\] INFO unsubscribed from old/#")
    run.wait_for_log(r"\[agent\] INFO subscribed to new/# \(qos 1\)")
    run.wait_for_log(r"\[agent\] INFO subscribed to qos/# \(qos 1\)")  # the broker granted the new QoS
    run.wait_for_log(r"started worker", count=5)  # 2, then 3 from the new configuration
    wait_until(lambda: not old_workers & set(run.pids("worker").values()), 15, "the old workers to exit")
    wait_until(lambda: len(children_of(run.pid)) == 4, 10, "agent + 3 workers in /proc")
    assert set(run.pids("worker")) == {0, 1, 2}
    assert run.pids("agent") == agent, "the agent was restarted for a subscription change"
    pub = publisher(broker)
    publish_all(pub, [("old/1", b"removed"), ("new/1", b"added"), ("kept/1", b"kept"), ("qos/1", b"q")])
    wait_until(
        lambda: {"new/1", "kept/1", "qos/1"} <= {r["topic"] for r in records(rec)},
        10,
        "messages on the new and kept filters",
    )
    assert "old/1" not in {r["topic"] for r in records(rec)}
    assert not {r["pid"] for r in records(rec) if r["topic"] == "new/1"} & old_workers
    assert "connected to" in run.log() and run.log().count("connected to") == 1  # one connection all along
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_filter_removed_while_the_broker_is_down_is_unsubscribed_on_reconnect(tmp_path, persistent_broker, runs):
    """The persistent session at the broker still holds the filter; the agent must remove it there too."""
    broker = persistent_broker
    run, rec = start(runs, tmp_path, broker, topics={"keep/#": 1, "drop/#": 1})
    broker.stop()
    run.wait_for_log(r"connection lost")
    rewrite_config(tmp_path, broker, rec, topics={"keep/#": 1})
    run.signal(signal.SIGHUP)
    run.wait_for_log(r"reload: unsubscribe drop/#")
    broker.start()
    run.wait_for_log(r"connected to .*session present: True")
    run.wait_for_log(r"\[agent\] INFO unsubscribed from drop/#")
    publish_all(publisher(broker), [("drop/1", b"removed"), ("keep/1", b"kept")])
    wait_until(lambda: any(r["topic"] == "keep/1" for r in records(rec)), 10, "keep/1 handled")
    assert "drop/1" not in {r["topic"] for r in records(rec)}
    assert run.stop() == 0


@pytest.mark.timeout(120)
def test_sighup_during_a_qos1_stream_loses_nothing_and_runs_the_new_code(tmp_path, broker, runs):
    run, rec, source = start_versioned(runs, tmp_path, broker, topics={"stream/#": 1}, workers=3, app={"delay": 0.002})
    stream = Stream(broker, "stream/x", 2400, rate=400)
    wait_until(lambda: len(records(rec)) >= 300, 20, "the stream to flow")
    write_app(source, "v2")
    run.signal(signal.SIGHUP)
    wait_until(lambda: any(r["version"] == "v2" for r in records(rec)), 20, "v2 handling messages")
    # Every v2 worker started: a slot whose v1 worker were still finishing would go straight to v3.
    wait_until(lambda: len(re.findall(r"started worker", run.log())) >= 6, 20, "every v2 worker started")
    write_app(source, "v3-longer")  # another size: no stale bytecode within the same second
    run.signal(signal.SIGHUP)  # a second reload while the first one's workers are fresh
    wait_until(lambda: any(r["version"] == "v3-longer" for r in records(rec)), 20, "v3 handling messages")
    stream.join()
    handled = check_nothing_lost(rec, 2400)
    assert sum(n - 1 for n in handled.values()) == 0, "a graceful reload handled a message twice"
    versions = Counter(r["version"] for r in records(rec))
    print("messages per version:", dict(versions))
    assert set(versions) == {"v1", "v2", "v3-longer"}
    log = run.log()
    assert log.count("started agent") == 1 and "Traceback" not in log
    assert len(re.findall(r"started worker", log)) == 9  # 3 workers x 3 revisions
    assert run.stop() == 0


@pytest.mark.timeout(120)
def test_sighup_with_a_connection_change_restarts_the_agent_without_loss(tmp_path, broker, runs):
    run, rec, _ = start_versioned(runs, tmp_path, broker, topics={"stream/#": 1}, app={"delay": 0.002})
    stream = Stream(broker, "stream/x", 1500, rate=300)
    wait_until(lambda: len(records(rec)) >= 200, 20, "the stream to flow")
    rewrite_config(tmp_path, broker, rec, topics={"stream/#": 1}, mqtt="keepalive = 30", app={"delay": 0.002})
    run.signal(signal.SIGHUP)
    run.wait_for_log(r"reload: \[mqtt\] keepalive changed: the agent reconnects")
    run.wait_for_log(r"started agent", count=2)
    run.wait_for_log(r"connected to .*session present: True")  # the persistent session kept the stream
    stream.join()
    check_nothing_lost(rec, 1500)
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_sighup_with_a_broken_config_or_app_keeps_running_the_old_one(tmp_path, broker, runs):
    run, rec, source = start_versioned(runs, tmp_path, broker, topics={"a/#": 1})
    workers = run.pids("worker")
    cfg = tmp_path / "procmqtt.toml"
    good = cfg.read_text()
    pub = publisher(broker)

    def still_handles(tag: str) -> None:
        publish_all(pub, [(f"a/{tag}", tag.encode())])
        wait_until(lambda: any(r["topic"] == f"a/{tag}" for r in records(rec)), 10, f"a/{tag} handled")

    cfg.write_text(good + "[broken\n")
    run.signal(signal.SIGHUP)
    run.wait_for_log(
        r"ERROR reload failed; still running the previous configuration and app: "
        r".*procmqtt\.toml: not valid TOML"
    )
    still_handles("1")
    cfg.write_text(good.replace("[workers]", "[workers]\ncuont = 3"))
    run.signal(signal.SIGHUP)
    run.wait_for_log(r"reload failed; .*\[workers\] unknown key 'cuont' \(did you mean 'count'\?\)")
    still_handles("2")
    cfg.write_text(good)
    source.write_text("this is not python (\n")
    run.signal(signal.SIGHUP)
    run.wait_for_log(r"reload failed; .*versioned_app\.py.* raised SyntaxError")
    still_handles("3")
    assert run.pids("worker") == workers, "a failed reload replaced workers"
    assert {r["version"] for r in records(rec)} == {"v1"}
    write_app(source, "v2")
    run.signal(signal.SIGHUP)
    run.wait_for_log(r"reload: no subscription or connection change")
    run.wait_for_log(r"started worker", count=4)
    wait_until(lambda: not set(workers.values()) & set(run.pids("worker").values()), 15, "the old workers to exit")
    still_handles("4")
    assert {r["version"] for r in records(rec) if r["topic"] == "a/4"} == {"v2"}
    assert run.proc.poll() is None and "Traceback" not in run.log()
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_reloaded_app_that_fails_to_boot_goes_back_to_the_previous_one(tmp_path, broker, runs):
    run, rec, source = start_versioned(runs, tmp_path, broker, topics={"a/#": 1})
    write_app(source, "v2", on_start='raise RuntimeError("v2 cannot start (on purpose)")')
    run.signal(signal.SIGHUP)
    run.wait_for_log(
        r"worker \d failed to boot; see the traceback above; going back to the app and "
        r"configuration from before the reload"
    )
    assert "v2 cannot start (on purpose)" in run.log()
    pub = publisher(broker)
    publish_all(pub, [(f"a/{i}", str(i).encode()) for i in range(20)])
    wait_until(lambda: len(records(rec)) >= 20, 15, "20 messages handled after the rollback")
    assert {r["version"] for r in records(rec)} == {"v1"}
    assert run.proc.poll() is None
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_reloaded_credentials_the_broker_refuses_go_back_to_the_previous_ones(tmp_path, runs):
    broker = Mosquitto(tmp_path / "auth-broker", users={"svc": "right-password"})
    broker.start()
    try:
        run, rec = start(
            runs, tmp_path, broker, topics={"a/#": 1}, mqtt='username = "svc"\npassword = "right-password"'
        )
        rewrite_config(tmp_path, broker, rec, topics={"a/#": 1}, mqtt='username = "svc"\npassword = "Wr0ng-Secret"')
        run.signal(signal.SIGHUP)
        run.wait_for_log(r"reload: \[mqtt\] password changed: the agent reconnects")
        run.wait_for_log(
            r"the broker refused the credentials; see the agent's error above; going back to the "
            r"app and configuration from before the reload"
        )
        run.wait_for_log(r"started agent", count=3)
        run.wait_for_log(r"connected to", count=2)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{os.getpid()}")
        pub.username_pw_set("svc", "right-password")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        publish_all(pub, [("a/1", b"after")])
        pub.loop_stop()
        wait_until(lambda: any(r["topic"] == "a/1" for r in records(rec)), 10, "a/1 handled")
        assert run.stop() == 0
        log = run.log()
        assert "Wr0ng-Secret" not in log and "right-password" not in log
    finally:
        broker.stop()


# --- SIGTTIN / SIGTTOU ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigttin_and_sigttou_change_the_live_worker_count(tmp_path, broker, runs):
    run, rec = start(runs, tmp_path, broker, topics={"stream/#": 1}, workers=2, app={"delay": 0.002})
    stream = Stream(broker, "stream/x", 2000, rate=250)
    wait_until(lambda: len(records(rec)) >= 100, 20, "the stream to flow")
    run.signal(signal.SIGTTIN)
    run.wait_for_log(r"SIGTTIN: 3 worker\(s\)")
    run.wait_for_log(r"started worker 2 \(pid")
    wait_until(lambda: len(children_of(run.pid)) == 4, 10, "agent + 3 workers in /proc")
    wait_until(lambda: any(r["worker"] == 2 for r in records(rec)), 10, "the new worker handling messages")
    before = run.pids("worker")
    for expected in (
        r"SIGTTOU: 2 worker\(s\)",
        r"SIGTTOU: 1 worker\(s\)",
        r"SIGTTOU ignored: procmqtt keeps at least one worker",
    ):
        run.signal(signal.SIGTTOU)  # one at a time: the kernel merges a signal sent while one is pending
        run.wait_for_log(expected)
    run.wait_for_log(r"worker 2 \(pid \d+\) stopped; \d worker\(s\) now")
    run.wait_for_log(r"worker 1 \(pid \d+\) stopped; 1 worker\(s\) now")
    wait_until(lambda: len(children_of(run.pid)) == 2, 10, "agent + 1 worker in /proc")
    assert run.pids("worker") == {0: before[0]}, "the remaining worker was replaced"
    stream.join()
    handled = check_nothing_lost(rec, 2000)
    assert sum(n - 1 for n in handled.values()) == 0, "a worker removed gracefully left duplicates"
    assert "worker 1 is gone holding" not in run.log() and "worker 2 is gone holding" not in run.log()
    assert run.stop() == 0


# --- --pid ---------------------------------------------------------------------------------------


def healthcheck(pidfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples/deploy/healthcheck.py"), "--pid", str(pidfile)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.mark.timeout(90)
def test_pid_file_lifecycle(tmp_path, broker, runs):
    pidfile = tmp_path / "procmqtt.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")  # left by a procmqtt that was SIGKILLed: stale
    run, _ = start(runs, tmp_path, broker, topics={"a/#": 1}, args=("--pid", str(pidfile)))
    assert pidfile.read_text() == f"{run.pid}\n"
    assert healthcheck(pidfile).returncode == 0
    cfg = str(tmp_path / "procmqtt.toml")
    second = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg, "--pid", str(pidfile))
    runs.append(second)
    assert second.wait(20) == 2
    assert f"procmqtt: error: --pid {pidfile}: procmqtt is already running with pid {run.pid}" in second.log()
    assert "started agent" not in second.log()
    assert pidfile.read_text() == f"{run.pid}\n" and run.proc.poll() is None
    assert run.stop() == 0
    assert not pidfile.exists()
    check = healthcheck(pidfile)
    assert check.returncode == 1 and "cannot read the pid" in check.stderr


# --- --log-file and SIGUSR1 --------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_log_file_rotation_with_sigusr1(tmp_path, broker, runs):
    log_file = tmp_path / "logs" / "procmqtt.log"
    log_file.parent.mkdir()
    run, _ = start(
        runs, tmp_path, broker, topics={"ctl/#": 1, "boom": 1}, args=("--log-file", str(log_file)), wait_ready=False
    )

    def wait_in(path: Path, pattern: str) -> None:
        wait_until(lambda: path.exists() and re.search(pattern, path.read_text()), 15, f"{pattern!r} in {path.name}")

    wait_in(log_file, r"\[agent\] INFO subscribed to")
    wait_in(log_file, r"\[supervisor\] INFO started worker 1")
    rotated = log_file.with_name("procmqtt.log.1")
    os.rename(log_file, rotated)
    run.signal(signal.SIGUSR1)
    wait_in(log_file, r"\[supervisor\] INFO SIGUSR1: log file reopened")
    pub = publisher(broker)
    publish_all(pub, [("boom", b"1"), ("ctl/subscribe", b"extra/#")])
    wait_in(log_file, r"\[worker-\d\] ERROR on_message failed for topic 'boom'")
    wait_in(log_file, r"\[agent\] INFO subscribed to extra/#")
    assert run.stop() == 0
    new, old = log_file.read_text(), rotated.read_text()
    assert "stopped (exit code 0)" in new
    for line in ("SIGUSR1", "on_message failed", "subscribed to extra/#", "stopped (exit code"):
        assert line not in old, f"{line!r} went to the rotated file"
    stderr = run.log()
    assert "Current thread" not in stderr and "Thread 0x" not in stderr, "SIGUSR1 reached a child"
    assert "INFO" not in stderr, "log lines went to stderr instead of the file"
