"""The command line: one clear line and a documented exit code for every user mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT

pytestmark = pytest.mark.timeout(30)


def procmqtt(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "procmqtt", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=20)


def test_version():
    result = procmqtt("--version")
    assert result.returncode == 0 and result.stdout.startswith("procmqtt ")


def test_run_help():
    result = procmqtt("run", "--help")
    assert result.returncode == 0 and "--workers" in result.stdout and "--broker" in result.stdout


def test_no_command_is_a_usage_error():
    assert procmqtt().returncode == 2


@pytest.mark.parametrize("args, expected", [
    (["-c", "/nonexistent.toml"], "/nonexistent.toml: no such configuration file"),
    (["-w", "0"], "--workers: expected an integer from 1 to 1024, got 0"),
    (["-w", "-3"], "--workers: expected an integer from 1 to 1024, got -3"),
    (["-w", "5000"], "--workers: expected an integer from 1 to 1024, got 5000"),
    (["--broker", "mqtt://u:pw123@h"], "--broker: do not put a password in the URL"),
    (["--broker", "ftp://h"], "--broker: expected mqtt://[user@]host[:port]"),
])
def test_usage_errors_exit_2_with_one_line(args, expected):
    result = procmqtt("run", "tests/apps.py:Recorder", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"procmqtt: error: {expected}")
    assert "pw123" not in result.stderr


def test_bad_config_file_exits_2(tmp_path):
    (tmp_path / "bad.toml").write_text("[mqtt.topics]\n'a/#/b' = { qos = 1 }\n")
    result = procmqtt("run", "tests/apps.py:Recorder", "-c", str(tmp_path / "bad.toml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'procmqtt: error: {tmp_path / "bad.toml"}: [mqtt.topics] "a/#/b": expected a valid MQTT topic '
        "filter ('#' must be a whole level and the last one)"]


def test_default_config_file_in_cwd_is_read(tmp_path):
    (tmp_path / "procmqtt.toml").write_text("[workers]\ncount = 0\n")
    (tmp_path / "app.py").write_text("from procmqtt import Worker\nclass A(Worker):\n    pass\n")
    result = procmqtt("run", "app:A", cwd=tmp_path)
    assert result.returncode == 2 and "procmqtt.toml: [workers] count" in result.stderr


@pytest.mark.parametrize("app, expected", [
    ("no_such_module:App", "cannot import no_such_module"),
    ("tests/apps.py:Missing", "has no attribute 'Missing'"),
    ("tests/apps.py:NotAWorker", "NotAWorker is not a subclass of procmqtt.Worker"),
    ("tests/nothere.py:App", "no such file tests/nothere.py"),
    ("justamodule", "expected package.module:Class or path/to/file.py:Class"),
])
def test_app_errors_exit_3(app, expected):
    result = procmqtt("run", app)
    assert result.returncode == 3, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_app_module_that_raises_exits_3(tmp_path):
    (tmp_path / "broken.py").write_text("import json\nraise RuntimeError('config missing')\n")
    result = procmqtt("run", f"{tmp_path}/broken.py:App")
    assert result.returncode == 3
    assert "importing" in result.stderr and "RuntimeError: config missing" in result.stderr
    assert "Traceback" not in result.stderr
