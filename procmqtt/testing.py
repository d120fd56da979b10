"""Unit-test a procmqtt app in process: no broker, no processes.

``WorkerHarness`` runs one instance of the app the way a worker process does: the same load-time
checks, ``on_start``/``on_stop``, and every delivery through ``Worker.handle`` (or
``handle_async`` for async apps), so routes, parameters and outcomes behave as in production.
The channels are replaced by ``FakeLink``, which records what the app publishes and subscribes.

    with WorkerHarness(Sensors, config={"app": {"alert_above": 30}}) as h:
        assert h.deliver("sensors/d1/temperature", {"celsius": 31.5}) is Outcome.OK
        assert h.published == [("alerts/d1", b'{"device":"d1","celsius":31.5}', 1, False)]
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

from . import channel
from .aioworker import close_loop, maybe_await
from .config import Config, from_mapping
from .message import Message, Outcome
from .routes import Route, routes_of
from .topics import topic_problem
from .worker import Payload, PublishHandle, Worker, check_app, to_bytes, uses_asyncio

W = TypeVar("W", bound=Worker)

__all__ = ["FakeLink", "WorkerHarness"]


class FakeLink:
    """What a Worker uses of its channels (``publish``, ``send``, ``wait_for``), recorded in lists.

    Every publish succeeds at once: its handle's ``wait()`` and ``await`` give True.
    """

    loop_thread: int | None = None

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.subscriptions: list[tuple[str, int]] = []
        self.unsubscriptions: list[str] = []
        self._requests = itertools.count(1)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> PublishHandle:
        self.published.append((topic, payload, qos, retain))
        handle = PublishHandle(self, next(self._requests))
        handle._resolve(0)
        return handle

    def send(self, record: channel.Record) -> None:
        if isinstance(record, channel.Subscribe):
            self.subscriptions.append((record.topic_filter, record.qos))
        elif isinstance(record, channel.Unsubscribe):
            self.unsubscriptions.append(record.topic_filter)

    def wait_for(self, handle: PublishHandle, timeout: float | None) -> bool:
        return handle.error == 0


class WorkerHarness(Generic[W]):
    """One app instance with fake channels; use it as a context manager (``with`` or ``async with``).

    ``config``: a ``Config`` or a mapping shaped like the TOML file (``{"app": {...}, "workers":
    {...}}``), checked like the file. ``raise_exceptions``: a handler's exception propagates out of
    ``deliver`` (default); with False it is logged and ``deliver`` returns ``Outcome.FAILED``, as in
    production. Async apps run on the harness's own event loop with ``with``, or on the test's loop
    with ``async with`` and ``deliver_async``. Deliveries run one at a time.
    """

    def __init__(self, app: type[W], config: Config | Mapping[str, Any] | None = None, *,
                 raise_exceptions: bool = True, worker_id: int = 0) -> None:
        check_app(app)  # the same checks as procmqtt run: bad routes raise RouteError here
        self.app = app
        self.config = config if isinstance(config, Config) else from_mapping(config or {}, "WorkerHarness config")
        self.raise_exceptions = raise_exceptions
        self.worker_id = worker_id
        self.link = FakeLink()
        self.routes: tuple[Route, ...] = routes_of(app)
        self.is_async = uses_asyncio(app)
        self._worker: W | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def worker(self) -> W:
        """The app instance (inside the ``with`` block)."""
        if self._worker is None:
            raise RuntimeError("WorkerHarness: use it as a context manager first")
        return self._worker

    @property
    def published(self) -> list[tuple[str, bytes, int, bool]]:
        """``(topic, payload bytes, qos, retain)`` of every publish, in order."""
        return self.link.published

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        """``(filter, qos)`` of every ``self.subscribe`` call, in order."""
        return self.link.subscriptions

    @property
    def unsubscriptions(self) -> list[str]:
        """The filter of every ``self.unsubscribe`` call, in order."""
        return self.link.unsubscriptions

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> WorkerHarness[W]:
        if self.is_async:
            self._loop = asyncio.new_event_loop()
        try:
            self._run(self._start())
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._run(maybe_await(self.worker.on_stop()))
        finally:
            self._close()

    async def __aenter__(self) -> WorkerHarness[W]:
        await self._start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await maybe_await(self.worker.on_stop())
        self._worker = None

    async def _start(self) -> None:
        worker = self.app()
        worker._attach(self.worker_id, self.config, self.link)
        worker._raise_errors = self.raise_exceptions
        await maybe_await(worker.on_start())
        self._worker = worker

    def _run(self, coroutine: Any) -> Any:
        if self._loop is not None:
            return self._loop.run_until_complete(coroutine)
        try:  # a sync app: nothing in the coroutine awaits anything
            coroutine.send(None)
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("WorkerHarness: a sync app awaited something")  # pragma: no cover

    def _close(self) -> None:
        self._worker = None
        if self._loop is not None:
            close_loop(self._loop)
            self._loop = None

    # --- messages ----------------------------------------------------------------------------

    def deliver(self, topic: str, payload: Payload = b"", qos: int = 0, retain: bool = False,
                redelivered: bool = False) -> Outcome:
        """Hand one message to the app as the agent would; returns how handling ended.

        ``payload``: bytes, str (UTF-8) or a JSON-serialisable object, as for ``publish``.
        """
        message = self._message(topic, payload, qos, retain, redelivered)
        if self._loop is not None:
            return self._loop.run_until_complete(self.worker.handle_async(message))
        if self.is_async:
            raise RuntimeError("WorkerHarness: an async app entered with 'async with' takes deliver_async")
        return self.worker.handle(message)

    async def deliver_async(self, topic: str, payload: Payload = b"", qos: int = 0, retain: bool = False,
                            redelivered: bool = False) -> Outcome:
        """``deliver`` on the running event loop (inside ``async with``)."""
        return await self.worker.handle_async(self._message(topic, payload, qos, retain, redelivered))

    def _message(self, topic: str, payload: Payload, qos: int, retain: bool, redelivered: bool) -> Message:
        problem = topic_problem(topic)
        if problem:
            raise ValueError(f"deliver: {problem}, got {topic!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"deliver: qos must be 0, 1 or 2, got {qos!r}")
        return Message(topic, to_bytes(payload), qos, bool(retain), bool(redelivered))
