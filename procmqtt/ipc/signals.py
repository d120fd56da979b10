"""Signals as data: handlers only record, the owner's loop acts (gunicorn's lesson)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


class SignalQueue:
    """Queues the given signals on a pipe that a ``select`` loop can wait on.

    Python's wakeup fd writes each caught signal's number as one byte, so the pipe itself is the
    queue and the handler has nothing to do. Create it in the process that owns the loop (after fork).
    """

    def __init__(self, signums: Iterable[int]) -> None:
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._signums = list(signums)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in self._signums:
            signal.signal(signum, _record)

    def fileno(self) -> int:
        return self._read

    def pop(self) -> list[int]:
        """Signals caught since the last call, oldest first."""
        caught: list[int] = []
        while True:
            try:
                data = os.read(self._read, 512)
            except BlockingIOError:
                return caught
            if not data:
                return caught
            caught.extend(data)

    def close(self) -> None:
        """Restore default handlers; used in a freshly forked child, which must not share the pipe."""
        for signum in self._signums:
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


def _record(signum: int, frame: object) -> None:
    """Nothing to do: the wakeup fd already carries the signal number."""
