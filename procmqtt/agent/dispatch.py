"""Dispatch strategies: which ready worker gets the next message (in the agent)."""

from __future__ import annotations

import random
from collections.abc import Sequence


class Dispatcher:
    """Chooses one slot among the workers that have room in their prefetch window.

    A new strategy is one subclass with ``choose`` and an entry in ``DISPATCHERS``.
    """

    def choose(self, ready: Sequence[int]) -> int:
        raise NotImplementedError


class RandomDispatcher(Dispatcher):
    """The egg-mqtt-plugin default: no shared state, even load on average."""

    def __init__(self) -> None:
        self._random = random.Random()

    def choose(self, ready: Sequence[int]) -> int:
        return ready[self._random.randrange(len(ready))] if len(ready) > 1 else ready[0]


class RoundRobinDispatcher(Dispatcher):
    """Strict turns: the next ready slot after the last one chosen."""

    def __init__(self) -> None:
        self._last = -1

    def choose(self, ready: Sequence[int]) -> int:
        after = [slot for slot in ready if slot > self._last]
        self._last = min(after) if after else min(ready)
        return self._last


DISPATCHERS: dict[str, type[Dispatcher]] = {
    "random": RandomDispatcher,
    "round_robin": RoundRobinDispatcher,
}
