"""Fixtures for every test file, and the ``unit`` marker's promise.

Without mosquitto the tests that need a broker are skipped with one reason (``harness.require_mosquitto``);
``pytest -m unit`` runs the tests that need none and start no process, in seconds. The broker
matrix's NATS and RabbitMQ (tests/brokers.py) start once per session; RabbitMQ boots in the
background from the moment the tests that need it are collected, so its slow boot overlaps others.
Under pytest-xdist (README's test command runs ``-n 2``) the tests that need RabbitMQ form one
``xdist_group``, so one worker process runs them all and boots the one node, when first needed.
"""

from __future__ import annotations

import inspect
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import NATS, RABBITMQ, Nats, RabbitMQ
from harness import MISSING_MOSQUITTO, MOSQUITTO, Mosquitto, Procmqtt, require_mosquitto

from procmqtt.agent.brokersocket import BrokerSocket


def pytest_report_header(config: pytest.Config) -> list[str]:
    mosquitto = f"mosquitto: {MOSQUITTO}" if MOSQUITTO else f"{MISSING_MOSQUITTO}; the tests that need it are skipped"
    return [mosquitto, f"nats-server: {NATS}; rabbitmq-server: {RABBITMQ}"]


_RABBITMQ: list[RabbitMQ] = []  # the session's node, launched at collection when a selected test needs it
_LAST_RABBITMQ_TEST: list[str] = []  # its node is stopped after this test, not left idling beside the rest


@pytest.hookimpl(tryfirst=True)  # before xdist's loadgroup reads the groups
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_rabbitmq(item):
            item.add_marker(pytest.mark.xdist_group("rabbitmq"))


@pytest.hookimpl(trylast=True)  # after -m and -k deselected what will not run
def pytest_collection_finish(session: pytest.Session) -> None:
    users = [item.nodeid for item in session.items if _needs_rabbitmq(item)]
    # an xdist worker collects every test but runs its share: it boots the node only when needed
    if RABBITMQ and not _RABBITMQ and users and "PYTEST_XDIST_WORKER" not in os.environ:
        node = RabbitMQ(Path(tempfile.mkdtemp(prefix="procmqtt-test-rabbitmq-")))
        node.launch()
        _RABBITMQ.append(node)
    _LAST_RABBITMQ_TEST[:] = users[-1:]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if [item.nodeid] == _LAST_RABBITMQ_TEST:
        _stop_rabbitmq()


def _needs_rabbitmq(item: pytest.Item) -> bool:
    """The fixture by name, or as the parameter the matrix passes to ``request.getfixturevalue``."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "rabbitmq_broker" in getattr(item, "fixturenames", ()) or "rabbitmq_broker" in params.values()


def _stop_rabbitmq() -> None:
    for node in _RABBITMQ:
        node.close()
        shutil.rmtree(node.dir, ignore_errors=True)
    _RABBITMQ.clear()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _stop_rabbitmq()


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


@pytest.fixture(scope="session")
def nats_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nats]:
    """One private nats-server (JetStream + MQTT) for the session; a test that restarts it leaves it running."""
    b = Nats(tmp_path_factory.mktemp("nats"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def rabbitmq_broker() -> RabbitMQ:
    """The session's private RabbitMQ node (launched at collection); stopped after the last test
    that needs it (or at the session's end)."""
    if not _RABBITMQ:  # launched by hand or the hook did not see this test: boot now
        node = RabbitMQ(Path(tempfile.mkdtemp(prefix="procmqtt-test-rabbitmq-")))
        _RABBITMQ.append(node)
        node.launch()
    node = _RABBITMQ[0]
    if node.proc is None:
        node.launch()
    node.ready()
    return node
