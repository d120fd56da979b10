"""How long a failed message waits before its next attempt: ``[workers] retry_delay``,
``retry_backoff`` and ``retry_max_delay``, with jitter. Used by the ledger (``ledger.py``), in the
agent process; pure arithmetic, no clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """How long a failed message waits before its next attempt (``[workers] retry_*``).

    The n-th retry waits ``delay * backoff ** (n - 1)``, capped at ``max_delay``, plus a random
    jitter of up to ``JITTER`` of that, so messages that failed together do not all return together.
    """

    delay: float = 0.0  # 0: at once (no hold)
    backoff: float = 2.0
    max_delay: float = 60.0

    JITTER = 0.1

    def wait(self, attempts: int) -> float:
        """Seconds before the retry that follows ``attempts`` failed attempts (>= 1)."""
        if self.delay <= 0:
            return 0.0
        # compared in logarithms: backoff ** attempts would overflow a float long before the cap
        if (attempts - 1) * math.log(self.backoff) >= math.log(self.max_delay / self.delay):
            base = self.max_delay
        else:
            base = self.delay * self.backoff ** (attempts - 1)
        return base * (1.0 + self.JITTER * random.random())
