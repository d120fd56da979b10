"""Hosts for the failure tests: Linux network namespaces on one bridge, a link to cut, a broker
and a publisher that live on their own "host".

One ``Network`` is a broker namespace holding a bridge (``10.214.0.1/24``) and one namespace per
host, each joined to the bridge by a veth pair whose bridge end is the host's "switch port":
``cut`` sets that port down (the host's interface loses carrier and its packets go nowhere, as
when a cable or a switch fails) and ``restore`` sets it up again. Every interface lives inside
the namespaces, none in the machine's own, so deleting the namespaces removes all of it; names
carry the test process's pid, so concurrent runs never meet and leftovers of a dead run are
found and removed (``remove_leftovers``).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from harness import Mosquitto, require_mosquitto, wait_until
from paho.mqtt.enums import CallbackAPIVersion

PREFIX = "pmqnet"
SUBNET = "10.214.0"
BROKER_ADDRESS = f"{SUBNET}.1"
_CLONE_NEWNET = 0x40000000
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")
_serial = itertools.count()
IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), "")
T = TypeVar("T")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (the caller skips with it), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not IP:
        return "iproute2's ip is not installed (apt-get install iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"ip netns add fails here: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True, check=False)
    return None


def ip(*args: str) -> None:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _kill_inside(namespace: str) -> None:
    """SIGKILL whatever still runs in ``namespace`` (a run that outlived its test)."""
    pids = subprocess.run([IP, "netns", "pids", namespace], capture_output=True, text=True, check=False).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_leftovers() -> list[str]:
    """Delete the namespaces (and what runs in them) of earlier test processes that are gone."""
    listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, check=False).stdout
    removed = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m is None or os.path.exists(f"/proc/{m.group(1)}"):
            continue  # not ours, or its test process still runs
        _kill_inside(name)
        subprocess.run([IP, "netns", "del", name], capture_output=True, check=False)
        removed.append(name)
    return removed


def in_namespace(namespace: str, call: Callable[[], T]) -> T:
    """``call()`` in a thread that has entered ``namespace``: sockets it creates, and threads it
    starts, live there. The caller's own thread never changes namespace."""
    result: list[Any] = []

    def enter_and_call() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {namespace}")
            finally:
                os.close(fd)
            result.append((True, call()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            result.append((False, exc))

    thread = threading.Thread(target=enter_and_call, name=f"in-{namespace}")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class Network:
    """A broker "host" with a bridge and ``hosts`` joined to it; ``close`` removes everything."""

    def __init__(self, hosts: list[str]) -> None:
        tag = f"{PREFIX}-{os.getpid()}-{next(_serial)}"
        self.broker_ns = f"{tag}-broker"
        self.namespaces = {host: f"{tag}-{host}" for host in hosts}
        self.address = {host: f"{SUBNET}.{10 + i}" for i, host in enumerate(hosts)}
        self._made: list[str] = []

    def open(self) -> None:
        self._add(self.broker_ns)
        b = self.broker_ns
        ip("-n", b, "link", "set", "lo", "up")
        ip("-n", b, "link", "add", "br0", "type", "bridge")
        ip("-n", b, "addr", "add", f"{BROKER_ADDRESS}/24", "dev", "br0")
        ip("-n", b, "link", "set", "br0", "up")
        for host, ns in self.namespaces.items():
            self._add(ns)
            port = self.port(host)
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", b)
            ip("-n", b, "link", "set", port, "master", "br0")
            ip("-n", b, "link", "set", port, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def _add(self, namespace: str) -> None:
        ip("netns", "add", namespace)
        self._made.append(namespace)

    @staticmethod
    def port(host: str) -> str:
        """The host's switch port: the bridge end of its veth pair, in the broker's namespace."""
        return f"port-{host}"[:15]

    def cut(self, host: str) -> None:
        ip("-n", self.broker_ns, "link", "set", self.port(host), "down")

    def restore(self, host: str) -> None:
        ip("-n", self.broker_ns, "link", "set", self.port(host), "up")

    def prefix(self, host: str | None = None) -> tuple[str, ...]:
        """The command prefix that runs a program on ``host`` (None: the broker's host)."""
        return (IP, "netns", "exec", self.namespaces[host] if host else self.broker_ns)

    def close(self) -> None:
        """Kill what still runs inside, then delete the namespaces (their interfaces go with them)."""
        for namespace in reversed(self._made):
            _kill_inside(namespace)
            subprocess.run([IP, "netns", "del", namespace], capture_output=True, check=False)
        self._made.clear()


class NamespaceBroker(Mosquitto):
    """harness's Mosquitto, run in the broker's namespace and listening on the bridge's address."""

    def __init__(self, directory: Path, network: Network) -> None:
        super().__init__(directory, extra=("log_timestamp_format %H:%M:%S",))
        self.network = network

    def _write_config(self) -> Path:
        path = super()._write_config()
        text = path.read_text().replace(f"listener {self.port} 127.0.0.1", f"listener {self.port} {BROKER_ADDRESS}")
        path.write_text(text)
        return path

    def start(self) -> None:
        config = self._write_config()
        self.proc = subprocess.Popen(
            [*self.network.prefix(), require_mosquitto(), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._accepts, 10, f"mosquitto on {BROKER_ADDRESS}:{self.port}")

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {self.log_path.read_text() if self.log_path.exists() else ''}")

        def probe() -> bool:
            try:
                socket.create_connection((BROKER_ADDRESS, self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        return in_namespace(self.network.broker_ns, probe)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Stream:
    """A numbered QoS 1 stream published from the broker's host at a steady rate, in a thread;
    ``sent[n]`` is just before number ``n`` was handed to paho (``time.monotonic``, as the Recorder's)."""

    def __init__(self, network: Network, port: int, topic: str, rate: float) -> None:
        self.topic = topic
        self.interval = 1.0 / rate
        self.sent: list[float] = []
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self._stop = threading.Event()

        def connect() -> mqtt.Client:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"netns-pub-{os.getpid()}")
            client.max_queued_messages_set(0)
            client.connect(BROKER_ADDRESS, port)
            client.loop_start()  # its thread, and any reconnection's socket, in the namespace too
            return client

        self.client = in_namespace(network.broker_ns, connect)
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            n = len(self.sent)
            # stamped before paho may write it: the broker cannot have a message before its stamp
            # (stamped after, a descheduled thread made a message routed before the broker dropped
            # a member look as if it were published after)
            self.sent.append(time.monotonic())
            self.infos.append(self.client.publish(self.topic.format(n=n), str(n).encode(), 1))
            self._stop.wait(max(0.0, start + (n + 1) * self.interval - time.monotonic()))

    def stop(self, timeout: float = 10) -> int:
        """Stop publishing; every message is confirmed by the broker (PUBACK). Returns the count."""
        self._stop.set()
        self._thread.join(5)
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not confirm a message of the stream"
        return len(self.sent)

    def close(self) -> None:
        self._stop.set()
        self.client.loop_stop()
        self.client.disconnect()
