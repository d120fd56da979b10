"""Dispatch strategies: which ready worker gets the next message (in the agent)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence


class Dispatcher:
    """Chooses one slot among the workers that have room in their prefetch window.

    A new strategy is one subclass with ``choose`` and an entry in ``DISPATCHERS``.
    """

    def attach(self, load: Callable[[int], int]) -> None:
        """The ledger gives ``load(slot)``: the unfinished messages a slot holds. Only the
        strategies that weigh load keep it, so the others pay nothing per message."""

    def choose(self, ready: Sequence[int]) -> int:
        raise NotImplementedError


class RandomDispatcher(Dispatcher):
    """The egg-mqtt-plugin default: no shared state, even load on average."""

    def __init__(self) -> None:
        self._random = random.Random().random  # C; ``randrange`` is Python, a third of a dispatch

    def choose(self, ready: Sequence[int]) -> int:
        return ready[int(self._random() * len(ready))] if len(ready) > 1 else ready[0]


class RoundRobinDispatcher(Dispatcher):
    """Strict turns: the next ready slot after the last one chosen."""

    def __init__(self) -> None:
        self._last = -1

    def choose(self, ready: Sequence[int]) -> int:
        after = [slot for slot in ready if slot > self._last]
        self._last = min(after) if after else min(ready)
        return self._last


class LeastBusyDispatcher(Dispatcher):
    """Celery's "fair" mode: the ready slot holding the fewest unfinished messages, ties at random,
    so short messages do not queue behind a worker busy with long ones."""

    def __init__(self) -> None:
        self._random = random.Random().random
        self._load: Callable[[int], int] = lambda slot: 0

    def attach(self, load: Callable[[int], int]) -> None:
        self._load = load

    def choose(self, ready: Sequence[int]) -> int:
        if len(ready) == 1:
            return ready[0]
        load = self._load
        loads = [load(slot) for slot in ready]
        least = min(loads)
        idle = [slot for slot, n in zip(ready, loads, strict=True) if n == least]
        return idle[int(self._random() * len(idle))] if len(idle) > 1 else idle[0]


DISPATCHERS: dict[str, type[Dispatcher]] = {
    "random": RandomDispatcher,
    "round_robin": RoundRobinDispatcher,
    "least_busy": LeastBusyDispatcher,
    "ordered": LeastBusyDispatcher,  # the ledger keeps per-key order (agent/ledger.py); this spreads the keys
}
