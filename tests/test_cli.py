"""The command line: one clear line and a documented exit code for every user mistake."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime

import pytest
from harness import (
    ROOT,
    Procmqtt,
    publish_all,
    publisher,
    run_cli,
    start,
    wait_until,
    write_config,
)

from procmqtt import logs
from procmqtt.supervisor import proctitle

pytestmark = pytest.mark.timeout(30)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("procmqtt ")


def test_run_help():
    result = run_cli("run", "--help")
    assert result.returncode == 0 and "--workers" in result.stdout and "--broker" in result.stdout
    assert "--print-config" in result.stdout and "--log-format" in result.stdout


def test_subcommands_are_one_dict():
    from procmqtt.cli import main as cli

    assert {"run", "check"} <= set(cli.COMMANDS)
    result = run_cli()
    assert "run" in result.stderr and "check" in result.stderr


def test_no_command_is_a_usage_error():
    assert run_cli().returncode == 2


@pytest.mark.parametrize(
    "args, expected",
    [
        (["-c", "/nonexistent.toml"], "/nonexistent.toml: no such configuration file"),
        (["-w", "0"], "--workers: expected an integer from 1 to 1024, got 0"),
        (["-w", "-3"], "--workers: expected an integer from 1 to 1024, got -3"),
        (["-w", "5000"], "--workers: expected an integer from 1 to 1024, got 5000"),
        (["--broker", "mqtt://u:pw123@h"], "--broker: do not put a password in the URL"),
        (["--broker", "ftp://h"], "--broker: expected mqtt://, mqtts://, ws:// or wss://"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, expected):
    result = run_cli("run", "tests/apps.py:Recorder", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"procmqtt: error: {expected}")
    assert "pw123" not in result.stderr


def test_bad_config_file_exits_2(tmp_path):
    (tmp_path / "bad.toml").write_text("[mqtt.topics]\n'a/#/b' = { qos = 1 }\n")
    result = run_cli("run", "tests/apps.py:Recorder", "-c", str(tmp_path / "bad.toml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            f'procmqtt: error: {tmp_path / "bad.toml"}: [mqtt.topics] "a/#/b": expected a valid MQTT topic '
            "filter ('#' must be a whole level and the last one)"
        )
    ]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "not a TOML file: byte 8 is not UTF-8 text"),
        (
            b"[mqtt]\nconnect_timeout = inf\n",
            "[mqtt] connect_timeout: expected a number of seconds from 0.1 to 1000000, got inf",
        ),
        (b"[workers]\ntimeout = nan\n", "[workers] timeout: expected a number of seconds from 0 to 1000000, got nan"),
        (b'[mqtt]\nclient_id = "' + b"c" * 65_536 + b'"\n', "[mqtt] client_id: expected at most 65,535 UTF-8 bytes"),
        (
            b"[mqtt]\nusername = 'u'\npassword = 73217321\n",
            "[mqtt] password: expected a non-empty string, got an integer (value not shown)",
        ),
        (
            b"[mqtt.tls]\nca_certs = 'README.md'\n",
            "[mqtt.tls] ca_certs: README.md: expected PEM certificates of the CAs",
        ),
    ],
)
def test_config_mistakes_that_used_to_escape_exit_2(tmp_path, content, expected):
    """Each was a traceback (exit 1) or an agent crash loop: now one line, exit 2, from run and check."""
    (tmp_path / "bad.toml").write_bytes(content)
    for command in ("run", "check"):
        result = run_cli(command, "tests/apps.py:Recorder", "-c", str(tmp_path / "bad.toml"))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"procmqtt: error: {tmp_path / 'bad.toml'}: {expected}"), lines
        assert "73217321" not in result.stderr


def test_default_config_file_in_cwd_is_read(tmp_path):
    (tmp_path / "procmqtt.toml").write_text("[workers]\ncount = 0\n")
    (tmp_path / "app.py").write_text("from procmqtt import Worker\nclass A(Worker):\n    pass\n")
    result = run_cli("run", "app:A", cwd=tmp_path)
    assert result.returncode == 2 and "procmqtt.toml: [workers] count" in result.stderr


@pytest.mark.parametrize(
    "app, expected",
    [
        ("no_such_module:App", "cannot import no_such_module"),
        ("tests/apps.py:Missing", "has no attribute 'Missing'"),
        ("tests/apps.py:NotAWorker", "NotAWorker is not a subclass of procmqtt.Worker"),
        ("tests/nothere.py:App", "no such file tests/nothere.py"),
    ],
)
def test_app_errors_exit_3(app, expected):
    result = run_cli("run", app)
    assert result.returncode == 3, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "app, expected",
    [
        ("justamodule", "APP 'justamodule': expected package.module:Class or path/to/file.py:Class"),
        (":App", "APP ':App': expected package.module:Class"),
        ("tests/apps.py:", "APP 'tests/apps.py:': expected package.module:Class"),
        ("my-app:App", "APP 'my-app:App': 'my-app' is not a module name (a file name ends in .py); expected"),
        ("tests/apps.py:1Recorder", "APP 'tests/apps.py:1Recorder': '1Recorder' is not a class name; expected"),
    ],
)
def test_malformed_app_is_a_usage_error_exit_2(app, expected):
    """A command-line mistake, like a bad -w: exit 2 (docs/operations.md), not 3 (an app that does not import)."""
    for args in (["run", app], ["check", app], ["run", app, "--print-config"]):
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"procmqtt: error: {expected}"), lines


def test_app_import_error_shows_where_in_the_app(tmp_path):
    """The last frames of the app's own code, as Python prints them; none of procmqtt's or importlib's."""
    (tmp_path / "helpers.py").write_text("def connect():\n    return connect_somewhere()\n")
    (tmp_path / "myapp.py").write_text("import helpers\nfrom procmqtt import Worker\n\nDB = helpers.connect()\n")
    for app in (f"{tmp_path}/myapp.py:App", "myapp:App"):
        result = run_cli("run", app, cwd=tmp_path)
        assert result.returncode == 3, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip("^ ")]  # carets vary by Python version
        assert lines == [
            (
                f"procmqtt: error: APP '{app}': importing {app.split(':')[0]} raised NameError: "
                "name 'connect_somewhere' is not defined"
            ),
            f'  File "{tmp_path}/myapp.py", line 4, in <module>',
            "    DB = helpers.connect()",
            f'  File "{tmp_path}/helpers.py", line 2, in connect',
            "    return connect_somewhere()",
        ]


