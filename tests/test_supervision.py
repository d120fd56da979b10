"""The supervisor's decisions on real process trees: an agent that keeps crashing stops procmqtt,
a worker's death is decided by the process (not by its channel's end of file), and a worker that
dies before reporting its Done is charged the attempt."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import certs
import pytest
from harness import (
    Mosquitto,
    Procmqtt,
    publish_all,
    publisher,
    records,
    wait_until,
    write_config,
)

from procmqtt import Worker
from procmqtt.config import from_mapping
from procmqtt.errors import ExitCode
from procmqtt.supervisor.arbiter import Supervisor
from procmqtt.supervisor.children import Child


def _kill_children(record_dir: Path) -> None:
    """The sleepers the Forker app forked: no longer procmqtt's children once their worker is gone."""
    path = record_dir / "children"
    for pid in path.read_text().split() if path.exists() else []:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(60)
def test_an_agent_that_keeps_crashing_at_start_stops_procmqtt_with_exit_3(tmp_path):
    """The CA file is deleted while procmqtt runs (a certificate rotation gone wrong): every new
    agent then raises when it builds its TLS context."""
    tls = certs.make(tmp_path / "certs")
    ca = tmp_path / "ca.crt"
    shutil.copy(tls.ca, ca)
    broker = Mosquitto(tmp_path / "broker", tls=tls)
    broker.start()
    cfg = write_config(
        tmp_path / "p.toml",
        broker,
        topics={"x/#": 1},
        workers=1,
        port=broker.tls_port,
        mqtt=f'[mqtt.tls]\nca_certs = "{ca}"',
        app={"record_dir": str(tmp_path)},
    )
    run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg)
    try:
        run.ready()
        ca.unlink()
        os.kill(run.pids("agent")[-1], signal.SIGKILL)
        killed = time.monotonic()
        assert run.wait(15) == 3
        elapsed = time.monotonic() - killed
        log = run.log()
        print(f"exit 3 came {elapsed:.1f}s after the first agent death")
        assert log.count("agent crashed") == 3  # supervisor.AGENT_CRASH_LOOP
        assert (
            "the agent failed 3 times in a row within 5s of starting; the last one exited "
            "with code 1 (FileNotFoundError: [Errno 2] No such file or directory at "
        ) in log
        assert "in tls_set); stopping with exit code 3" in log
        assert elapsed < 8
    finally:
        run.cleanup()
        broker.stop()


@pytest.mark.timeout(60)
def test_graceful_stop_does_not_wait_for_a_handlers_forked_child(tmp_path, broker, runs):
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = write_config(
        tmp_path / "p.toml", broker, topics={"fork/#": 1}, workers=2, app={"record_dir": str(record_dir)}
    )
    Path(cfg).write_text(Path(cfg).read_text().replace("graceful_timeout = 10", "graceful_timeout = 20"))
    run = Procmqtt(tmp_path, "tests/apps_supervision.py:Forker", cfg)
    runs.append(run)
    try:
        run.ready()
        publish_all(publisher(broker), [("fork/return", b"1")])
        wait_until(lambda: (record_dir / "children").exists() and records(record_dir), 10, "the handler forked")
        began = time.monotonic()
        run.signal(signal.SIGTERM)
        code = run.wait(10)
        elapsed = time.monotonic() - began
        print(f"graceful stop took {elapsed:.2f}s with a forked child holding a worker's channel")
        assert code == 0 and elapsed < 5
    finally:
        _kill_children(record_dir)


