"""Fixtures for every test file, and the ``unit`` marker's promise.

Without mosquitto the tests that need a broker are skipped with one reason (``harness.require_mosquitto``);
``pytest -m unit`` runs the tests that need none and start no process, in seconds.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import MISSING_MOSQUITTO, MOSQUITTO, Mosquitto, Procmqtt, require_mosquitto

from procmqtt.agent.brokersocket import BrokerSocket


def pytest_report_header(config: pytest.Config) -> str:
    return f"mosquitto: {MOSQUITTO}" if MOSQUITTO else f"{MISSING_MOSQUITTO}; the tests that need it are skipped"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Every skip for a missing mosquitto names one place, so ``-ra`` sums them up in one line."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and isinstance(report.longrepr, tuple) and MISSING_MOSQUITTO in report.longrepr[2]:
        path, line = inspect.getsourcefile(require_mosquitto), inspect.getsourcelines(require_mosquitto)[1]
        report.longrepr = (path, line, report.longrepr[2])


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked ``unit`` that starts a process (a broker, procmqtt, a fork) fails, so the mark stays true."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test marked unit must not start a process; drop the mark or the process")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "fork", refuse)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, BrokerSocket]]:
    """A socket pair: (the broker's end, the agent's end wrapped in a BrokerSocket), closed afterwards."""
    a, b = socket.socketpair()
    b.setblocking(False)
    yield a, BrokerSocket(b)
    a.close()
    b.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that keeps sessions and messages across its own restarts (saved on every change)."""
    b = Mosquitto(tmp_path / "persistent-broker", persistence=True)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[Procmqtt]]:
    """Procmqtt runs started by a test; whatever is left running is killed afterwards."""
    started: list[Procmqtt] = []
    yield started
    for run in started:
        run.cleanup()
    crashes = [line for run in started for line in run.log().splitlines() if "crashed" in line]
    assert not crashes, f"a procmqtt process crashed: {crashes}"  # internal errors never pass silently