def test_app_syntax_error_shows_the_line(tmp_path):
    (tmp_path / "bad.py").write_text("from procmqtt import Worker\nclass App(Worker:\n    pass\n")
    result = run_cli("check", f"{tmp_path}/bad.py:App")
    assert result.returncode == 3, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(
        f"procmqtt: error: APP '{tmp_path}/bad.py:App': importing {tmp_path}/bad.py raised SyntaxError: "
    )
    assert f'  File "{tmp_path}/bad.py", line 2' in lines and "    class App(Worker:" in lines
    assert "Traceback" not in result.stderr and "procmqtt/" not in result.stderr


def test_app_module_that_raises_exits_3(tmp_path):
    (tmp_path / "broken.py").write_text("import json\nraise RuntimeError('config missing')\n")
    result = run_cli("run", f"{tmp_path}/broken.py:App")
    assert result.returncode == 3
    assert "importing" in result.stderr and "RuntimeError: config missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_pid_option_never_deletes_a_file_that_is_not_a_pid_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    result = run_cli("run", "tests/apps.py:Recorder", "--pid", str(notes))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        (
            f"procmqtt: error: --pid {notes}: exists and is not a pid file (it holds more than a process id); "
            "not replaced: check the path, or delete the file"
        )
    ]
    assert notes.read_text() == "my notes\n"


# --- log formats ---------------------------------------------------------------------------------


def _record(exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("procmqtt.agent", logging.ERROR, __file__, 1, "failed on %s", ("a/b",), exc_info)
    logs._RoleFilter().filter(record)
    return record


@pytest.mark.unit
def test_json_format_has_every_field(monkeypatch):
    monkeypatch.setattr(logs, "_role", "worker-2")
    line = logs.JsonFormatter().format(_record(exc=True))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "ERROR" and obj["role"] == "worker-2" and obj["pid"] == os.getpid()
    assert obj["logger"] == "procmqtt.agent" and obj["message"] == "failed on a/b"
    assert datetime.fromisoformat(obj["time"]).utcoffset() is not None
    assert obj["exc_info"].startswith("Traceback") and "ValueError: boom" in obj["exc_info"]
    assert "exc_info" not in json.loads(logs.JsonFormatter().format(_record()))


@pytest.mark.unit
def test_text_format_carries_time_pid_role_level(monkeypatch):
    monkeypatch.setattr(logs, "_role", "agent")
    line = logging.Formatter(logs.FORMAT).format(_record())
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} \[{os.getpid()}\] \[agent\] ERROR failed on a/b", line
    )


