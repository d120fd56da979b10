"""Ordered mode after an agent restart: the keys that workers still run for the agent before.

A new agent inherits workers that may still run, or hold queued, deliveries the dead agent gave
them, while the broker sends those messages (and their keys' next ones) again. Each inherited
worker answers the new agent's ``AgentStarted`` with ``Holding``: the old delivery ids it has not
reported done, with their topics. Until every inherited worker has answered or is gone, the ledger
dispatches nothing (any key may be busy in a worker not heard from yet); after that, a reported
key stays busy until that worker's ``Done`` for the old id arrives or the worker is gone.

Bookkeeping only: the ledger (``ledger.py``) turns what this returns into waiting and released
keys. Runs in the agent process, in its one thread.
"""

from __future__ import annotations

from collections.abc import Iterable

from procmqtt.orderkey import KeyOf


class Carryover:
    """The inherited workers not heard from yet, and the old deliveries they reported still out."""

    def __init__(self, key_of: KeyOf | None) -> None:
        """``key_of``: ordered mode's key; None (another mode): nothing is ever awaited."""
        self.key_of = key_of
        self.awaited: set[int] = set()  # inherited slots whose ``Holding`` has not come
        self.by_id: dict[int, tuple[int, str]] = {}  # old delivery id -> (slot, key)
        self.holders: dict[str, int] = {}  # key -> old deliveries of it still out

    def expect(self, slot: int) -> None:
        """The worker in ``slot`` was forked before this agent: wait for its answer (ordered mode)."""
        if self.key_of is not None:
            self.awaited.add(slot)

    def reported(self, slot: int, deliveries: Iterable[tuple[int, str]]) -> list[str]:
        """``slot``'s answer: old (delivery id, topic) it still holds. Returns the keys that become
        busy (none were before); an answer not awaited (other modes, a repeat) changes nothing."""
        if slot not in self.awaited:
            return []
        self.awaited.discard(slot)
        assert self.key_of is not None  # only ordered mode awaits
        busy = []
        for delivery_id, topic in deliveries:
            key = self.key_of(topic)
            self.by_id[delivery_id] = (slot, key)
            count = self.holders.get(key, 0)
            self.holders[key] = count + 1
            if not count:
                busy.append(key)
        return busy

    def finished(self, delivery_id: int) -> str | None:
        """A ``Done`` this agent did not hand out: the key it frees, if it was its key's last old one."""
        entry = self.by_id.pop(delivery_id, None)
        return None if entry is None else self._free(entry[1])

    def lost(self, slot: int) -> list[str]:
        """The worker in ``slot`` is gone: it answers no more, and the keys it held are free."""
        self.awaited.discard(slot)
        if not self.by_id:
            return []
        gone = [i for i, (s, _) in self.by_id.items() if s == slot]
        return [key for i in gone if (key := self._free(self.by_id.pop(i)[1])) is not None]

    def clear(self) -> None:
        """The agent stops: nothing more is dispatched, so nothing is awaited."""
        self.awaited.clear()
        self.by_id.clear()
        self.holders.clear()

    def _free(self, key: str) -> str | None:
        left = self.holders[key] - 1
        if left:
            self.holders[key] = left
            return None
        del self.holders[key]
        return key
