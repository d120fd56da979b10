"""Private NATS and RabbitMQ brokers for the broker matrix (tests/test_broker_matrix.py).

Each one speaks MQTT 3.1.1 on a free loopback port, keeps its state in the test's directory and
leaves the machine's own services alone (NATS 4222, RabbitMQ 5672 and its epmd on 4369): the
RabbitMQ node registers with an epmd of its own, on a free port, stopped with it. Both offer the
interface the harness uses of ``harness.Mosquitto``: ``port``, ``url``, ``start``, ``stop``, ``kill``.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness import free_port, wait_until

NATS_ACK_WAIT = 1.0
"""Seconds NATS waits for a PUBACK before it sends a message again (its default is 30 s): what an
agent kill costs on NATS. A handler slower than this would see its message twice."""
RABBITMQ_BOOT = 90.0
"""Seconds a private RabbitMQ node may take to boot: ~6 s on an idle 2-core machine, ~20 s the first
time under the load of a parallel test run (it creates its database and elects a Raft leader)."""


def _binary(env: str, *candidates: str) -> str | None:
    """``env`` overrides the lookup for the tests alone: a path, or "none" to see the suite without it."""
    override = os.environ.get(env)
    if override:
        return None if override == "none" else override
    for pattern in candidates:
        found = sorted(glob.glob(pattern)) if "*" in pattern else ([pattern] if os.access(pattern, os.X_OK) else [])
        if found:
            return found[-1]
    return None


NATS = _binary("PROCMQTT_TEST_NATS", shutil.which("nats-server") or "/usr/sbin/nats-server")
# The server script itself: Debian's /usr/sbin/rabbitmq-server wrapper runs it through `su rabbitmq`,
# which would drop the environment that makes the node private.
RABBITMQ = _binary(
    "PROCMQTT_TEST_RABBITMQ",
    "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server",
    shutil.which("rabbitmq-server") or "/usr/local/sbin/rabbitmq-server",
)
EPMD = shutil.which("epmd") or next(iter(sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))), None)
MISSING_NATS = "nats-server not found: apt-get install nats-server"
MISSING_RABBITMQ = "rabbitmq-server (with epmd) not found: apt-get install rabbitmq-server"


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class _Broker:
    """A broker process on a free MQTT port, restartable on the same port and state."""

    name = "broker"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def launch(self) -> None:
        """Start the process and return at once (``ready`` waits for it)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.dir,
                start_new_session=True,  # its own group: a kill takes every process it started
            )

    def ready(self, timeout: float = 10) -> None:
        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise AssertionError(f"{self.name} exited: {tail}")
            return _accepts(self.port)

        wait_until(up, timeout, f"{self.name} on port {self.port}", interval=0.05)

    def start(self) -> None:
        self.launch()
        self.ready()

    def _signal_group(self, signum: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def _terminate(self) -> None:
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


class Nats(_Broker):
    """nats-server with JetStream (MQTT needs it) and an ``mqtt {}`` listener; its store survives
    restarts, so do MQTT sessions and unacknowledged messages."""

    name = "nats"

    def __init__(self, directory: Path, ack_wait: float = NATS_ACK_WAIT) -> None:
        super().__init__(directory)
        self.client_port = free_port()  # NATS's own protocol: unused, but never the machine's 4222
        self.ack_wait = ack_wait

    def command(self) -> list[str]:
        if NATS is None:
            pytest.skip(MISSING_NATS)
        config = self.dir / "nats.conf"
        config.write_text(
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"server_name: procmqtt_test_{os.getpid()}\n"
            f'jetstream {{ store_dir: "{self.dir}/jetstream", max_memory_store: 64MB, max_file_store: 256MB }}\n'
            f'mqtt {{ listen: 127.0.0.1:{self.port}, ack_wait: "{self.ack_wait:g}s" }}\n'
        )
        return [NATS, "-c", str(config)]


class RabbitMQ(_Broker):
    """A private RabbitMQ node with the MQTT plugin. Its boot is slow (``RABBITMQ_BOOT``): the test
    session launches it early, in the background (tests/conftest.py), and waits when a test needs it."""

    name = "rabbitmq"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"procmqtt-test-{os.getpid()}@localhost"
        self.epmd: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if RABBITMQ is None or EPMD is None:
            pytest.skip(MISSING_RABBITMQ)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "log.file.level = info\n"
        )
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
        if self.epmd is None:
            # An epmd of its own, in the foreground, so the node never meets the machine's
            # (RabbitMQ's cluster) and nothing outlives the session.
            self.epmd = subprocess.Popen(
                [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        return [RABBITMQ]

    def environment(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "HOME": str(d),  # its Erlang cookie, not the user's
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_ENABLED_PLUGINS": "rabbitmq_mqtt",
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            "RABBITMQ_QUORUM_DIR": str(d / "quorum"),
            "RABBITMQ_STREAM_DIR": str(d / "stream"),
            # schedulers that sleep when idle: the node must not spin beside the rest of the suite
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+sbwt none +sbwtdcpu none +sbwtdio none",
        }

    def ready(self, timeout: float = RABBITMQ_BOOT) -> None:
        super().ready(timeout)

    def _terminate(self) -> None:
        """SIGTERM to the Erlang VM itself: the server script would run ``rabbitmqctl stop``."""
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            children = []
        for pid in children or [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """The node, then its epmd."""
        self.stop()
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(5)
            self.epmd = None


def wait_stopped(broker: _Broker, timeout: float = 10) -> None:
    """The port refuses connections (a restart test must see the broker gone)."""
    deadline = time.monotonic() + timeout
    while _accepts(broker.port) and time.monotonic() < deadline:
        time.sleep(0.05)
