"""A private Mosquitto for local development and ``procmqtt demo``: ``--broker embedded``.

The ``mosquitto`` binary from PATH runs from a config generated in a temporary directory, listening
only on 127.0.0.1 on a free port (never 1883, so it never collides with a system broker). It keeps
nothing on disk (``persistence false``): a restarted embedded broker starts empty, and the agent
reconnects and subscribes again.

It runs in its own session, so Ctrl-C in the terminal reaches procmqtt but not the broker: the
agent can still flush its publishes and acknowledgements while it stops, and the broker is stopped
last. On Linux it also gets SIGTERM if the process that started it dies (``PR_SET_PDEATHSIG``), so
a SIGKILLed ``procmqtt`` leaves no broker behind.

Under ``procmqtt run`` the supervisor restarts it like any child when it dies (same port, with the
same backoff as the agent); ``procmqtt demo`` restarts it on the same port as well.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procmqtt import logs
from procmqtt.errors import ConfigError, ExitCode, ProcmqttError

BINARY = "mosquitto"
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
"""Where packages put ``mosquitto`` outside a normal user's PATH (Debian: /usr/sbin)."""
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
"""Seconds ``start()`` waits for the broker to accept connections."""
STOP_TIMEOUT = 5.0
"""Seconds ``stop()`` waits after SIGTERM before SIGKILL."""
MAX_QUEUED = 100_000
"""QoS 1/2 messages the broker queues per client (Mosquitto's default, 1000, drops a short backlog)."""
RESERVED_PORT = 1883

INSTALL_HINT = (
    "the embedded broker needs the mosquitto binary (on PATH or in /usr/sbin); install the "
    "'mosquitto' package (apt-get install mosquitto, or brew install mosquitto)"
)


def find_mosquitto() -> str | None:
    """The ``mosquitto`` binary: from PATH first, else from an sbin directory (Debian installs it in
    /usr/sbin, which only root's PATH has); None when neither has it."""
    return shutil.which(BINARY) or shutil.which(BINARY, path=os.pathsep.join(SBIN_DIRS))


class BrokerMissing(ConfigError):
    """No ``mosquitto`` binary: exit 2 with one line naming the package."""


class BrokerFailed(ProcmqttError):
    """The embedded broker would not start (its own log says why)."""

    exit_code = ExitCode.FORCED


def _pdeathsig() -> None:
    """In the broker's process, between fork and exec: SIGTERM when our process dies."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


try:  # resolved before any fork: nothing to look up in the child
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - unusual libc
    _prctl = None


def free_port() -> int:
    """A port the kernel considers free on loopback right now; never 1883."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port != RESERVED_PORT:
            return port


class EmbeddedBroker:
    """One private Mosquitto. Constructing it finds the binary and picks the port; nothing runs yet.

    Used from one thread of the process that started it (the supervisor, or the demo).
    """

    def __init__(self, port: int | None = None) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerMissing(INSTALL_HINT)
        self.binary = binary
        self.port = port or free_port()
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = logs.get("broker")

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "mosquitto.log"

    def config_text(self) -> str:
        assert self.dir is not None
        lines = [
            f"listener {self.port} {HOST}",
            "allow_anonymous true",
            "persistence false",
            f"max_queued_messages {MAX_QUEUED}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto', who cannot write our temp dir
        return "\n".join(lines) + "\n"

    def spawn(self) -> int:
        """Start the process and return its pid without waiting for it to listen (a restart)."""
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="procmqtt-broker-"))
        config = self.dir / "mosquitto.conf"
        config.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_pdeathsig,  # noqa: PLW1509 - one C call, no lock taken
        )
        return self.proc.pid

    def start(self) -> None:
        """Spawn and wait until it accepts connections; raises ``BrokerFailed`` with its last log line."""
        self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepts():
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None or time.monotonic() >= deadline:
                why = f"exited with code {code}" if code is not None else f"did not listen within {START_TIMEOUT:g}s"
                why += self.last_words()
                self.stop()
                raise BrokerFailed(f"the embedded broker (mosquitto on {HOST}:{self.port}) {why}")
            time.sleep(0.02)
        self.log.info(
            "embedded broker: mosquitto (pid %d) on %s:%d; try: mosquitto_pub -p %d -t TOPIC -m hello",
            self.pid,
            HOST,
            self.port,
            self.port,
        )

    def _accepts(self) -> bool:
        try:
            socket.create_connection((HOST, self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def last_words(self) -> str:
        """': <last line of its log>', or '' when it wrote none."""
        if self.dir is None:
            return ""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1]}" if lines else ""

    @property
    def name(self) -> str:
        """How the supervisor's log lines name it (it is the supervisor's sidecar)."""
        return "embedded broker"

    def reaped(self, code: int) -> str:
        """Someone else (the supervisor's ``waitpid(-1)``) collected its exit status; returns its last words."""
        if self.proc is not None:
            self.proc.returncode = code
            self.proc = None
        return self.last_words()

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if need be, then remove the temporary directory."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
