"""Apps that the integration tests run under procmqtt; each records what it did to files."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time

from procmqtt import Message, Middleware, Retry, Worker


class Recording(Worker):
    """Appends one JSON line per event to <record_dir>/<pid>.jsonl (O_APPEND, one write)."""

    def on_start(self) -> None:
        path = os.path.join(self.config.app["record_dir"], f"{os.getpid()}.jsonl")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.delay = float(self.config.app.get("delay", 0))

    def record(self, event: str, message: Message, **extra: object) -> None:
        line = {
            "event": event,
            "worker": self.worker_id,
            "pid": os.getpid(),
            "topic": message.topic,
            "time": time.monotonic(),
            "sha": hashlib.sha1(message.payload).hexdigest(),
            "size": len(message.payload),
            "redelivered": message.redelivered,
            "qos": message.qos,
            "retain": message.retain,
            **extra,
        }
        if len(message.payload) <= 64:
            line["payload"] = message.payload.hex()
        os.write(self.fd, (json.dumps(line) + "\n").encode())


class Recorder(Recording):
    """Records each message it receives and finishes; special topics drive the integration tests."""

    def on_message(self, message: Message) -> None:
        self.record("received", message)
        if message.topic == "ctl/subscribe":
            self.subscribe(message.text, 1)
        elif message.topic == "ctl/unsubscribe":
            self.unsubscribe(message.text)
        elif message.topic.startswith("echo/"):
            handle = self.publish("echoed/" + message.topic[5:], message.payload, qos=message.qos)
            if not handle.wait(10):
                raise RuntimeError("echo publish was not confirmed")
        elif message.topic == "boom":
            raise ValueError("boom requested")
        elif message.topic.startswith("retry/"):  # retry/<seconds>: ask for a retry that much later
            raise Retry(after=float(message.topic[6:]))
        elif message.topic == "poison":
            os.kill(os.getpid(), signal.SIGKILL)  # as a segfault or the OOM killer would
        elif message.topic == "hang":
            threading.Event().wait()
        elif message.topic.startswith("ord/"):  # tests/test_ordered.py: handlers of random length
            time.sleep(random.uniform(0, float(self.config.app.get("max_delay", 0))))
        elif message.topic.startswith("pub/"):
            time.sleep(float(self.config.app.get("pub_delay", 0)))
            for i in range(int(message.topic[4:])):
                self.publish(f"buf/{i}", str(i), qos=1)
        if self.delay:
            time.sleep(self.delay)
        self.record("done", message)


class BigPublisher(Worker):
    """On 'burst/<n>', publishes n self-checking payloads of mixed sizes (up to several MB)."""

    SIZES = (100, 3000, 40_000, 300_000, 2_500_000)

    def on_message(self, message: Message) -> None:
        count = int(message.topic.split("/")[1])
        for i in range(count):
            size = self.SIZES[i % len(self.SIZES)]
            body = os.urandom(16) * (size // 16)
            self.publish("big/out", hashlib.sha1(body).digest() + body, qos=0)
        if message.topic.startswith("burst"):
            self.publish("big/done", message.payload, qos=1).wait(10)


class FailsToBoot(Worker):
    def on_start(self) -> None:
        raise RuntimeError("database unreachable (on purpose)")

    def on_message(self, message: Message) -> None:  # pragma: no cover - never reached
        pass


class _Unreachable(Middleware):
    def on_start(self, worker: Worker) -> None:
        raise RuntimeError("tracing collector unreachable (on purpose)")


class MiddlewareFailsToBoot(Worker):
    middleware = (_Unreachable(),)

    def on_message(self, message: Message) -> None:  # pragma: no cover - never reached
        pass


class NotAWorker:
    pass
