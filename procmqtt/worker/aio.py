"""The worker loop for apps with async handlers: one asyncio event loop per worker process.

Up to ``[workers] concurrency`` messages are handled at once, each in its own task, and each
message's completion goes to the agent when that message finishes, so acknowledgements stay per
message. The event loop is the only reader of the worker's channel: deliveries, the stop record and
publish confirmations (which wake ``await handle``) all arrive through one reader callback. Sync apps
never come here (``sync.SyncLoop``). Runs in the worker process, after fork.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import selectors
import threading
from collections.abc import Callable
from typing import Any

from procmqtt.ipc import channel
from procmqtt.message import Message
from procmqtt.worker.loop import ServeLoop


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


async def _invoke(func: Callable[[], Any]) -> Any:
    """Call ``func`` on the running loop (so it may use it), awaiting what it returns if awaitable."""
    return await maybe_await(func())


class _WaitHook(selectors.DefaultSelector):
    """The event loop's selector, calling ``before_wait`` whenever the loop is about to block: a
    ``select`` with a timeout other than 0 (asyncio passes 0 while callbacks are ready to run)."""

    def __init__(self, before_wait: Callable[[], None]) -> None:
        super().__init__()
        self.before_wait = before_wait

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout > 0:
            self.before_wait()
        return super().select(timeout)


class AsyncLoop(ServeLoop):
    """Runs each delivery as a task on a fresh event loop; the hooks run on that loop too."""

    def setup(self) -> None:
        super().setup()
        # The default event loop gets a selector that flushes the queued completions whenever the loop
        # is about to block (``_WaitHook``): a backlog of quick messages sends its Dones in batches,
        # as the sync loop does, and none is held back while the worker waits. A policy the app set
        # (uvloop) keeps its own loop, and ``_serve`` flushes on every pass instead.
        self.serving = False  # the hook acts only in ``serve``: a dead agent's EPIPE then ends it as before
        self.loop = asyncio.new_event_loop()
        self.flush_on_wait = type(self.loop) is asyncio.SelectorEventLoop  # the default loop: hook it
        if self.flush_on_wait:
            self.loop.close()
            self.loop = asyncio.SelectorEventLoop(_WaitHook(self._before_wait))
        asyncio.set_event_loop(self.loop)  # for libraries that still call get_event_loop()
        self.link.loop_thread = threading.get_ident()
        self.concurrency = self.config.workers.concurrency
        self.tasks: set[asyncio.Task[None]] = set()  # strong references while they run
        self.wake = asyncio.Event()  # something to do: a record arrived, a message finished, a signal
        # Readers first: an async on_start may await a publish confirmation.
        self.loop.add_reader(self.link.inbound, self._readable)
        self.loop.add_reader(self.signals.fileno(), self._signalled)

    def ready_note(self) -> str:
        return f" (async, concurrency {self.concurrency})"

    def call(self, func: Callable[[], Any]) -> Any:
        return self.loop.run_until_complete(_invoke(func))

    def serve(self) -> None:
        self.serving = True
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.serving = False

    def teardown(self) -> None:
        close_loop(self.loop)

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
                    self.stop(
                        "stop requested",
                        logging.DEBUG,
                        "stop requested; finishing %d message(s) in flight",
                        len(self.running),
                    )
            if self.stop_reason is None and link.closed and not link.has_records():
                self.stop(
                    "the agent's channel closed",
                    logging.WARNING,
                    "the agent's channel closed; stopping after %d message(s) in flight",
                    len(self.running),
                )
            if self.stop_reason is not None and not self.running:
                return
            if not self.flush_on_wait:
                self._before_wait()
            await self.wake.wait()

    def _before_wait(self) -> None:
        """Completions go out before the worker waits, as in the sync loop. With none running, every
        Done is on the channel: a death now charges nothing (before its first message the slot
        still names its predecessor's delivery, which the agent may not have read yet)."""
        if not self.serving:
            return
        self.link.flush()
        if not self.running and self.current_written:
            self._set_delivery(0)

    def _start(self, record: channel.Deliver) -> None:
        message = self.started(record)
        task = self.loop.create_task(self._handle(record.delivery_id, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, delivery_id: int, message: Message) -> None:
        self.done(delivery_id, await self.runner.handle_async(message))
        self.wake.set()

    def _readable(self) -> None:
        self.link.read_available()
        if self.link.closed:
            self.loop.remove_reader(self.link.inbound)  # end of file stays readable; stop polling it
        if self.link.closed or self.link.has_records():
            self.wake.set()

    def _signalled(self) -> None:
        if self.signals.pop() and self.stop_reason is None:
            self.stop("SIGTERM", logging.INFO, "SIGTERM: stopping after the %d message(s) in flight", len(self.running))
            self.wake.set()
