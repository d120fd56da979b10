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
        self.caught = False  # set by the handler: a loop that checks per message reads the pipe only then
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in self._signums:
            signal.signal(signum, self._record)

    def fileno(self) -> int:
        return self._read

    def _record(self, signum: int, frame: object) -> None:
        """The wakeup fd already carries the signal number; the flag spares ``pending`` a read."""
        self.caught = True

    def pending(self) -> bool:
        """Whether a signal may be queued, without a system call: a worker asks before every message,
        where a read of the pipe (and its ``BlockingIOError``) would cost more than a no-op handler.
        The handler runs at the interpreter's next check, before the loop's next call returns."""
        return self.caught

    def pop(self) -> list[int]:
        """Signals caught since the last call, oldest first."""
        self.caught = False  # cleared before reading: a signal arriving now sets it again
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
