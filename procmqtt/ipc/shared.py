"""A few numbers shared through memory by every process, without channels or locks.

The supervisor maps the block before it forks, so every child sees the same pages. Each field has
exactly one writer and is one aligned 8-byte word, so a reader never sees a torn value and no
process can die holding a lock on it.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from functools import partial

from procmqtt.config.schema import MAX_SLOTS  # the block's slots: the most workers

_WORD = 8
# Per slot: busy since (writer: worker; reset: supervisor), messages finished (same), and the
# delivery in progress with the generation of the worker handling it (writer: worker; reader: agent).
_SLOT_WORDS = 4
# After the slots: the supervisor's heartbeat (writer: supervisor, each pass; reader: the agent's
# health endpoint, which answers /livez).
_TAIL_WORDS = 1
_DOUBLE = struct.Struct("=d")
_COUNT = struct.Struct("=q")


class SharedState:
    """Created in the supervisor before any fork."""

    def __init__(self, slots: int = MAX_SLOTS) -> None:
        self._mem = mmap.mmap(-1, _WORD * (_SLOT_WORDS * slots + _TAIL_WORDS))
        self._heartbeat = _WORD * _SLOT_WORDS * slots

    def _slot(self, slot: int, word: int) -> int:
        return _WORD * (_SLOT_WORDS * slot + word)

    # worker -> supervisor: hung handlers and crash loops
    def busy_since(self, slot: int) -> float:
        """``time.monotonic()`` when the slot's worker started its current message; 0 when idle."""
        when: float = _DOUBLE.unpack_from(self._mem, self._slot(slot, 0))[0]
        return when

    def set_busy_since(self, slot: int, when: float) -> None:
        _DOUBLE.pack_into(self._mem, self._slot(slot, 0), when)

    def finished(self, slot: int) -> int:
        """Messages the slot's current worker has finished since it started."""
        count: int = _COUNT.unpack_from(self._mem, self._slot(slot, 1))[0]
        return count

    def set_finished(self, slot: int, count: int) -> None:
        _COUNT.pack_into(self._mem, self._slot(slot, 1), count)

    def set_current(self, slot: int, generation: int, delivery_id: int) -> None:
        """The worker starts a delivery (0: none). It stays current past the handler's return, until
        its Done is on the channel or the next one starts, so a death in between is charged to it."""
        _COUNT.pack_into(self._mem, self._slot(slot, 2), generation)
        _COUNT.pack_into(self._mem, self._slot(slot, 3), delivery_id)

    def current(self, slot: int, generation: int) -> int:
        """The delivery the slot's worker of ``generation`` was handling or had not yet reported, or 0.

        Read by the agent after that worker died, once it has read every record the worker sent (a
        delivery whose Done it read is no longer held); its replacement writes here only once the
        agent has given it a message, which is after the agent read this.
        """
        if _COUNT.unpack_from(self._mem, self._slot(slot, 2))[0] != generation:
            return 0
        delivery_id: int = _COUNT.unpack_from(self._mem, self._slot(slot, 3))[0]
        return delivery_id

    def writers(self, slot: int) -> tuple[Callable[[float], None], Callable[[int], None], Callable[[int], None]]:
        """One worker's per-message writes, each a single C call with its offset bound (a Python
        setter costs twice as much): ``set_busy_since``, ``set_finished``, and the delivery word of
        ``set_current`` alone, for a worker that already wrote its generation with ``set_current``."""
        return (
            partial(_DOUBLE.pack_into, self._mem, self._slot(slot, 0)),
            partial(_COUNT.pack_into, self._mem, self._slot(slot, 1)),
            partial(_COUNT.pack_into, self._mem, self._slot(slot, 3)),
        )

    def reset_slot(self, slot: int) -> None:
        """Before a new worker starts in ``slot`` (supervisor); the agent's words stay."""
        self.set_busy_since(slot, 0.0)
        self.set_finished(slot, 0)

    # supervisor -> agent: the supervisor's loop runs
    def beat(self, now: float) -> None:
        """The supervisor's loop passed at ``now`` (``time.monotonic()``, one clock for every process)."""
        _DOUBLE.pack_into(self._mem, self._heartbeat, now)

    def heartbeat(self) -> float:
        """When the supervisor's loop last passed; 0 before its first pass."""
        when: float = _DOUBLE.unpack_from(self._mem, self._heartbeat)[0]
        return when
