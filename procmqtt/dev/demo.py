"""``procmqtt demo``: a private broker, the demo app on N workers, a steady stream, a live view.

The demo process orchestrates; it runs no worker code itself. It starts an embedded Mosquitto,
then ``procmqtt run procmqtt.dev.demo_app:DemoSensors --broker <that broker>`` as a child in its own
session (so Ctrl-C reaches only the demo, which drains the stream before stopping the app), then
publishes readings with one paho client and redraws a view about once a second. At the end it
confirms every reading was handed to a worker (``demo/ping`` -> ``demo/pong``), stops the app
gracefully, collects each worker's report (``demo/workers/<id>``) and prints a summary.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from procmqtt import logs
from procmqtt.dev import demo_app
from procmqtt.dev.embedded import EmbeddedBroker, _pdeathsig, free_port
from procmqtt.errors import ConfigError, ExitCode, ProcmqttError

try:  # the live per-worker view reads the app's [metrics] (needs procmqtt.status and prometheus_client)
    import importlib.util

    from procmqtt.cli import status
    from procmqtt.config import Config as _Config

    if (
        importlib.util.find_spec("prometheus_client") is None
        or "metrics" not in _Config.__dataclass_fields__
        or Path(status.__file__).parent.parent != Path(__file__).parent.parent
    ):  # a stale install's status.py
        status = None  # type: ignore[assignment]
except ImportError:
    status = None  # type: ignore[assignment]

APP = "procmqtt.dev.demo_app:DemoSensors"
DEVICES = 8
MAX_WORKERS = 32
HOT_EVERY = 40
"""About one reading in this many is above the alert threshold."""
GRACEFUL_TIMEOUT = 10.0
READY_TIMEOUT = 30.0
DRAIN_TIMEOUT = 30.0
REPORT_TIMEOUT = 3.0
LOG_TAIL = 20


class Demo:
    """One run of ``procmqtt demo``; ``run()`` returns the exit code."""

    def __init__(self, *, workers: int = 4, seconds: float = 10.0, rate: float = 200.0) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"--workers: expected an integer from 1 to {MAX_WORKERS}, got {workers}")
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ConfigError(f"--seconds: expected a number > 0, got {seconds:g}")
        if not (0 < rate <= 100_000):
            raise ConfigError(f"--rate: expected messages per second, a number > 0 and <= 100000, got {rate:g}")
        self.workers, self.seconds, self.rate = workers, seconds, rate
        self.interrupts = 0
        self.interrupted = threading.Event()
        self.sent = 0
        self.alerts = 0
        self.pongs: set[bytes] = set()
        self.pong_count = 0
        self.reports: dict[int, dict[str, Any]] = {}
        self.subscribed = threading.Event()
        self.random = random.Random(5)
        self.tty = sys.stdout.isatty()
        self.frame_lines = 0
        self.last_frame: tuple[float, int, Any] = (time.monotonic(), 0, None)  # time, sent, snapshot

    # --- the whole run, in order ---------------------------------------------------------------

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        logs.setup("WARNING")
        self.dir = Path(tempfile.mkdtemp(prefix="procmqtt-demo-"))
        self.broker: EmbeddedBroker | None = None
        self.app: subprocess.Popen[bytes] | None = None
        self.client: mqtt.Client | None = None
        try:
            self.broker = EmbeddedBroker()
            self.broker.start()
            self.start_app()
            self.connect()
            self.say(
                f"procmqtt demo: a private mosquitto (pid {self.broker.pid}) on 127.0.0.1:{self.broker.port}; "
                f"{APP} (pid {self.app_pid}) on {self.workers} workers"
            )
            self.say(
                f"  streaming {self.rate:g} readings/s for {self.seconds:g}s (Ctrl-C stops earlier); "
                f"watch the alerts: mosquitto_sub -p {self.broker.port} -t 'demo/alerts/#' -v"
            )
            if status is None:
                self.say(
                    "  (live per-worker numbers need procmqtt.status and prometheus_client: "
                    "pip install 'procmqtt[demo]'; showing the stream's own counts)"
                )
            ready = self.wait_ready()
            started = time.monotonic()
            if ready:
                self.stream()
            duration = time.monotonic() - started
            drained = self.drain() if ready else self.sent == 0
            if ready:
                self.frame(duration)  # the final numbers: every reading has been handed to a worker
            code = self.stop_app()
            self.wait_for(lambda: len(self.reports) >= self.workers, REPORT_TIMEOUT)
            return self.summary(duration, drained, code)
        finally:
            self.cleanup()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        """Only record it; the loops below look at ``interrupted`` and ``interrupts``."""
        self.interrupts += 1
        self.interrupted.set()

    def say(self, line: str) -> None:
        print(line, flush=True)

    # --- the parts -----------------------------------------------------------------------------

    @property
    def app_pid(self) -> int | None:
        return self.app.pid if self.app is not None else None

    def start_app(self) -> None:
        """``procmqtt run`` of the demo app, in its own session, logging to a file in our temp dir."""
        assert self.broker is not None
        self.metrics_port = free_port() if status is not None else None
        config = self.dir / "demo.toml"
        config.write_text(self.config_text())
        self.app_log = self.dir / "app.log"
        package_parent = str(Path(demo_app.__file__).resolve().parents[2])  # this very procmqtt
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCMQTT_")}  # our config, not theirs
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
        with open(self.app_log, "wb") as log:
            self.app = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "procmqtt",
                    "run",
                    APP,
                    "-c",
                    str(config),
                    "-w",
                    str(self.workers),
                    "--broker",
                    self.broker.url,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                start_new_session=True,
                preexec_fn=_pdeathsig,  # noqa: PLW1509 - no thread runs yet
            )

    def config_text(self) -> str:
        lines = [
            "[mqtt]",
            f'client_id = "procmqtt-demo-{os.getpid()}"',
            "",
            "[mqtt.topics]",
            '"demo/sensors/+" = { qos = 1 }',
            f'"{demo_app.PING}" = {{ qos = 1 }}',
            "",
            "[workers]",
            f"count = {self.workers}",
            f"graceful_timeout = {GRACEFUL_TIMEOUT:g}",
            "",
            "[app]",
            "alert_above = 30.0",
            "work_ms = 1.0",
        ]
        if self.metrics_port is not None:
            lines += ["", "[metrics]", f"port = {self.metrics_port}"]
        return "\n".join(lines) + "\n"

    def connect(self) -> None:
        """One paho client publishes the stream and hears pongs, alerts and the workers' reports."""
        assert self.broker is not None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"procmqtt-demo-stream-{os.getpid()}")
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]  # paho's hint says int; it sleeps float
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(demo_app.PONG, 1), ("demo/alerts/#", 1), ("demo/workers/+", 1)]
        )
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        self.client = client
        if not self.wait_for(self.subscribed.is_set, 10):
            raise ProcmqttError("the demo could not subscribe on its private broker")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's thread."""
        if msg.topic == demo_app.PONG:
            self.pongs.add(bytes(msg.payload))
            self.pong_count += 1
        elif msg.topic.startswith("demo/alerts/"):
            self.alerts += 1
        elif msg.topic.startswith("demo/workers/"):
            report = json.loads(msg.payload)
            self.reports[int(report["worker"])] = report

    def wait_ready(self) -> bool:
        """Ping until the app answers: then it is subscribed, and readings reach it."""
        assert self.client is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.interrupted.is_set():
            self.client.publish(demo_app.PING, b"ready", qos=1)
            if self.wait_for(lambda: b"ready" in self.pongs, 0.25):
                return True
            self.watch_children()
            if time.monotonic() >= deadline:
                raise ProcmqttError(f"the demo app did not answer within {READY_TIMEOUT:g}s{self.app_tail()}")
        return False

    def stream(self) -> None:
        """Publish at ``rate`` for ``seconds`` (or until a signal), redrawing the view every second."""
        assert self.client is not None
        start = time.monotonic()
        total = math.ceil(self.rate * self.seconds)
        next_frame = start + 1.0
        self.last_frame = (start, 0, None)
        while not self.interrupted.is_set() and self.sent < total:
            now = time.monotonic()
            due = min(total, int((now - start) * self.rate) + 1)
            while self.sent < due:
                self.client.publish(f"demo/sensors/d{self.sent % DEVICES}", self.reading(), qos=1)
                self.sent += 1
            if now >= next_frame:
                self.frame(now - start)
                next_frame += 1.0
            self.watch_children()
            self.interrupted.wait(min(0.02, 1 / self.rate))

    def reading(self) -> bytes:
        device = self.sent % DEVICES
        celsius = 20 + device / 2 + self.random.uniform(-1, 1)
        if self.random.randrange(HOT_EVERY) == 0:
            celsius += 12
        return json.dumps({"celsius": round(celsius, 2), "seq": self.sent}).encode()

    def watch_children(self) -> None:
        """The broker is restarted on the same port if it dies; the app dying ends the demo."""
        assert self.broker is not None and self.app is not None
        if self.broker.proc is not None and self.broker.proc.poll() is not None:
            self.say(
                f"the private broker exited with code {self.broker.proc.returncode}"
                f"{self.broker.last_words()}; restarting it on port {self.broker.port}"
            )
            self.broker.start()
        if self.app.poll() is not None:
            raise ProcmqttError(f"the demo app exited with code {self.app.returncode}{self.app_tail()}")

    def drain(self) -> bool:
        """True once a ping sent after the last reading came back: every reading was handed out."""
        assert self.client is not None
        self.client.publish(demo_app.PING, b"end", qos=1)
        if self.wait_for(lambda: b"end" in self.pongs, DRAIN_TIMEOUT, give_up_on_signal=True):
            return True
        self.say("the app did not confirm the end of the stream; stopping it anyway")
        return False

    def stop_app(self) -> int:
        """SIGTERM to the app's supervisor (a graceful stop); a second Ctrl-C repeats it (stop now)."""
        assert self.app is not None
        if self.app.poll() is None:
            self.app.send_signal(signal.SIGTERM)
        seen = self.interrupts
        deadline = time.monotonic() + GRACEFUL_TIMEOUT + 10
        while self.app.poll() is None and time.monotonic() < deadline:
            if self.interrupts > seen:
                seen = self.interrupts
                self.app.send_signal(signal.SIGTERM)  # procmqtt's "second signal": stop now
            time.sleep(0.05)
        if self.app.poll() is None:
            os.killpg(self.app.pid, signal.SIGKILL)
            self.app.wait()
        return self.app.returncode

    def summary(self, duration: float, drained: bool, app_code: int) -> int:
        handled = sum(r["readings"] for r in self.reports.values())
        lost = self.sent - handled
        how = "interrupted (Ctrl-C) after" if self.interrupts else "streamed for"
        self.say("")
        self.say(
            f"summary: {how} {duration:.1f}s: sent {self.sent}, handled {handled}, lost {lost}; "
            f"{self.alerts} alert(s) published by the workers"
        )
        for slot in range(self.workers):
            report = self.reports.get(slot)
            if report is None:
                self.say(f"  worker {slot}: no report (it did not stop gracefully)")
            else:
                share = 100 * report["readings"] / handled if handled else 0
                self.say(
                    f"  worker {slot}: {report['readings']:6d} readings ({share:4.1f}%), {report['alerts']} alert(s)"
                )
        if status is not None:
            self.say(f"  (the live view's totals also count the {self.pong_count} ping(s) the app answered)")
        if app_code != 0:
            self.say(f"the app exited with code {app_code}{self.app_tail()}")
        reported = len(self.reports) == self.workers or self.sent == 0  # Ctrl-C before the stream began
        ok = app_code == 0 and lost == 0 and drained and reported
        self.say(
            "stopped gracefully: the app and the private broker are gone"
            if ok
            else "the demo did not end cleanly (see above)"
        )
        return ExitCode.OK if ok else ExitCode.FORCED

    # --- the live view -------------------------------------------------------------------------

    def frame(self, elapsed: float) -> None:
        """Draw one frame (in place on a terminal)."""
        now = time.monotonic()
        was, sent_before, snapshot_before = self.last_frame
        per_second = (self.sent - sent_before) / (now - was) if now > was else 0.0
        header = (
            f"{elapsed:5.1f}s  sent {self.sent} readings ({per_second:.0f}/s), "
            f"alerts published by the workers {self.alerts}"
        )
        lines = [header]
        snapshot = None
        if status is not None and self.metrics_port is not None:
            try:
                snapshot = status.fetch("127.0.0.1", self.metrics_port, timeout=0.5)
                lines += status.render(snapshot, snapshot_before).splitlines()
            except ProcmqttError as exc:
                lines.append(f"(metrics: {exc})")
        # Without procmqtt.status (fallback): the header line above, from the stream's own counts,
        # is the whole view; the per-worker split comes with the summary.
        if self.tty and self.frame_lines:
            sys.stdout.write(f"\x1b[{self.frame_lines}F\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n" + ("" if self.tty else "\n"))
        sys.stdout.flush()
        self.frame_lines = len(lines)
        self.last_frame = (now, self.sent, snapshot)

    # --- helpers -------------------------------------------------------------------------------

    def wait_for(self, condition: Callable[[], bool], timeout: float, give_up_on_signal: bool = False) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline or (give_up_on_signal and self.interrupts >= 2):
                return False
            time.sleep(0.01)
        return True

    def app_tail(self) -> str:
        try:
            lines = self.app_log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        except (OSError, AttributeError):
            return ""
        return ("; the end of its log:\n" + "\n".join("  " + line for line in lines)) if lines else ""

    def cleanup(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
        if self.app is not None and self.app.poll() is None:
            try:
                os.killpg(self.app.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.app.wait()
        if self.broker is not None:
            self.broker.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
