from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import MOSQUITTO, Mosquitto, Procmqtt

from procmqtt.agent.brokersocket import BrokerSocket


def pytest_configure(config: pytest.Config) -> None:
    if MOSQUITTO is None:
        raise pytest.UsageError("the mosquitto binary is required (apt-get install mosquitto mosquitto-clients)")


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
