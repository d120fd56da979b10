"""Waiting on sockets without ``select``'s limit: ``select.select`` raises ``ValueError`` for any
descriptor >= 1024 (FD_SETSIZE), which a busy host or a big ``-w`` reaches. ``poll`` has no such
limit and, for the handful of descriptors each loop here waits on, costs the same; every loop in
procmqtt that waits (agent, workers, supervisor, the broker socket's flush) goes through
:func:`wait`, or, for the agent's loop, a :class:`Poller` kept across its passes.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR
_WANT_READ = select.POLLIN | select.POLLPRI


class ClosedUnderUs(ValueError):
    """A socket handed to :func:`wait` is already closed (its ``fileno()`` is -1)."""


def wait(readers: Iterable[T], writers: Iterable[T] = (), timeout: float | None = None) -> tuple[list[T], list[T]]:
    """``select.select(readers, writers, [], timeout)`` for any descriptor number.

    Like ``select``, end of file and errors count as readable (and writable), so the caller's read
    or write finds them. Raises :class:`ClosedUnderUs` for a closed socket.
    """
    return Poller().wait(readers, writers, timeout)


class Poller:
    """:func:`wait` for a loop that waits on nearly the same descriptors every pass (the agent's):
    one poll object kept across passes, told only what changed since the last one (a worker come
    or gone, a socket that now has something to write), where :func:`wait` builds and fills a new
    one per call. Registrations are by descriptor number, checked every pass against each
    object's ``fileno()``, so a closed socket (``ClosedUnderUs``) or a number reused by a new one
    is seen as :func:`wait` sees it."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._masks: dict[int, int] = {}  # what the poll object has registered

    def wait(
        self, readers: Iterable[T], writers: Iterable[T] = (), timeout: float | None = None
    ) -> tuple[list[T], list[T]]:
        """As :func:`wait`."""
        objects: dict[int, T] = {}
        masks: dict[int, int] = {}
        for objs, mask in ((readers, _WANT_READ), (writers, select.POLLOUT)):
            for obj in objs:
                fd = obj if isinstance(obj, int) else obj.fileno()  # type: ignore[attr-defined]
                if fd < 0:
                    raise ClosedUnderUs(f"{obj!r} is closed")
                objects[fd] = obj
                masks[fd] = masks.get(fd, 0) | mask
        registered, poll = self._masks, self._poll
        if masks != registered:
            for fd in registered.keys() - masks.keys():
                poll.unregister(fd)
            for fd, mask in masks.items():
                if registered.get(fd) != mask:
                    poll.register(fd, mask)  # registers, or modifies a registered one
            self._masks = masks
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        readable: list[T] = []
        writable: list[T] = []
        for fd, events in poll.poll(ms):
            if events & select.POLLNVAL:
                raise ClosedUnderUs(f"{objects[fd]!r}: descriptor {fd} is not open")
            mask = masks[fd]
            if mask & _WANT_READ and events & _READ:
                readable.append(objects[fd])
            if mask & select.POLLOUT and events & _WRITE:
                writable.append(objects[fd])
        return readable, writable
