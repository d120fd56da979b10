"""Apps for tests/test_supervision.py: handlers that fork, and a worker that dies before its Done."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from apps import Recording

from procmqtt import Message


class Forker(Recording):
    """``fork/return``: forks a child that sleeps 30 s holding the worker's channels, then returns.
    ``fork/block``: the same in the highest worker slot, which then waits forever (the test kills it);
    handled at once elsewhere and when redelivered. Each child's pid goes to <record_dir>/children."""

    def on_message(self, message: Message) -> None:
        self.record("received", message)
        last_slot = self.worker_id == self.config.workers.count - 1
        if message.topic == "fork/return" or (message.topic == "fork/block" and last_slot and not message.redelivered):
            self._fork_sleeper()
            if message.topic == "fork/block":
                threading.Event().wait()
        self.record("done", message)

    def _fork_sleeper(self) -> None:
        pid = os.fork()
        if pid == 0:  # the grandchild: never returns into the worker's code
            try:
                time.sleep(30)
            finally:
                os._exit(0)
        with open(os.path.join(self.config.app["record_dir"], "children"), "a") as f:
            f.write(f"{pid}\n")


def _die(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DiesBeforeDone(Recording):
    """``poison``: the handler returns normally, and the worker is SIGKILLed when it goes to report
    the Done, as a worker killed (OOM, an operator) right after a handler's return would be."""

    def on_message(self, message: Message) -> None:
        self.record("received", message)
        if message.topic == "poison":
            self._link.send_later = _die


class AsyncDiesBeforeDone(Recording):
    """``DiesBeforeDone`` for the event-loop worker (``aioworker``)."""

    async def on_message(self, message: Message) -> None:
        self.record("received", message)
        if message.topic == "poison":
            self._link.send_later = _die