@pytest.mark.timeout(90)
def test_json_logs_from_a_real_run(runs, tmp_path, broker):
    """Every line every process writes parses as one JSON object with the required fields."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = write_config(
        tmp_path / "procmqtt.toml", broker, topics={"boom": 1, "t/#": 1}, workers=2, app={"record_dir": str(record_dir)}
    )
    run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg, "--log-format", "json", "--log-level", "DEBUG")
    runs.append(run)
    run.wait_for_log(r'"message": "subscribed to ')
    run.wait_for_log(r'"message": "worker \d ready"', count=2)
    client = publisher(broker)
    try:
        publish_all(client, [("boom", b"x"), ("t/1", b"y")])
        run.wait_for_log(r'"exc_info": "Traceback')
    finally:
        client.loop_stop()
        client.disconnect()
    assert run.stop() == 0
    lines = run.log().splitlines()
    objects = [json.loads(line) for line in lines]  # raises on any line that is not one JSON object
    assert len(objects) > 10
    for obj in objects:
        assert {"time", "level", "role", "pid", "logger", "message"} <= obj.keys(), obj
        assert datetime.fromisoformat(obj["time"]) and obj["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
    roles = {obj["role"]: obj["pid"] for obj in objects}
    assert {"supervisor", "agent", "worker-0", "worker-1"} <= roles.keys()
    assert roles["supervisor"] == run.pid
    started = {
        m["message"].split(" (pid")[0][len("started ") :]: int(m["message"].split("pid ")[1].rstrip(")"))
        for m in objects
        if m["message"].startswith("started ")
    }
    assert started["agent"] == roles["agent"] and started["worker 1"] == roles["worker-1"]
    failed = [obj for obj in objects if obj["message"].startswith("on_message failed")]
    assert failed and failed[0]["role"].startswith("worker-") and failed[0]["logger"] == "procmqtt.app.Recorder"
    assert "ValueError: boom requested" in failed[0]["exc_info"]


def test_log_format_from_the_environment(tmp_path):
    (tmp_path / "bad.toml").write_text("[workers]\ncount = 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "procmqtt", "check", "tests/apps.py:Recorder", "-c", str(tmp_path / "bad.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=20,
        env={**os.environ, "PROCMQTT_LOG_FORMAT": "json", "PROCMQTT_MQTT_HOTS": "x"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    warning = json.loads(result.stderr)
    assert warning["level"] == "WARNING" and warning["role"] == "supervisor"
    assert "did you mean PROCMQTT_MQTT_HOST?" in warning["message"]


# --- process titles ------------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@pytest.mark.timeout(90)
def test_process_titles(runs, tmp_path, broker):
    pytest.importorskip("setproctitle")
    app = "tests/apps.py:Recorder"
    run, _ = start(
        runs,
        tmp_path,
        broker,
        topics={"t/#": 1},
        workers=2,
        args=("--broker", f"mqtt://title-user@127.0.0.1:{broker.port}"),
    )
    titles = {run.pid: f"procmqtt: supervisor [{app}]"}
    titles.update({pid: f"procmqtt: agent [{app}]" for pid in run.pids("agent").values()})
    titles.update({pid: f"procmqtt: worker {slot} [{app}]" for slot, pid in run.pids("worker").items()})
    assert len(titles) == 4
    wait_until(
        lambda: all(_cmdline(pid) == title for pid, title in titles.items()),
        10,
        f"process titles {titles}, seen {[_cmdline(pid) for pid in titles]}",
    )
    assert not [pid for pid in titles if "title-user" in _cmdline(pid) or "mqtt://" in _cmdline(pid)]
    assert run.stop() == 0


def test_no_setproctitle_changes_nothing():
    code = (
        "import sys; sys.modules['setproctitle'] = None\n"
        "from procmqtt.supervisor import proctitle\n"
        "before = open('/proc/self/cmdline', 'rb').read()\n"
        "proctitle.set_title('worker 1', 'app:A')\n"
        "assert open('/proc/self/cmdline', 'rb').read() == before\n"
        "print(proctitle.setproctitle)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=20, check=False
    )
    assert result.returncode == 0 and result.stdout == "None\n", result.stderr


@pytest.mark.unit
def test_title_is_built_from_role_and_app_only(monkeypatch):
    seen = []
    monkeypatch.setattr(proctitle, "setproctitle", seen.append)
    proctitle.set_title("worker 2", "app:Sensors")
    assert seen == ["procmqtt: worker 2 [app:Sensors]"]
