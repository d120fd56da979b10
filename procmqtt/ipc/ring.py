"""A shared-memory ring per worker channel: large payloads written once by the agent, read once by
their worker (issue 16).

The agent makes one ring per worker channel, the first time it delivers that worker a payload of
``RING_MIN`` bytes or more: an anonymous memory file, mapped, whose descriptor goes to the worker
in a ``Ring`` record on the worker's own channel (``SCM_RIGHTS``). From then on such a payload is
copied into a free range of the ring and the worker gets a ``DeliverAt`` record naming its offset
and length instead of the bytes; the worker copies the payload out when it reads the record, so
nothing it holds refers to the ring.

A ring is as large as twice the worker's window of such payloads (``ring_size``: a power of two
between ``RING_FLOOR`` and ``RING_MAX``), because its pages cost on first use, not on reuse:
writing a fresh page of shared memory costs the agent about 2.4 us (allocated and zeroed by the
kernel), rewriting it about 0.05 us. A 4 MiB ring for 64 KiB payloads made every worker's first 64
messages cost the agent three times the rest. A larger payload later gets a larger ring: the agent
makes it and sends its ``Ring`` record only when no record naming the old ring is still queued,
so the worker, which reads its channel in order, has copied out every payload of the old ring when
it switches.

Why a SIGKILL anywhere corrupts nothing:

- One writer, one reader: only the agent writes a ring, only that worker reads it.
- A range is announced (its ``DeliverAt`` queued) only after its bytes are in the ring, so a torn
  write is never named; a record is one datagram, whole or not at all (``ipc/channel.py``).
- The agent owns reuse: a range is free again only when that delivery's ``Done`` arrives (the
  worker copied it out long before) or the worker's channel is gone, which drops the whole ring.
- A dead agent's rings die with it: a new agent makes new ones, and a worker replaces its mapping
  when a new ``Ring`` record arrives, so it never reads an old ring with new offsets (the channel
  is in order: every ``DeliverAt`` after a ``Ring`` names that ring).

When a payload finds no room (``RingSpace.take`` returns None: the ring full, or a range ahead still
held by an unfinished delivery), it travels as before, inside its record. So does every payload of
a worker whose ``Ring`` record could not be sent yet (its channel full). The ring's memory is
bounded by ``RING_MAX`` per worker channel, pages touched only as they are used; a worker keeps
its last ring mapped until a new one replaces it.

``RingSpace`` is the allocator: pure, no memory, property-tested (``tests/test_ring.py``).
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict

RING_MAX = 4 * 1024 * 1024
"""The most shared memory a worker's ring grows to: 64 payloads of 64 KiB, 4 of 1 MiB."""

RING_FLOOR = 256 * 1024
"""The least a ring is made with."""

RING_MIN = 4096
"""A payload at least this large goes through the ring (when there is room), as ``GATHER_MIN``."""

ALIGN = 64
"""Ranges start on a cache line."""


class RingSpace:
    """Which ranges of a ring of ``size`` bytes are in use. Ranges are taken in ring order (each
    after the previous one, wrapping to 0 when the end has no room) and may be given back in any
    order; the space behind the oldest range still in use is free again only once every range
    before it is back. So a range held for long (a slow handler) stops new ranges from passing
    it: the ring then reports no room and payloads travel inline until it is given back."""

    __slots__ = ("_head", "_live", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._head = 0  # where the next range starts, unless it has to wrap
        self._live: OrderedDict[int, list[int]] = OrderedDict()  # offset -> [length, given back], oldest first

    def take(self, length: int) -> int | None:
        """The offset of a free range of ``length`` bytes (``0 < length``), or None if none."""
        need = -(-length // ALIGN) * ALIGN
        live = self._live
        if not live:
            start = 0 if need <= self.size else None
        else:
            tail = next(iter(live))
            head = self._head
            if head > tail:  # in use: [tail, head); free: [head, size) and [0, tail)
                start = head if head + need <= self.size else (0 if need <= tail else None)
            else:  # wrapped: in use [tail, size) and [0, head); free: [head, tail)
                start = head if head + need <= tail else None
        if start is None:
            return None
        live[start] = [need, 0]
        self._head = start + need
        return start

    def give_back(self, offset: int) -> bool:
        """The range at ``offset`` is no longer needed; False if no such range is in use."""
        entry = self._live.get(offset)
        if entry is None or entry[1]:
            return False
        entry[1] = 1
        live = self._live
        while live:
            oldest = next(iter(live.values()))
            if not oldest[1]:
                break
            live.popitem(last=False)
        if not live:
            self._head = 0
        return True

    def in_use(self) -> list[tuple[int, int]]:
        """(offset, length) of every range not yet free again, oldest first (for tests)."""
        return [(offset, entry[0]) for offset, entry in self._live.items()]


def ring_size(length: int, prefetch: int) -> int:
    """The ring a payload of ``length`` bytes asks for: room for twice a window of ``prefetch`` such
    payloads (slack for the wrap and for ranges freed a pass late), as a power of two within
    ``RING_FLOOR`` and ``RING_MAX``."""
    want = 2 * prefetch * length
    return min(RING_MAX, max(RING_FLOOR, 1 << (want - 1).bit_length()))  # the power of two at or above


def _memory_file(size: int) -> int:
    fd = os.memfd_create("procmqtt-ring", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class Ring:
    """The agent's side of one worker's ring: the memory file, mapped for writing, and its space."""

    __slots__ = ("_map", "_view", "fd", "space", "taken")

    def __init__(self, size: int) -> None:
        self.fd = _memory_file(size)
        try:
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except OSError:
            os.close(self.fd)
            raise
        self._view = memoryview(self._map)
        self.space = RingSpace(size)
        self.taken: dict[int, int] = {}  # delivery id -> offset of its range

    def put(self, delivery_id: int, payload: bytes) -> int | None:
        """Copy ``payload`` into a free range held for ``delivery_id``; its offset, or None (no room)."""
        self.free(delivery_id)  # a delivery sent again to the same worker (it failed and is retried)
        offset = self.space.take(len(payload))
        if offset is None:
            return None
        self._view[offset : offset + len(payload)] = payload
        self.taken[delivery_id] = offset
        return offset

    def free(self, delivery_id: int) -> None:
        """The delivery is done: its range may be written again."""
        offset = self.taken.pop(delivery_id, None)
        if offset is not None:
            self.space.give_back(offset)

    def close(self) -> None:
        """The worker is gone: the ring goes with its channel (the worker's mapping, if any, stays
        valid until it unmaps it; nobody writes it again)."""
        self._view.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def sent(self) -> None:
        """The worker has the descriptor (its ``Ring`` record went out): the agent's copy closes."""
        os.close(self.fd)
        self.fd = -1


class RingReader:
    """A worker's side of its ring: mapped read-only from the descriptor in a ``Ring`` record."""

    __slots__ = ("_map", "_view")

    def __init__(self, fd: int) -> None:
        try:
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)

    def read(self, offset: int, length: int) -> bytes:
        """The payload at ``offset``: copied out, so it outlives the range's reuse."""
        if offset < 0 or offset + length > len(self._view):
            raise ValueError(f"range {offset}+{length} outside the ring ({len(self._view)} bytes)")
        return bytes(self._view[offset : offset + length])

    def close(self) -> None:
        self._view.release()
        self._map.close()
