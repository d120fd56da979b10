"""``procmqtt demo`` and ``--broker embedded``, as real process trees with a real Mosquitto."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT, Procmqtt, records, require_mosquitto, wait_until
from harness import _alive as alive

from procmqtt.dev.embedded import INSTALL_HINT


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (the app's supervisor, agent and workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().split(")")[-1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return found


class Demo:
    """``procmqtt demo`` in its own session, output on a file, as a terminal would run it."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.out_path = tmp_path / "demo.out"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "procmqtt", "demo", *args],
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def pids(self) -> tuple[int, int]:
        """The private broker's pid and the app's (its supervisor, leader of its process group)."""
        m = wait_until(
            lambda: re.search(r"mosquitto \(pid (\d+)\).*\(pid (\d+)\)", self.output()), 30, "the demo's first line"
        )
        return int(m.group(1)), int(m.group(2))

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def demos():
    require_mosquitto()
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.kill()


def assert_all_gone(broker_pid: int, app_pid: int) -> None:
    wait_until(lambda: not alive(broker_pid), 5, "the private broker to be gone")
    wait_until(lambda: not group_members(app_pid), 5, "the app's processes to be gone")


def assert_clean_summary(output: str, workers: int) -> None:
    assert "Traceback" not in output
    summary = re.search(r"summary: .*sent (\d+), handled (\d+), lost (\d+)", output)
    assert summary, output
    sent, handled, lost = map(int, summary.groups())
    assert sent > 0 and handled == sent and lost == 0, output
    assert len(re.findall(r"worker \d: +\d+ readings", output)) == workers, output
    assert "stopped gracefully" in output


@pytest.mark.timeout(90)
def test_demo_runs_and_cleans_up(tmp_path, demos):
    demo = Demo(tmp_path, "--seconds", "3", "-w", "2")
    demos.append(demo)
    broker_pid, app_pid = demo.pids()
    assert alive(broker_pid)
    assert demo.wait(60) == 0, demo.output()
    output = demo.output()
    assert_clean_summary(output, workers=2)
    assert re.search(r"streamed for 3\.\ds", output), output
    assert len(re.findall(r"^ *\d+\.\ds +sent \d+ readings", output, re.MULTILINE)) >= 3  # a frame a second
    assert_all_gone(broker_pid, app_pid)


@pytest.mark.timeout(90)
def test_demo_ctrl_c_stops_gracefully(tmp_path, demos):
    demo = Demo(tmp_path, "--seconds", "60", "-w", "2")
    demos.append(demo)
    broker_pid, app_pid = demo.pids()
    wait_until(lambda: re.search(r"\d+\.\ds +sent [1-9]\d* readings", demo.output()), 30, "the first frame")
    os.killpg(demo.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert demo.wait(40) == 0, demo.output()
    output = demo.output()
    assert_clean_summary(output, workers=2)
    assert "interrupted (Ctrl-C) after" in output
    assert "KeyboardInterrupt" not in output
    assert_all_gone(broker_pid, app_pid)


@pytest.mark.timeout(60)
def test_run_with_embedded_broker(tmp_path, runs):
    """mosquitto_pub reaches the app; a broker that dies is restarted on the same port; stop is clean."""
    require_mosquitto()
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = tmp_path / "embedded.toml"
    cfg.write_text(
        f'[mqtt]\nclient_id = "test-embedded-{os.getpid()}"\n\n[mqtt.topics]\n"t/#" = {{ qos = 1 }}\n\n'
        f'[workers]\ncount = 2\ngraceful_timeout = 10\n\n[app]\nrecord_dir = "{record_dir}"\n'
    )
    run = Procmqtt(tmp_path, "tests/apps.py:Recorder", str(cfg), "--broker", "embedded")
    runs.append(run)
    run.wait_for_log(r"embedded broker: mosquitto \(pid \d+\) on 127\.0\.0\.1:\d+; try: mosquitto_pub -p \d+")
    first_pid, port = map(int, re.search(r"mosquitto \(pid (\d+)\) on 127\.0\.0\.1:(\d+)", run.log()).groups())
    assert port != 1883
    run.ready()

    def pub(payload: str) -> None:
        subprocess.run(
            ["mosquitto_pub", "-p", str(port), "-q", "1", "-t", "t/x", "-m", payload], check=True, timeout=10
        )

    pub("hello")
    wait_until(lambda: any(r.get("payload") == b"hello".hex() for r in records(record_dir)), 15, "hello handled")

    os.kill(first_pid, signal.SIGKILL)  # the broker dies: supervised like any child
    run.wait_for_log(r"embedded broker \(pid \d+\) was killed by SIGKILL.*; restarting")
    run.wait_for_log(r"started embedded broker \(pid \d+\)")
    run.wait_for_log(r"\[agent\] INFO subscribed to", count=2)  # the agent reconnected to the same port
    second_pid = int(re.search(r"started embedded broker \(pid (\d+)\)", run.log()).group(1))
    pub("again")
    wait_until(lambda: any(r.get("payload") == b"again".hex() for r in records(record_dir)), 15, "again handled")

    assert run.stop() == 0, run.log()
    assert "embedded broker stopped" in run.log()
    assert not alive(first_pid) and not alive(second_pid)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args", [["demo"], ["run", "tests/apps.py:Recorder", "--broker", "embedded"]])
def test_no_mosquitto_binary_is_one_line_and_exit_2(tmp_path, args):
    empty = tmp_path / "bin"
    empty.mkdir()
    # No mosquitto on PATH nor in the sbin directories (patched: this machine has /usr/sbin/mosquitto).
    code = (
        f"import sys, procmqtt.dev.embedded as e, procmqtt.cli.main as c; e.SBIN_DIRS = (); sys.exit(c.main({args!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": str(empty)},
        timeout=20,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"procmqtt: error: {INSTALL_HINT}"]
    assert "apt-get install mosquitto" in INSTALL_HINT and "brew install mosquitto" in INSTALL_HINT


