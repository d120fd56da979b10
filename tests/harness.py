"""Real parts for integration tests: a private Mosquitto, a procmqtt run, a paho subscriber.

Nothing here is mocked: the broker is the ``mosquitto`` binary on a free loopback port (never
1883), and procmqtt runs as a real process tree that tests signal and kill.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from procmqtt.dev.embedded import find_mosquitto

ROOT = Path(__file__).resolve().parent.parent
MISSING_MOSQUITTO = "mosquitto not found: apt-get install mosquitto mosquitto-clients"


def _mosquitto() -> str | None:
    """PATH, else /usr/sbin (Debian's place, not on a normal user's PATH). PROCMQTT_TEST_MOSQUITTO
    overrides the lookup for the tests alone: a path, or "none" to see the suite without a broker."""
    override = os.environ.get("PROCMQTT_TEST_MOSQUITTO")
    if override:
        return None if override == "none" else override
    return find_mosquitto()


MOSQUITTO = _mosquitto()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``procmqtt ARGS`` from this checkout (from any ``cwd``), with none of the outer shell's
    ``PROCMQTT_*`` variables, plus ``env``; it has 20 s to exit."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROCMQTT_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), clean.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "procmqtt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=20,
        env={**clean, **(env or {})},
        check=False,
    )


def require_mosquitto() -> str:
    """The mosquitto binary; without one, the calling test is skipped (one reason for all of them)."""
    if MOSQUITTO is None:
        pytest.skip(MISSING_MOSQUITTO)
    return MOSQUITTO


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port the kernel hands out
    (bind to 0) can be taken by any outgoing connection's local end before the broker binds it,
    a port from here only by an explicit bind (another test process picking the same one at
    random, which the bind check makes rare)."""
    ports = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ports.read_text().split()[0]) if ports.exists() else 32_768
    for _ in range(200):
        port = random.randrange(10_000, max(low, 10_001))
        with socket.socket() as s:  # a service listening there (RabbitMQ's 25672, say) fails the bind
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port below the ephemeral range")


