"""Unit-test a procmqtt app in process: no broker, no processes.

``WorkerHarness`` runs one instance of the app the way a worker process does: the same load-time
checks, ``on_start``/``on_stop``, and every delivery through ``worker.handling.Runner``, the code
path of a worker process, so routes, parameters, typed bodies, middleware, return values and
outcomes behave as in production.
The channels are replaced by ``FakeLink``, which records what the app publishes and subscribes.

    with WorkerHarness(Sensors, config={"app": {"alert_above": 30}}) as h:
        assert h.deliver("sensors/d1/temperature", {"celsius": 31.5}) is Outcome.OK
        assert h.published == [("alerts/d1", b'{"device":"d1","celsius":31.5}', 1, False)]

MQTT 5 apps (``config={"mqtt": {"protocol": "5"}}``) get ``Message.properties`` as in production;
``h.respond(filter, answer)`` answers the app's ``self.request`` calls.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

from procmqtt.config import Config, from_mapping
from procmqtt.ipc import channel
from procmqtt.message import EMPTY, Message, Outcome, Properties, Retry
from procmqtt.topics import filter_problem, topic_matches, topic_problem
from procmqtt.worker.aio import close_loop, maybe_await
from procmqtt.worker.answers import PublishHandle, _Answer, _ReplyWaiter
from procmqtt.worker.base import Worker, check_app, uses_asyncio
from procmqtt.worker.handling import Runner
from procmqtt.worker.link import Payload, to_bytes
from procmqtt.worker.middleware import check_configured
from procmqtt.worker.routes import Route, routes_of

W = TypeVar("W", bound=Worker)

__all__ = ["FakeLink", "WorkerHarness"]


Answer = Callable[[Message], Payload]
"""What ``WorkerHarness.respond`` calls with a request: it returns the reply's payload."""


class FakeLink:
    """What a Worker uses of its channels (the ``worker.answers.Link`` protocol), recorded in lists.

    Every publish succeeds at once: its handle's ``wait()`` and ``await`` give True. A request is
    answered at once by the first responder whose filter matches its topic; with none it times out
    at once.
    """

    loop_thread: int | None = None
    closed = False

    def __init__(self, worker_id: int = 0) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.published_messages: list[Message] = []
        self.subscriptions: list[tuple[str, int]] = []
        self.unsubscriptions: list[str] = []
        self.responders: list[tuple[str, Answer]] = []
        self.reply_topic = f"procmqtt/reply/harness/{worker_id}"
        self._requests = itertools.count(1)

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None = None
    ) -> PublishHandle:
        self.published.append((topic, payload, qos, retain))
        self.published_messages.append(Message(topic, payload, qos, retain, False, properties))
        handle = PublishHandle(self, next(self._requests))
        handle._resolve(0)
        return handle

    def request(self, topic: str, payload: bytes, qos: int, properties: Properties) -> _ReplyWaiter:
        properties = properties.merged(response_topic=self.reply_topic)
        waiter = _ReplyWaiter(self, properties.correlation_data or b"")
        waiter.handle = self.publish(topic, payload, qos, False, properties)
        for topic_filter, answer in self.responders:
            if topic_matches(topic_filter, topic):
                request = Message(topic, payload, qos, False, False, properties)
                reply = to_bytes(answer(request))
                waiter._answer(
                    Message(
                        self.reply_topic,
                        reply,
                        qos,
                        False,
                        False,
                        Properties(correlation_data=properties.correlation_data),
                    )
                )
                break
        return waiter

    def forget(self, waiter: _ReplyWaiter) -> None:
        pass

    def send(self, record: channel.Record) -> None:
        if isinstance(record, channel.Subscribe):
            self.subscriptions.append((record.topic_filter, record.qos))
        elif isinstance(record, channel.Unsubscribe):
            self.unsubscriptions.append(record.topic_filter)

    def wait_for(self, handle: _Answer, timeout: float | None) -> bool:
        return handle.error == 0