@pytest.mark.timeout(30)
@pytest.mark.skipif(not os.access("/usr/sbin/mosquitto", os.X_OK), reason="no /usr/sbin/mosquitto (Debian's place)")
def test_embedded_broker_found_in_usr_sbin_off_path():
    """A normal user's PATH lacks /usr/sbin, where Debian installs mosquitto."""
    env = {**os.environ, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", "import shutil; print(shutil.which('mosquitto'))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert result.stdout.strip() == "None"  # the premise: not on this PATH
    code = "import procmqtt.dev.embedded as e; print(e.EmbeddedBroker().binary)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=10, check=True
    )
    assert result.stdout.strip() == "/usr/sbin/mosquitto"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args, expected",
    [
        (["-w", "0"], "--workers: expected an integer from 1 to 32, got 0"),
        (["--seconds", "0"], "--seconds: expected a number > 0, got 0"),
        (["--rate", "-5"], "--rate: expected messages per second"),
    ],
)
def test_demo_usage_errors(args, expected):
    result = subprocess.run(
        [sys.executable, "-m", "procmqtt", "demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"procmqtt: error: {expected}")


@pytest.mark.unit
def test_embedded_config_is_private(tmp_path, monkeypatch):
    from procmqtt.dev import embedded

    monkeypatch.setattr(embedded, "find_mosquitto", lambda: "mosquitto")  # the config needs no binary
    broker = embedded.EmbeddedBroker()
    broker.dir = tmp_path
    lines = broker.config_text().splitlines()
    assert f"listener {broker.port} 127.0.0.1" in lines and broker.port != 1883
    assert "persistence false" in lines and "allow_anonymous true" in lines
    assert ("user root" in lines) == (os.geteuid() == 0)  # as root, mosquitto would drop to 'mosquitto'


@pytest.mark.timeout(30)
def test_embedded_broker_that_will_not_start_is_one_line(tmp_path):
    fake = tmp_path / "bin" / "mosquitto"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "procmqtt", "run", "tests/apps.py:Recorder", "--broker", "embedded"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        env={**os.environ, "PATH": str(fake.parent)},
    )
    assert result.returncode == 1
    port = re.search(r"127\.0\.0\.1:(\d+)", result.stderr).group(1)
    assert result.stderr.strip().splitlines() == [
        f"procmqtt: error: the embedded broker (mosquitto on 127.0.0.1:{port}) exited with code 3"
    ]
