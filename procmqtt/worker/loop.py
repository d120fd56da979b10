"""A worker process's life after fork: one base loop, run by a sync or an asyncio subclass.

``ServeLoop.run`` shows the whole life in order: set up (signals, the link to the agent), boot (the
app's ``__init__`` and ``on_start``, then ``Ready``), serve until a named exit, and shut down in
``finally`` (the last completions, ``on_stop``). Subclasses differ only in how they run handlers:
``sync.SyncLoop`` runs one message at a time, ``aio.AsyncLoop`` up to ``[workers] concurrency`` at
once on an event loop. Each message goes through ``handling.Runner``, the code path that
``procmqtt.testing`` uses too.

A worker never talks to the broker. It reads deliveries from its own channel (written only by the
agent), and sends completions, publishes and subscription changes on the publish channel that all
workers share (``link.py``). Every method here runs in the worker process, after fork; the
constructor only stores its arguments (it runs there too, in ``main.serve``).
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from procmqtt import logs
from procmqtt.config import Config
from procmqtt.errors import ExitCode
from procmqtt.ipc import channel
from procmqtt.ipc.shared import SharedState
from procmqtt.ipc.signals import SignalQueue
from procmqtt.message import Message, Outcome, Retry, delivered
from procmqtt.worker.base import Worker
from procmqtt.worker.handling import Runner
from procmqtt.worker.link import _AgentLink

_NO_DELAY = -1.0  # Done.retry_after when the handler named no delay: the configured schedule
_monotonic = time.monotonic


class ServeLoop:
    """The base loop: boot, Ready, Done/Retire bookkeeping, named exits, shutdown.

    Subclasses implement ``serve``: read records, run each delivery through ``runner`` between
    ``started`` and ``done``, and return at a named exit (``stop``). The asyncio one also runs the
    hooks on its event loop (``call``) and extends ``setup`` and ``teardown``.
    """

    link: _AgentLink
    signals: SignalQueue
    recycle: _Recycler
    worker: Worker
    runner: Runner

    def __init__(
        self,
        app: type[Worker],
        slot: int,
        generation: int,
        config: Config,
        inbound: socket.socket,
        upstream: socket.socket,
        shared: SharedState,
    ) -> None:
        self.app = app
        self.slot = slot
        self.generation = generation
        self.config = config
        self.inbound = inbound
        self.upstream = upstream
        self.shared = shared
        self.log = logs.get("worker")
        self.running: dict[int, float] = {}  # delivery id -> start time, oldest first
        self.current_written = False  # set_current ran once: this worker's generation is in the slot
        # The per-message shared-memory writes, each one C call (``SharedState.writers``).
        self._set_busy, self._set_finished, self._set_delivery = shared.writers(slot)
        self.finished = 0
        self.stop_reason: str | None = None

    def run(self) -> int:
        """The process's whole life; returns its exit code (``ExitCode.APP`` when the app cannot boot)."""
        self.setup()
        try:
            try:
                worker = self.call(self.app)
                worker._attach(self.slot, self.config, self.link)
                self.call(worker.on_start)
                runner = Runner(worker)  # runs each middleware's on_start
            except Exception:
                self.log.exception(
                    "worker %d failed to boot (%s.__init__, on_start or a middleware's on_start raised)",
                    self.slot,
                    self.app.__name__,
                )
                return ExitCode.APP
            self.worker, self.runner = worker, runner
            self.link.send(channel.Ready(self.slot, self.generation))
            self.log.debug("worker %d ready%s", self.slot, self.ready_note())
            try:
                self.serve()
                self.log.debug("worker %d leaving: %s", self.slot, self.stop_reason)
            finally:
                self.shut_down()
            return ExitCode.OK
        finally:
            self.teardown()

    # --- the steps of ``run``, in order ---------------------------------------------------------

    def setup(self) -> None:
        """The process's own state, before the app exists: signals, the hang report, the link."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # the supervisor's hang report
        self.signals = SignalQueue([signal.SIGTERM])
        self.inbound.setblocking(False)
        self.link = _AgentLink(
            self.slot, self.generation, self.inbound, self.upstream, self.config, wakeup=self.signals.fileno()
        )
        self.recycle = _Recycler(self.config)

    def ready_note(self) -> str:
        """What the ready line adds about how this loop runs handlers."""
        return ""

    def call(self, func: Callable[[], Any]) -> Any:
        """Run a hook (the app's constructor, ``on_start``, ``on_stop``) and return what it gives."""
        return func()

    def serve(self) -> None:
        """Handle messages until a named exit (``stop``)."""
        raise NotImplementedError

    def shut_down(self) -> None:
        """However serving ended: the completions still queued go out, then ``on_stop`` runs."""
        try:
            self.link.flush()
        except OSError:
            self.log.warning("could not report the last completions: the agent side is gone")
        try:
            self.call(self.worker.on_stop)
        except Exception:
            self.log.exception("on_stop raised")
        try:
            self.runner.stop()
        except Exception:
            self.log.exception("a middleware's on_stop raised")

    def teardown(self) -> None:
        """After everything, also after a failed boot (the asyncio loop closes its event loop)."""

    # --- shared by both loops -------------------------------------------------------------------

    def stop(self, reason: str, level: int, line: str, *args: object) -> None:
        """A named exit: log why, now, and remember it for the last line."""
        self.stop_reason = reason
        self.log.log(level, line, *args)

    def started(self, record: channel.Deliver) -> Message:
        """A delivery begins: the supervisor's hang check watches the oldest one in progress."""
        began = _monotonic()
        running = self.running
        if not running:
            if self.current_written:
                self._set_delivery(record.delivery_id)
            else:  # the first: the generation too, which the agent reads of a dead predecessor until now
                self.shared.set_current(self.slot, self.generation, record.delivery_id)
                self.current_written = True
            self._set_busy(began)
        running[record.delivery_id] = began
        return delivered(record.topic, record.payload, record.qos, record.retain, record.redelivered, record.properties)

    def done(self, delivery_id: int, result: Outcome | Retry) -> None:
        """A message is finished: move the hang watch on, queue its ``Done``, ``Retire`` when due.

        The last one stays current until the next starts (the async loop clears it once its Done is
        on the channel): dying before that still charges it an attempt, and the agent reads what was
        sent before it charges.
        """
        running = self.running
        began = running.pop(delivery_id)
        if running:  # the oldest left is watched now (rewritten unchanged when this one was not the oldest)
            oldest, since = next(iter(running.items()))
            self._set_delivery(oldest)
            self._set_busy(since)
        else:
            self._set_busy(0.0)
        self.finished += 1
        self._set_finished(self.finished)
        if isinstance(result, Retry):
            done = channel.Done(
                delivery_id,
                Outcome.RETRY,
                _monotonic() - began,
                _NO_DELAY if result.after is None else result.after,
            )
        else:
            done = channel.Done(delivery_id, result, _monotonic() - began)
        self.link.send_later(done)
        if self.recycle.watching:
            reason = self.recycle.due(self.finished)
            if reason:
                self.log.info("recycling: %s; finishing what this worker holds", reason)
                self.link.send(channel.Retire(self.slot, self.generation))


class _Recycler:
    """Decides when a worker should be replaced: after max_messages (+ jitter) or above max_memory_mb."""

    def __init__(self, config: Config) -> None:
        w = config.workers
        self.limit = w.max_messages + random.randint(0, w.max_messages_jitter) if w.max_messages else 0
        self.max_rss = w.max_memory_mb * 1024 * 1024
        self.next_memory_check = 0.0
        self.requested = False
        self.watching = bool(self.limit or self.max_rss)  # else ``due`` never answers: not asked per message

    def due(self, finished: int) -> str | None:
        if self.requested:
            return None
        reason = None
        if self.limit and finished >= self.limit:
            reason = f"{finished} messages handled (max_messages)"
        elif self.max_rss and time.monotonic() >= self.next_memory_check:
            self.next_memory_check = time.monotonic() + 1.0
            rss = _rss()
            if rss > self.max_rss:
                reason = f"resident memory {rss / 2**20:.0f} MB > max_memory_mb"
        self.requested = reason is not None
        return reason


def _rss() -> int:
    """This process's resident memory in bytes (Linux); 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
