"""The worker loop for apps with async handlers: one asyncio event loop per worker process.

Up to ``[workers] concurrency`` messages are handled at once, each in its own task, and each
message's completion goes to the agent when that message finishes, so acknowledgements stay per
message. The event loop is the only reader of the worker's channel: deliveries, the stop record and
publish confirmations (which wake ``await handle``) all arrive through one reader callback. Sync apps
never come here (``worker.serve`` keeps its plain loop). Runs in the worker process, after fork.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import TYPE_CHECKING, Any

from procmqtt import logs
from procmqtt.config import Config
from procmqtt.errors import ExitCode
from procmqtt.ipc import channel
from procmqtt.ipc.shared import SharedState
from procmqtt.ipc.signals import SignalQueue
from procmqtt.message import Message, Outcome

if TYPE_CHECKING:
    from procmqtt.worker.base import Worker, _Recycler
    from procmqtt.worker.link import _AgentLink


def serve_async(app: type[Worker], slot: int, generation: int, config: Config, link: _AgentLink,
                shared: SharedState, signals: SignalQueue, recycle: _Recycler) -> int:
    """``worker.serve`` for async apps: same boot, exits and exit codes, on a fresh event loop."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # for libraries that still call get_event_loop()
    link.loop_thread = threading.get_ident()
    try:
        return loop.run_until_complete(_AsyncServer(app, slot, generation, config, link, shared, signals,
                                                    recycle).run())
    finally:
        close_loop(loop)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the app left running (background tasks from on_start), then close the loop.

    The default executor is not waited for: a thread stuck in ``to_thread`` must not hold up the
    exit (the process leaves with ``os._exit``, which ends it)."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    asyncio.set_event_loop(None)
    loop.close()


async def maybe_await(result: Any) -> Any:
    """on_start/on_stop may be sync or async."""
    return await result if inspect.isawaitable(result) else result


class _AsyncServer:
    def __init__(self, app: type[Worker], slot: int, generation: int, config: Config, link: _AgentLink,
                 shared: SharedState, signals: SignalQueue, recycle: _Recycler) -> None:
        self.app = app
        self.slot = slot
        self.generation = generation
        self.config = config
        self.link = link
        self.shared = shared
        self.signals = signals
        self.recycle = recycle
        self.concurrency = config.workers.concurrency
        self.log = logs.get("worker")
        self.running: dict[int, float] = {}  # delivery id -> start time, oldest first
        self.tasks: set[asyncio.Task[None]] = set()  # strong references while they run
        self.finished = 0
        self.stop_reason: str | None = None

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()  # something to do: a record arrived, a message finished, a signal
        # Readers first: an async on_start may await a publish confirmation.
        self.loop.add_reader(self.link.inbound, self._readable)
        self.loop.add_reader(self.signals.fileno(), self._signalled)
        try:
            worker = self.app()
            worker._attach(self.slot, self.config, self.link)
            await maybe_await(worker.on_start())
        except Exception:
            self.log.exception("worker %d failed to boot (%s.__init__ or on_start raised)", self.slot,
                               self.app.__name__)
            return ExitCode.APP
        self.worker = worker
        self.link.send(channel.Ready(self.slot, self.generation))
        self.log.debug("worker %d ready (async, concurrency %d)", self.slot, self.concurrency)
        try:
            await self._serve()
        finally:
            try:
                self.link.flush()  # completions still queued
            except OSError:
                self.log.warning("could not report the last completions: the agent side is gone")
            try:
                await maybe_await(worker.on_stop())
            except Exception:
                self.log.exception("on_stop raised")
        return ExitCode.OK

    async def _serve(self) -> None:
        """Start messages while there is room; leave once stopping and nothing is in flight.

        Stopping (a stop record, SIGTERM, the agent gone) starts nothing new; the messages in flight
        finish first, within ``graceful_timeout``, which the supervisor enforces.
        """
        link = self.link
        while True:
            self.wake.clear()
            while self.stop_reason is None and len(self.running) < self.concurrency:
                record = link.take()
                if record is None:
                    break
                if isinstance(record, channel.Deliver):
                    self._start(record)
                elif isinstance(record, channel.Stop):
                    self.log.debug("stop requested; finishing %d message(s) in flight", len(self.running))
                    self.stop_reason = "stop requested"
            if self.stop_reason is None and link.closed and not link.has_records():
                self.log.warning("the agent's channel closed; stopping after %d message(s) in flight",
                                 len(self.running))
                self.stop_reason = "the agent's channel closed"
            if self.stop_reason is not None and not self.running:
                return
            link.flush()  # completions go out before the loop waits, as in the sync loop
            if not self.running:  # every Done is on the channel: a death now charges nothing
                self.shared.set_current(self.slot, self.generation, 0)
            await self.wake.wait()

    def _start(self, record: channel.Deliver) -> None:
        began = time.monotonic()
        if not self.running:  # the oldest message in flight is the one the supervisor's hang check watches
            self.shared.set_current(self.slot, self.generation, record.delivery_id)
            self.shared.set_busy_since(self.slot, began)
        self.running[record.delivery_id] = began
        message = Message(record.topic, record.payload, record.qos, record.retain, record.redelivered,
                          record.properties)
        task = self.loop.create_task(self._handle(record.delivery_id, message, began))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, delivery_id: int, message: Message, began: float) -> None:
        outcome = await self.worker.handle_async(message)
        self._finish(delivery_id, outcome, began)

    def _finish(self, delivery_id: int, outcome: Outcome, began: float) -> None:
        was_oldest = next(iter(self.running)) == delivery_id
        del self.running[delivery_id]
        if was_oldest:
            if self.running:
                oldest, since = next(iter(self.running.items()))
                self.shared.set_current(self.slot, self.generation, oldest)
                self.shared.set_busy_since(self.slot, since)
            else:  # it stays current until its Done is on the channel (``_serve`` clears it)
                self.shared.set_busy_since(self.slot, 0.0)
        self.finished += 1
        self.shared.set_finished(self.slot, self.finished)
        self.link.send_later(channel.Done(delivery_id, outcome, time.monotonic() - began))
        reason = self.recycle.due(self.finished)
        if reason:
            self.log.info("recycling: %s; finishing what this worker holds", reason)
            self.link.send(channel.Retire(self.slot, self.generation))
        self.wake.set()

    def _readable(self) -> None:
        self.link.read_available()
        if self.link.closed:
            self.loop.remove_reader(self.link.inbound)  # end of file stays readable; stop polling it
        if self.link.closed or self.link.has_records():
            self.wake.set()

    def _signalled(self) -> None:
        if self.signals.pop() and self.stop_reason is None:
            self.log.info("SIGTERM: stopping after the %d message(s) in flight", len(self.running))
            self.stop_reason = "SIGTERM"
            self.wake.set()