class WorkerHarness(Generic[W]):
    """One app instance with fake channels; use it as a context manager (``with`` or ``async with``).

    ``config``: a ``Config`` or a mapping shaped like the TOML file (``{"app": {...}, "workers":
    {...}}``), checked like the file. ``raise_exceptions``: a handler's exception propagates out of
    ``deliver`` (default); with False it is logged and ``deliver`` returns ``Outcome.FAILED``, as in
    production. Async apps run on the harness's own event loop with ``with``, or on the test's loop
    with ``async with`` and ``deliver_async``. Deliveries run one at a time.
    """

    def __init__(
        self,
        app: type[W],
        config: Config | Mapping[str, Any] | None = None,
        *,
        raise_exceptions: bool = True,
        worker_id: int = 0,
    ) -> None:
        check_app(app)  # the same checks as procmqtt run: bad routes raise RouteError here
        self.app = app
        self.config = config if isinstance(config, Config) else from_mapping(config or {}, "WorkerHarness config")
        check_configured(app, self.config, is_async=uses_asyncio(app))  # [workers] middleware
        self.raise_exceptions = raise_exceptions
        self.worker_id = worker_id
        self.link = FakeLink(worker_id)
        self.routes: tuple[Route, ...] = routes_of(app)
        self.is_async = uses_asyncio(app)
        self._worker: W | None = None
        self._runner: Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.retry: Retry | None = None  # what the last delivery raised, when it ended in Outcome.RETRY

    @property
    def worker(self) -> W:
        """The app instance (inside the ``with`` block)."""
        if self._worker is None:
            raise RuntimeError("WorkerHarness: use it as a context manager first")
        return self._worker

    @property
    def runner(self) -> Runner:
        """What hands each delivery to the app (inside the ``with`` block)."""
        if self._runner is None:
            raise RuntimeError("WorkerHarness: use it as a context manager first")
        return self._runner

    @property
    def published(self) -> list[tuple[str, bytes, int, bool]]:
        """``(topic, payload bytes, qos, retain)`` of every publish, in order."""
        return self.link.published

    @property
    def published_messages(self) -> list[Message]:
        """Every publish as a ``Message``, with its MQTT 5 ``properties`` (None when published without);
        a request's response topic is ``procmqtt/reply/harness/<worker_id>``."""
        return self.link.published_messages

    def respond(self, topic_filter: str, answer: Answer | Payload) -> None:
        """Answer the app's requests to topics matching ``topic_filter``: ``answer`` is the reply's
        payload, or a function of the request ``Message`` that returns it."""
        problem = filter_problem(topic_filter)
        if problem:
            raise ValueError(f"respond: {problem}, got {topic_filter!r}")
        self.link.responders.append((topic_filter, answer if callable(answer) else lambda _request: answer))

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

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._run(maybe_await(self.worker.on_stop()))
            self.runner.stop()
        finally:
            self._close()

    async def __aenter__(self) -> WorkerHarness[W]:
        await self._start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await maybe_await(self.worker.on_stop())
            self.runner.stop()
        finally:
            self._worker = self._runner = None

    async def _start(self) -> None:
        worker = self.app()
        worker._attach(self.worker_id, self.config, self.link)
        await maybe_await(worker.on_start())
        self._worker = worker
        self._runner = Runner(worker, raise_errors=self.raise_exceptions)

    def _run(self, coroutine: Any) -> Any:
        if self._loop is not None:
            return self._loop.run_until_complete(coroutine)
        try:  # a sync app: nothing in the coroutine awaits anything
            coroutine.send(None)
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("WorkerHarness: a sync app awaited something")  # pragma: no cover

    def _close(self) -> None:
        self._worker = self._runner = None
        if self._loop is not None:
            close_loop(self._loop)
            self._loop = None

    # --- messages ----------------------------------------------------------------------------

    def deliver(
        self,
        topic: str,
        payload: Payload = b"",
        qos: int = 0,
        retain: bool = False,
        redelivered: bool = False,
        *,
        properties: Properties | None = None,
    ) -> Outcome:
        """Hand one message to the app as the agent would; returns how handling ended.

        ``payload``: bytes, str (UTF-8) or a JSON-serialisable object, as for ``publish``.
        ``properties``: MQTT 5 only; the app sees empty ``Properties`` when not given, as in production.
        A handler that raises ``procmqtt.Retry`` gives ``Outcome.RETRY``; ``self.retry`` then holds
        the exception (``retry.after``: the delay it asked for, None for the configured one).
        """
        message = self._message(topic, payload, qos, retain, redelivered, properties)
        if self._loop is not None:
            return self._ended(self._loop.run_until_complete(self.runner.handle_async(message)))
        if self.is_async:
            raise RuntimeError("WorkerHarness: an async app entered with 'async with' takes deliver_async")
        return self._ended(self.runner.handle(message))

    async def deliver_async(
        self,
        topic: str,
        payload: Payload = b"",
        qos: int = 0,
        retain: bool = False,
        redelivered: bool = False,
        *,
        properties: Properties | None = None,
    ) -> Outcome:
        """``deliver`` on the running event loop (inside ``async with``)."""
        message = self._message(topic, payload, qos, retain, redelivered, properties)
        return self._ended(await self.runner.handle_async(message))

    def _ended(self, result: Outcome | Retry) -> Outcome:
        self.retry = result if isinstance(result, Retry) else None
        return Outcome.RETRY if isinstance(result, Retry) else result

    def _message(
        self, topic: str, payload: Payload, qos: int, retain: bool, redelivered: bool, properties: Properties | None
    ) -> Message:
        problem = topic_problem(topic)
        if problem:
            raise ValueError(f"deliver: {problem}, got {topic!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"deliver: qos must be 0, 1 or 2, got {qos!r}")
        if self.config.mqtt.protocol == "5":
            if properties is not None and not isinstance(properties, Properties):
                raise ValueError(f"deliver: properties must be a procmqtt.Properties, got {properties!r}")
            properties = properties or EMPTY
        elif properties is not None:
            raise ValueError('deliver: properties need MQTT 5; pass config={"mqtt": {"protocol": "5"}}')
        return Message(topic, to_bytes(payload), qos, bool(retain), bool(redelivered), properties)