@pytest.mark.timeout(60)
def test_a_worker_killed_while_its_forked_child_lives_has_its_message_redelivered(tmp_path, broker, runs):
    """Worker 1 retires (SIGTTOU, so no replacement comes) and is SIGKILLed mid-message while its
    forked child holds its channel: the message goes to worker 0 at once, not when the child exits."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = write_config(
        tmp_path / "p.toml",
        broker,
        topics={"fork/#": 1},
        workers=2,
        app={"record_dir": str(record_dir)},
        workers_toml='dispatch = "round_robin"',
    )
    run = Procmqtt(tmp_path, "tests/apps_supervision.py:Forker", cfg)
    runs.append(run)
    try:
        run.ready()
        run.wait_for_log(r"started worker 1")
        pub = publisher(broker)

        def held_by_worker_1() -> bool:
            publish_all(pub, [("fork/block", b"")])
            time.sleep(0.2)  # round robin: the next one goes to the other worker
            return (record_dir / "children").exists()

        wait_until(held_by_worker_1, 10, "worker 1 to fork and block", interval=0)
        blocked = [r for r in records(record_dir, "received") if r["worker"] == 1]
        assert len(blocked) == 1
        run.signal(signal.SIGTTOU)
        run.wait_for_log(r"SIGTTOU: 1 worker\(s\)")
        os.kill(blocked[0]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        again = wait_until(
            lambda: [r for r in records(record_dir) if r["redelivered"]], 5, "the message to be redelivered to worker 0"
        )
        print(f"redelivered {again[0]['time'] - killed:.2f}s after the kill")
        assert again[0]["worker"] == 0 and again[0]["time"] - killed < 2
        assert run.stop() == 0
    finally:
        _kill_children(record_dir)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", ["DiesBeforeDone", "AsyncDiesBeforeDone"])
def test_a_worker_that_dies_before_reporting_done_is_charged_the_attempt(tmp_path, broker, runs, app):
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = write_config(
        tmp_path / "p.toml",
        broker,
        topics={"poison": 1},
        workers=2,
        app={"record_dir": str(record_dir)},
        workers_toml="max_attempts = 3",
    )
    run = Procmqtt(tmp_path, f"tests/apps_supervision.py:{app}", cfg)
    runs.append(run)
    run.ready()
    publish_all(publisher(broker), [("poison", b"x")])
    run.wait_for_log(r"dropping the message on 'poison': worker \d died while handling it \(3 attempts\)")
    assert len(records(record_dir, "received")) == 3
    assert run.stop() == 0
    assert len(records(record_dir, "received")) == 3


class _App(Worker):
    def on_message(self, message: object) -> None:
        pass


@pytest.mark.unit
def test_an_agent_crash_loop_counts_quick_failures_in_a_row_but_not_sigkill(tmp_path, caplog):
    """SIGKILL comes from operators, tests and the OOM killer: it breaks a run of failures, and only
    AGENT_CRASH_LOOP failures in a row stop procmqtt, naming the last error the agent left."""
    sup = Supervisor(_App, "tests:App", from_mapping({"mqtt": {}, "workers": {"count": 1}}))
    sup.state_dir = str(tmp_path)

    def agent_died(code: int) -> None:
        sup.child_exited(Child("agent", -1, generation=1, pid=4242, started=time.monotonic()), code)

    for code in (1, 1, -signal.SIGKILL, 1, -signal.SIGSEGV):
        agent_died(code)
    assert not sup.stopping
    (tmp_path / "last-error-4242").write_text("OSError: boom at /x.py:7 in f")
    agent_died(1)
    assert sup.stopping and sup.exit_code == ExitCode.APP
    assert (
        "the agent failed 3 times in a row within 5s of starting; the last one exited with code 1 "
        "(OSError: boom at /x.py:7 in f); stopping with exit code 3"
    ) in caplog.text
    assert not (tmp_path / "last-error-4242").exists()


@pytest.mark.unit
def test_an_agent_that_lived_past_stable_after_starts_a_new_count():
    sup = Supervisor(_App, "tests:App", from_mapping({"mqtt": {}, "workers": {"count": 1}}))
    sup.state_dir = "/nonexistent"
    for started in (time.monotonic(), time.monotonic(), time.monotonic() - 60, time.monotonic(), time.monotonic()):
        sup.child_exited(Child("agent", -1, generation=1, pid=4242, started=started), 1)
    assert not sup.stopping
