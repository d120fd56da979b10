"""Apps for tests/test_supervision.py: a worker that dies before its Done."""

from __future__ import annotations

import os
import signal
from typing import Any

from apps import Recording
from procmqtt import Message


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