class Mosquitto:
    """A private broker from a generated config, so tests can stop, kill and restart it."""

    def __init__(
        self,
        directory: Path,
        *,
        persistence: bool = False,
        users: dict[str, str] | None = None,
        tls: Any = None,
        require_certificate: bool = False,
        websockets: bool = False,
        deny: list[dict[str, Any]] | None = None,
        debug: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        """``persistence``: saved after every change, so a SIGKILL loses nothing it acknowledged.
        ``tls`` (tests/certs.py ``Certs``) adds a TLS listener on ``tls_port``; ``websockets`` a
        websockets listener on ``ws_port``. The plain listener on ``port`` is always there.
        ``deny``: dynamic-security ACL entries that refuse anonymous clients, e.g.
        ``{"acltype": "subscribePattern", "topic": "secret/#"}``. ``debug``: log every packet.
        ``extra``: more mosquitto.conf lines, e.g. ``("max_inflight_messages 5",)``."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.require_certificate = require_certificate
        self.tls_port = free_port() if tls else None
        self.ws_port = free_port() if websockets else None
        self.persistence = persistence
        self.users = users
        self.deny = deny
        self.debug = debug
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "mosquitto.log"

    def _write_config(self) -> Path:
        lines = ["per_listener_settings false", f"listener {self.port} 127.0.0.1"]
        if self.tls:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        if self.ws_port:
            lines += [f"listener {self.ws_port} 127.0.0.1", "protocol websockets"]
        lines += [
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "autosave_on_changes true",
            "max_queued_messages 100000",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
        ]
        if self.debug:
            lines.append("log_type debug")
        lines += self.extra
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto' and cannot write here
        if self.users:
            pwfile = self.dir / "passwd"
            pwfile.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if self.deny:
            lines += self._dynamic_security()
        path = self.dir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _dynamic_security(self) -> list[str]:
        """Mosquitto's dynamic-security plugin: the one way it refuses a subscription (its ACL file
        grants every subscription and filters at delivery)."""
        plugin = next(
            (
                p
                for p in (
                    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                    "/usr/lib/mosquitto_dynamic_security.so",
                    "/usr/local/lib/mosquitto_dynamic_security.so",
                )
                if os.path.exists(p)
            ),
            None,
        )
        if plugin is None:
            pytest.skip("mosquitto_dynamic_security.so is not installed")
        acls = [{"priority": 0, **entry, "allow": False} for entry in self.deny or ()]
        config = {
            "defaultACLAccess": {
                "publishClientSend": True,
                "publishClientReceive": True,
                "subscribe": True,
                "unsubscribe": True,
            },
            "clients": [],
            "groups": [{"groupname": "anonymous", "roles": [{"rolename": "denied"}]}],
            "roles": [{"rolename": "denied", "acls": acls}],
            "anonymousGroup": "anonymous",
        }
        path = self.dir / "dynamic-security.json"
        path.write_text(json.dumps(config))
        return [f"plugin {plugin}", f"plugin_opt_config_file {path}"]

    def start(self) -> None:
        config = self._write_config()
        self.proc = subprocess.Popen(
            [require_mosquitto(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self._accepts, 10, f"mosquitto on port {self.port}")

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {self.log_path.read_text() if self.log_path.exists() else ''}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class Subscriber:
    """An independent paho client that records what the broker sends it.

    ``persistent``: a session that outlives broker restarts (with a persistent broker).
    """

    def __init__(self, broker: Mosquitto, topic_filter: str, qos: int = 1, persistent: bool = False) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-sub-{os.getpid()}-{id(self)}", clean_session=not persistent
        )
        self.client.reconnect_delay_set(0.1, 1)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, qos)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise AssertionError(f"test subscriber could not subscribe to {topic_filter}")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(msg)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.messages]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publisher(broker: Mosquitto) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{os.getpid()}-{time.monotonic_ns()}")
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(0.1, 1)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def publish_all(client: mqtt.Client, items: list[tuple[str, bytes]], qos: int = 1, timeout: float = 30) -> None:
    infos = [client.publish(topic, payload, qos) for topic, payload in items]
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), "test publisher could not publish"


class Procmqtt:
    """``procmqtt run`` as a real process tree, with its log on a file."""

    def __init__(
        self,
        directory: Path,
        app: str,
        config: str | None,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """``prefix``: a command that runs the rest, e.g. ``ip netns exec NAME`` (tests/netns.py)."""
        self.log_path = directory / f"procmqtt-{time.monotonic_ns()}.log"
        cmd = [*prefix, sys.executable, "-m", "procmqtt", "run", app, *args]
        if config is not None:
            cmd += ["-c", config]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process, closed in cleanup
        # its own session, so a test can signal the whole process group as a terminal would
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 15, count: int = 1) -> None:
        regex = re.compile(pattern)

        def seen() -> bool:
            if self.proc.poll() is not None and len(regex.findall(self.log())) < count:
                raise AssertionError(f"procmqtt exited ({self.proc.returncode}) before {pattern!r}:\n{self.log()}")
            return len(regex.findall(self.log())) >= count

        wait_until(seen, timeout, f"log line {pattern!r} x{count}")

    def ready(self, timeout: float = 15) -> None:
        self.wait_for_log(r"\[agent\] INFO subscribed to", timeout)

    def pids(self, role: str) -> dict[int, int]:
        """Live pids by slot (-1 for the agent), from the supervisor's 'started' lines."""
        found: dict[int, int] = {}
        for m in re.finditer(r"started (agent|worker (\d+)) \(pid (\d+)\)", self.log()):
            if (role == "agent") == (m.group(1) == "agent"):
                found[int(m.group(2)) if m.group(2) else -1] = int(m.group(3))
        return {slot: pid for slot, pid in found.items() if _alive(pid)}

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def stop(self) -> int:
        """Graceful stop; returns the exit code."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(40)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            for pid in _descendants(self.proc.pid):
                _kill(pid)
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def write_config(
    path: Path,
    broker: Mosquitto,
    *,
    topics: dict[str, int],
    workers: int = 2,
    app: dict[str, Any] | None = None,
    mqtt: str = "",
    workers_toml: str = "",
    port: int | None = None,
) -> str:
    """A procmqtt TOML file for ``broker`` (its plain listener unless ``port`` names another)."""
    lines = [
        "[mqtt]",
        'host = "127.0.0.1"',
        f"port = {port or broker.port}",
        f'client_id = "test-{path.parent.name}-{os.getpid()}"',
        mqtt,
        "",
        "[mqtt.topics]",
    ]
    lines += [f'"{f}" = {{ qos = {q} }}' for f, q in topics.items()]
    lines += ["", "[workers]", f"count = {workers}", "graceful_timeout = 10", workers_toml, "", "[app]"]
    for key, value in (app or {}).items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return str(path)


def records(directory: Path, event: str = "done") -> list[dict[str, Any]]:
    """What tests/apps.py:Recorder wrote: one dict per message and event."""
    out = []
    for path in directory.glob("*.jsonl"):
        for line in path.read_text().split("\n")[:-1]:  # a line still being written has no newline
            rec = json.loads(line)
            if rec["event"] == event:
                out.append(rec)
    return sorted(out, key=lambda rec: rec["time"])


def start(
    runs: list[Procmqtt],
    tmp_path: Path,
    broker: Mosquitto,
    *,
    topics: dict[str, int],
    workers: int = 2,
    app: dict | None = None,
    args: tuple[str, ...] = (),
    mqtt: str = "",
    workers_toml: str = "",
    wait_ready: bool = True,
    port: int | None = None,
) -> tuple[Procmqtt, Path]:
    """Run tests/apps.py:Recorder; returns the run and the directory it records into."""
    record_dir = tmp_path / "records"
    record_dir.mkdir(exist_ok=True)
    cfg = write_config(
        tmp_path / "procmqtt.toml",
        broker,
        topics=topics,
        workers=workers,
        app={"record_dir": str(record_dir), **(app or {})},
        mqtt=mqtt,
        workers_toml=workers_toml,
        port=port,
    )
    run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg, *args)
    runs.append(run)
    if wait_ready:
        run.ready()
        run.wait_for_log(r"started worker", count=workers)
    return run, record_dir
