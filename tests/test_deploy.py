"""examples/deploy: the systemd unit, the Dockerfile and the logrotate snippet are valid and say what
docs/deployment.md promises (graceful stop, reload, exit codes that must not restart, exec-form commands)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from urllib.parse import urlsplit

import pytest
from harness import ROOT, publish_all, publisher, start, wait_until

from procmqtt.config import DEFAULT_GRACEFUL_TIMEOUT
from procmqtt.errors import ExitCode
from procmqtt.supervisor.operations import STOP_MARGIN

DEPLOY = ROOT / "examples" / "deploy"


# --- systemd -------------------------------------------------------------------------------------


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> values (a key may repeat), after systemd's own rules."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a key before any section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.unit
def test_systemd_unit_says_what_the_docs_promise():
    unit = unit_sections((DEPLOY / "procmqtt.service").read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["KillMode"] == ["mixed"]  # SIGTERM to the supervisor only; it stops the rest in order
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert set(service["RestartPreventExitStatus"][0].split()) == {str(ExitCode.USAGE), str(ExitCode.AUTH)}
    assert float(service["TimeoutStopSec"][0]) > DEFAULT_GRACEFUL_TIMEOUT + STOP_MARGIN
    start = service["ExecStart"][0].split()
    assert start[1:3] == ["run", "app:MyWorker"]
    pid = start[start.index("--pid") + 1]
    assert pid.startswith(f"/run/{service['RuntimeDirectory'][0]}/")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.timeout(60)
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    # verify also checks that ExecStart's program exists: point it at one that does
    text = (DEPLOY / "procmqtt.service").read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={shutil.which('true')}", text, flags=re.MULTILINE)
    unit = tmp_path / "procmqtt.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=50, check=False
    )
    problems = [line for line in result.stderr.splitlines() if "procmqtt.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


# --- container -----------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, args = (pending + line).partition(" ")
        out.append((word.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


@pytest.mark.unit
def test_dockerfile_runs_procmqtt_in_exec_form_with_sigterm():
    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    names = [name for name, _ in instructions]
    known = {
        "FROM",
        "ENV",
        "RUN",
        "WORKDIR",
        "COPY",
        "USER",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "ARG",
        "LABEL",
        "EXPOSE",
    }
    assert names[0] == "FROM" and set(names) <= known, names
    args = dict(instructions)  # the last of each kind is the one that counts
    entrypoint, cmd = json.loads(args["ENTRYPOINT"]), json.loads(args["CMD"])  # exec form: JSON arrays
    assert entrypoint[:2] == ["procmqtt", "run"] and isinstance(cmd, list)
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert args["USER"] not in ("root", "0")
    health = args["HEALTHCHECK"]
    assert health.split(" CMD ")[0].startswith("--interval")
    probe = json.loads(health.split(" CMD ", 1)[1])
    url = urlsplit(probe[probe.index("--url") + 1])  # [health]'s /livez, on the port the image sets
    env = dict(re.findall(r"(\w+)=(\S+)", args["ENV"]))
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", int(env["PROCMQTT_HEALTH_PORT"]), "/livez")
    assert "--pid" in entrypoint  # what healthcheck.py --pid reads, for a run without [health]
    assert not any("mosquitto" in a for n, a in instructions if n == "RUN"), "the broker is not in the image"
    for name, arguments in instructions:  # every COPY source exists in the build context (the checkout)
        if name == "COPY":
            sources = [a for a in arguments.split() if not a.startswith("--")][:-1]
            assert all((ROOT / s).exists() for s in sources), arguments
    app = cmd[0].split(":")[0]
    assert (ROOT / app).exists() and (ROOT / cmd[cmd.index("-c") + 1]).exists()


# --- logrotate -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
@pytest.mark.timeout(60)
def test_logrotate_snippet_rotates_a_running_procmqtt(tmp_path, broker, runs):
    """The snippet as shipped (paths moved under tmp_path, no su): a real rotation of a live run."""
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir(mode=0o755)
    text = (DEPLOY / "logrotate.conf").read_text()
    text = text.replace("/var/log/procmqtt", str(logs_dir)).replace("/run/procmqtt", str(logs_dir))
    conf = tmp_path / "logrotate.conf"
    conf.write_text(re.sub(r"^\s*su .*\n", "", text, flags=re.MULTILINE))
    log_file, pid_file = logs_dir / "procmqtt.log", logs_dir / "procmqtt.pid"
    run, _ = start(
        runs,
        tmp_path,
        broker,
        topics={"boom": 1},
        args=("--log-file", str(log_file), "--pid", str(pid_file)),
        wait_ready=False,
    )
    wait_until(
        lambda: log_file.exists() and "[agent] INFO subscribed to" in log_file.read_text(),
        15,
        "procmqtt logging to its file",
    )
    subprocess.run(
        ["logrotate", "--force", "--state", str(tmp_path / "state"), str(conf)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    wait_until(
        lambda: log_file.exists() and "SIGUSR1: log file reopened" in log_file.read_text(),
        10,
        "the supervisor to reopen after postrotate",
    )
    publish_all(publisher(broker), [("boom", b"x")])
    wait_until(
        lambda: "on_message failed for topic 'boom'" in log_file.read_text(), 10, "a worker line in the new file"
    )
    assert "on_message failed" not in (logs_dir / "procmqtt.log.1").read_text()
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0
    assert not pid_file.exists()
