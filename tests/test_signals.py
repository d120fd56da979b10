"""SignalQueue: the per-message check a worker makes costs no system call, and misses no signal."""

from __future__ import annotations

import os
import signal

import pytest

from procmqtt.ipc.signals import SignalQueue

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def test_pending_flags_a_caught_signal_until_popped() -> None:
    queue = SignalQueue([signal.SIGUSR2])
    try:
        assert not queue.pending()
        assert queue.pop() == []
        os.kill(os.getpid(), signal.SIGUSR2)  # the handler runs before the next call returns
        assert queue.pending()
        assert queue.pop() == [signal.SIGUSR2]
        assert not queue.pending()
        assert queue.pop() == []
    finally:
        queue.close()


def test_a_signal_during_pop_stays_pending() -> None:
    """Cleared before the pipe is read: a signal after the read is flagged again, never lost."""
    queue = SignalQueue([signal.SIGUSR2])
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert queue.pop() == [signal.SIGUSR2]
        os.kill(os.getpid(), signal.SIGUSR2)
        assert queue.pending()
        assert queue.pop() == [signal.SIGUSR2]
    finally:
        queue.close()
