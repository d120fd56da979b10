"""Capped exponential backoff with jitter, for reconnects and restarts (rq's lesson)."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` returns 0 first, then ``base``, doubling up to ``cap``; ``reset()`` after a success."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, jitter: float = 0.2) -> None:
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        if self.failures == 1:
            return 0.0
        delay: float = min(self.cap, self.base * 2 ** (self.failures - 2))
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.failures = 0
