"""The ``Worker`` base class users subclass, and the loop that runs it in a worker process.

A worker never talks to the broker. It reads deliveries from its own channel (written only by the
agent), and sends completions, publishes and subscription changes on the publish channel that all
workers share. Everything here runs in the worker process, after fork.
"""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import itertools
import json
import logging
import math
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Generator
from typing import Any

from paho.mqtt.client import error_string
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from . import aioworker, channel, logs
from .config import Config
from .errors import AppError, ExitCode, PublishBufferFull, RequestFailed
from .message import EMPTY, Message, Outcome, Properties
from .routes import Router, routes_of
from .shared import SharedState
from .signals import SignalQueue
from .topics import filter_problem, topic_problem

Payload = Any  # bytes, str, None, or a JSON-serialisable object

AGENT_GONE = 7
"""``PublishHandle.error`` when the agent's side closed before confirming (paho's MQTT_ERR_CONN_LOST)."""


def to_bytes(payload: Payload) -> bytes:
    """bytes stay bytes, str is UTF-8, None is empty, anything else is compact JSON."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if payload is None:
        return b""
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


class _Answer:
    """Something the agent answers later (a publish confirmation, a reply), awaited by a handler:
    ``wait()`` blocks, ``await`` does not block the event loop. ``error`` is 0 on success."""

    def __init__(self, link: Any) -> None:
        self._link = link
        self.error: int | None = None  # paho's error code or the broker's reason code once known
        self._done = threading.Event()
        self._waiters: list[asyncio.Future[None]] = []

    def wait(self, timeout: float | None = None) -> bool:
        """True once answered with success; False when it failed or ``timeout`` seconds passed first."""
        return self._link.wait_for(self, timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """``wait()`` for coroutines: the worker's event loop reads the confirmation meanwhile."""
        if self._done.is_set() or getattr(self._link, "closed", False):  # closed: as wait(), False
            return self._done.is_set() and self.error == 0
        if not getattr(self._link, "loop_thread", None):  # no event loop reads the channel
            return await asyncio.to_thread(self.wait, timeout)
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._done.is_set():  # resolved by another thread just now
            future.set_result(None)
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.remove(future)
        return self._done.is_set() and self.error == 0

    def __await__(self) -> Generator[Any, None, bool]:
        return self.wait_async().__await__()

    def _resolve(self, error: int) -> None:
        self.error = error
        self._done.set()
        for future in self._waiters:
            loop = future.get_loop()
            if threading.get_ident() == self._link.loop_thread:
                _settle(future)
            else:
                loop.call_soon_threadsafe(_settle, future)


class PublishHandle(_Answer):
    """What ``Worker.publish`` returns: ``wait()`` tells whether the publish reached the broker.

    ``wait()`` is True once the agent handed the message to the broker (QoS 0) or the broker
    acknowledged it (QoS 1/2). In an async handler, ``await handle`` (or ``await
    handle.wait_async(timeout)``) gives the same answer without blocking the event loop.
    """

    def __init__(self, link: Any, request_id: int) -> None:
        super().__init__(link)
        self.request_id = request_id


class _ReplyWaiter(_Answer):
    """One ``Worker.request`` in flight: answered by the reply with its correlation data, or failed
    early when its publish fails or the agent goes away."""

    def __init__(self, link: Any, correlation: bytes) -> None:
        super().__init__(link)
        self.correlation = correlation
        self.reply: Message | None = None

    def _answer(self, reply: Message) -> None:
        self.reply = reply
        self._resolve(0)

    def result(self, topic: str, timeout: float) -> Message:
        """The reply, once the wait is over; raises ``TimeoutError`` or ``RequestFailed``."""
        self._link.forget(self)
        if self.reply is not None:
            return self.reply
        if self.error is None:
            raise TimeoutError(f"request to {topic!r}: no reply within {timeout:g}s")
        raise RequestFailed(f"request to {topic!r} failed: {describe_error(self.error)}")


def describe_error(code: int) -> str:
    """Words for ``PublishHandle.error``: the broker's MQTT 5 reason (``Not authorized``) or paho's error."""
    if code == AGENT_GONE:
        return "the agent's side closed before an answer"
    if code >= 128:
        try:
            return f"{ReasonCode(PacketTypes.PUBACK, identifier=code)} (reason code {code})"
        except ValueError:
            return f"reason code {code}"
    return error_string(code)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _AgentLink:
    """The worker's ends of the channels: its inbound socket and the shared publish channel."""

    def __init__(self, slot: int, generation: int, inbound: socket.socket, upstream: socket.socket,
                 config: Config, wakeup: int | None = None) -> None:
        self.slot = slot
        self.generation = generation
        self.inbound = inbound
        self.upstream = upstream
        self.publish_buffer = config.mqtt.publish_buffer
        self.publish_timeout = config.mqtt.publish_timeout
        self.wakeup = wakeup
        self.closed = False  # the agent side is gone for good (end of file)
        self.loop_thread: int | None = None  # async apps: the event loop's thread, the one reader
        self._outbox: deque[bytes] = deque()  # encoded records for the agent, sent in batches
        self._flush_at = max(1, config.workers.prefetch // 2)  # so the agent never waits on a full batch
        self._send_lock = threading.Lock()  # keeps the outbox in order when threads publish
        self._inbox: deque[channel.Record] = deque()
        self._handles: dict[int, PublishHandle] = {}
        self._requests = itertools.count(1)
        self._replies: dict[bytes, _ReplyWaiter] = {}  # correlation data -> request awaiting its reply
        self._request_of: dict[int, _ReplyWaiter] = {}  # publish request id -> its request, until confirmed
        self._lock = threading.Lock()  # one reader of ``inbound`` at a time

    def send(self, record: channel.Record) -> None:
        """Send now, after whatever is queued (so completions never overtake each other)."""
        with self._send_lock:
            self._outbox.append(channel.encode(record))
            channel.send_many(self.upstream, self._outbox)

    def send_later(self, record: channel.Record) -> None:
        """Queue a record (a completion) to go with the next batch."""
        with self._send_lock:
            self._outbox.append(channel.encode(record))
            if len(self._outbox) >= self._flush_at:
                channel.send_many(self.upstream, self._outbox)

    def flush(self) -> None:
        with self._send_lock:
            if self._outbox:
                channel.send_many(self.upstream, self._outbox)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None = None,
                *, request: _ReplyWaiter | None = None) -> PublishHandle:
        if len(self._handles) >= self.publish_buffer:
            self._wait_for_room(topic)
        handle = PublishHandle(self, next(self._requests))
        self._handles[handle.request_id] = handle
        if request is not None:
            self._request_of[handle.request_id] = request
        self.send(channel.Publish(self.slot, self.generation, handle.request_id, topic, payload, qos, retain,
                                  properties, request is not None))
        return handle

    def request(self, topic: str, payload: bytes, qos: int, properties: Properties) -> _ReplyWaiter:
        """Publish a request whose response topic the agent sets to this worker's reply topic."""
        waiter = _ReplyWaiter(self, properties.correlation_data or b"")
        self._replies[waiter.correlation] = waiter
        self.publish(topic, payload, qos, False, properties, request=waiter)
        return waiter

    def forget(self, waiter: _ReplyWaiter) -> None:
        """The requester stopped waiting: a late reply is dropped."""
        self._replies.pop(waiter.correlation, None)

    def _wait_for_room(self, topic: str) -> None:
        """Block while this worker has ``publish_buffer`` publishes unconfirmed (broker down or
        slow), reading confirmations as they come, up to ``publish_timeout``."""
        deadline = time.monotonic() + self.publish_timeout
        while len(self._handles) >= self.publish_buffer and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishBufferFull(
                    f"publish to {topic!r}: this worker already has {self.publish_buffer} unconfirmed "
                    f"publishes (is the broker reachable?); gave up after {self.publish_timeout:g}s")
            if self._loop_reads():
                time.sleep(min(remaining, 0.01))  # the event loop reads the confirmations
                continue
            with self._lock:
                self._pump(min(remaining, 0.1), wake_on_signal=False)

    def _pump(self, timeout: float | None, *, wake_on_signal: bool = True) -> bool:
        """Read whatever the agent sent within ``timeout``; True if anything (or a signal) arrived."""
        fds: list[Any] = [self.inbound]
        if wake_on_signal and self.wakeup is not None:
            fds.append(self.wakeup)
        readable, _, _ = select.select(fds, [], [], timeout)
        if self.inbound not in readable:
            return bool(readable)
        self._read()
        return True

    def _read(self) -> None:
        """Everything already queued on the inbound channel, without waiting."""
        while True:
            try:
                records = channel.receive(self.inbound)
            except BlockingIOError:
                return
            except ConnectionResetError:
                records = None
            if records is None:
                self.closed = True
                for answer in [*self._handles.values(), *self._replies.values()]:  # wake their waiters
                    answer._resolve(AGENT_GONE)
                self._handles.clear()
                self._replies.clear()
                self._request_of.clear()
                return
            for record in records:
                if isinstance(record, channel.Published):
                    handle = self._handles.pop(record.request_id, None)
                    if handle is not None:
                        handle._resolve(record.error)
                    waiter = self._request_of.pop(record.request_id, None)
                    if waiter is not None and record.error:
                        waiter._resolve(record.error)  # the request never left: no reply will come
                elif isinstance(record, channel.Reply):
                    waiter = self._replies.pop(record.properties.correlation_data or b"", None)
                    if waiter is not None:  # else a late or duplicate reply
                        waiter._answer(Message(record.topic, record.payload, record.qos, record.retain,
                                               False, record.properties))
                else:
                    self._inbox.append(record)

    def read_available(self) -> None:
        """Read what the agent sent, without waiting (the async loop's reader callback)."""
        with self._lock:
            self._read()

    def has_records(self) -> bool:
        return bool(self._inbox)

    def take(self) -> channel.Record | None:
        """The next delivery or stop record already read, or None (the async loop)."""
        return self._inbox.popleft() if self._inbox else None

    def next(self, timeout: float | None = None) -> channel.Record | None:
        """The next delivery or stop record, or None (timeout, signal, or the agent side closed).

        Queued completions go out before the worker waits, so the agent always hears in time.
        """
        if not self._inbox and not self.closed:
            with self._lock:
                self._read()
                if not self._inbox and not self.closed:
                    self.flush()
                    self._pump(timeout)
        return self._inbox.popleft() if self._inbox else None

    def wait_for(self, handle: PublishHandle, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not handle._done.is_set() and not self.closed:
            remaining = 0.1 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                break
            if not self._loop_reads() and self._lock.acquire(blocking=False):
                try:
                    self._pump(min(remaining, 0.1), wake_on_signal=False)
                finally:
                    self._lock.release()
            else:  # another thread is reading; it resolves our handle too
                handle._done.wait(min(remaining, 0.01))
        return handle._done.is_set() and handle.error == 0

    def _loop_reads(self) -> bool:
        """True in a thread other than a running event loop's, which reads the channel itself."""
        return self.loop_thread is not None and threading.get_ident() != self.loop_thread


class Worker:
    """Subclass this and add ``@route`` methods, or implement ``on_message``.

    One instance lives in each worker process; it is created after fork, so ``__init__`` and
    ``on_start`` may open connections and files freely. ``worker_id``, ``config`` and ``log`` are
    set before ``on_start`` runs. Any of ``on_start``, ``on_message``, ``on_stop`` and the routes
    may be ``async def``: the worker then runs them on an event loop (see ``aioworker``).
    """

    worker_id: int
    config: Config
    log: logging.Logger
    _link: Any = None
    _router: Router | None = None
    _raise_errors = False  # procmqtt.testing: let a handler's exception through

    def on_start(self) -> None:
        """Called once in the worker process before the first message."""

    def on_message(self, message: Message) -> Any:
        """Called for each message this worker is given.

        The default hands the message to the most specific matching ``@route`` method and returns
        ``Outcome.UNROUTED`` when none matches. An override receives every message (routes then
        only subscribe), and may call ``super().on_message(message)`` to dispatch.
        """
        router = self._router or self._make_router()
        found = router.match(message.topic)
        if found is None:
            router.unrouted(message.topic)
            return Outcome.UNROUTED
        handler, params = found
        return handler(message, **params)

    def on_stop(self) -> None:
        """Called once when the worker stops gracefully."""

    def publish(self, topic: str, payload: Payload = b"", qos: int = 0, retain: bool = False, *,
                properties: Properties | None = None, **fields: Any) -> PublishHandle:
        """Publish through the agent. ``payload``: bytes, str (UTF-8) or a JSON-serialisable object.

        MQTT 5: ``properties`` (a ``Properties``) and/or its fields as keywords (``user_properties``,
        ``content_type``, ``response_topic``, ``correlation_data``, ``message_expiry``,
        ``payload_format_indicator``); keywords override ``properties``.
        """
        problem = topic_problem(topic)
        if problem:
            raise ValueError(f"publish: {problem}, got {topic!r}")
        _check_qos(qos)
        props = self._properties("publish", properties, fields)
        data = to_bytes(payload)
        _check_format("publish", props, data)
        return self._require_link().publish(topic, data, qos, bool(retain), props)

    def request(self, topic: str, payload: Payload = b"", timeout: float = 10.0, qos: int = 1, *,
                properties: Properties | None = None, **fields: Any) -> Message:
        """Publish a request and return the reply (MQTT 5), for request/response services.

        The request carries a response topic that leads back to this very worker and random
        correlation data; the answering side replies there with the same correlation data
        (``Worker.reply`` does). The request expires at the broker after ``timeout`` seconds unless
        ``message_expiry`` says otherwise. Raises ``TimeoutError`` when no reply came within
        ``timeout``, ``RequestFailed`` when the request could not be published. Blocks; an async
        handler uses ``request_async``.
        """
        waiter = self._send_request(topic, payload, timeout, qos, properties, fields)
        waiter.wait(timeout)
        return waiter.result(topic, timeout)

    async def request_async(self, topic: str, payload: Payload = b"", timeout: float = 10.0, qos: int = 1, *,
                            properties: Properties | None = None, **fields: Any) -> Message:
        """``request`` for async handlers: awaits the reply without blocking the event loop."""
        waiter = self._send_request(topic, payload, timeout, qos, properties, fields)
        await waiter.wait_async(timeout)
        return waiter.result(topic, timeout)

    def reply(self, message: Message, payload: Payload = b"", qos: int = 1, *,
              properties: Properties | None = None, **fields: Any) -> PublishHandle:
        """Answer a request (MQTT 5): publish to its response topic with its correlation data.

        Raises ``ValueError`` when ``message`` has no response topic (it was not a request).
        """
        asked = message.properties
        if asked is None:
            raise ValueError(f"reply: the message on {message.topic!r} came over MQTT 3.1.1, which has no "
                             f"response topic; set [mqtt] protocol = \"5\"")
        if asked.response_topic is None:
            raise ValueError(f"reply: the message on {message.topic!r} has no response topic (it is not a request)")
        props = (self._properties("reply", properties, fields) or EMPTY).merged(
            correlation_data=asked.correlation_data)
        return self.publish(asked.response_topic, payload, qos, properties=props)

    def _send_request(self, topic: str, payload: Payload, timeout: float, qos: int,
                      properties: Properties | None, fields: dict[str, Any]) -> _ReplyWaiter:
        if self.config.mqtt.protocol != "5":
            raise ValueError(f"request: request/reply needs MQTT 5 (response topic and correlation data); "
                             f"set [mqtt] protocol = \"5\" (this app uses {self.config.mqtt.protocol})")
        problem = topic_problem(topic)
        if problem:
            raise ValueError(f"request: {problem}, got {topic!r}")
        _check_qos(qos)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"request: timeout must be a number of seconds above 0, got {timeout!r}")
        props = self._properties("request", properties, fields) or EMPTY
        if props.response_topic is not None or props.correlation_data is not None:
            raise ValueError("request: response_topic and correlation_data are set by request itself; "
                             "use publish to send your own")
        props = props.merged(correlation_data=os.urandom(16),
                             message_expiry=props.message_expiry or math.ceil(timeout))
        data = to_bytes(payload)
        _check_format("request", props, data)
        return self._require_link().request(topic, data, qos, props)

    def _properties(self, what: str, properties: Properties | None, fields: dict[str, Any]) -> Properties | None:
        """The MQTT 5 properties of a publish, or None; a clear error on MQTT 3.1.1 or for a bad value."""
        if properties is None and not fields:
            return None
        if self.config.mqtt.protocol != "5":
            raise ValueError(f"{what}: message properties need MQTT 5; set [mqtt] protocol = \"5\" "
                             f"(this app uses {self.config.mqtt.protocol})")
        if properties is not None and not isinstance(properties, Properties):
            raise ValueError(f"{what}: properties must be a procmqtt.Properties, got {properties!r}")
        try:
            return (properties or EMPTY).merged(**fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: {exc}") from None

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        """Subscribe the whole app (not just this worker); kept across reconnects and agent restarts."""
        problem = filter_problem(topic_filter)
        if problem:
            raise ValueError(f"subscribe: {problem}, got {topic_filter!r}")
        _check_qos(qos)
        self._require_link().send(channel.Subscribe(topic_filter, qos))

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe the whole app from ``topic_filter``."""
        problem = filter_problem(topic_filter)
        if problem:
            raise ValueError(f"unsubscribe: {problem}, got {topic_filter!r}")
        self._require_link().send(channel.Unsubscribe(topic_filter))

    def handle(self, message: Message) -> Outcome:
        """Run ``on_message`` for one message; log (never raise) its exception.

        The one code path for every message of a sync app, in production and in tests;
        ``handle_async`` is its twin for apps with async handlers.
        """
        try:
            result = self.on_message(message)
        except Exception:
            if self._raise_errors:
                raise
            return self._failed(message)
        if result is None:
            return Outcome.OK
        if result is Outcome.UNROUTED:
            return Outcome.UNROUTED
        if inspect.iscoroutine(result):  # an async handler reached from a sync app: a bug, say so
            result.close()
            self.log.error("on_message for topic %r returned a coroutine, but this worker runs no event "
                           "loop; declare the handler with async def on the class", message.topic)
            return Outcome.FAILED
        return Outcome.OK

    async def handle_async(self, message: Message) -> Outcome:
        """``handle`` for apps with async handlers, on the worker's event loop; sync handlers run inline."""
        try:
            result = self.on_message(message)
            if inspect.iscoroutine(result):
                result = await result
        except Exception:
            if self._raise_errors:
                raise
            return self._failed(message)
        return Outcome.UNROUTED if result is Outcome.UNROUTED else Outcome.OK

    def _failed(self, message: Message) -> Outcome:
        """Called in an except block: log the handler's exception with its traceback."""
        self.log.exception("on_message failed for topic %r", message.topic)
        return Outcome.FAILED

    def _attach(self, worker_id: int, config: Config, link: Any) -> None:
        self.worker_id = worker_id
        self.config = config
        self.log = logging.getLogger(f"procmqtt.app.{type(self).__name__}")
        self._link = link
        self._make_router()

    def _make_router(self) -> Router:
        self._router = Router(routes_of(type(self)), self, logging.getLogger("procmqtt.worker.routes"))
        return self._router

    def _require_link(self) -> _AgentLink:
        if self._link is None:
            raise RuntimeError("this worker is not running under procmqtt")
        return self._link


def uses_asyncio(app: type[Worker]) -> bool:
    """True when any hook or route is ``async def``: the worker then runs an event loop."""
    names = ["on_start", "on_message", "on_stop", *(r.name for r in routes_of(app))]
    return any(inspect.iscoroutinefunction(getattr(app, name)) for name in names)


def check_app(app: type[Worker]) -> None:
    """Load-time checks (supervisor, harness): the routes are valid, and something handles messages."""
    routes = routes_of(app)
    if not routes and app.on_message is Worker.on_message:
        raise AppError(f"{app.__qualname__} has no @route methods and does not override on_message, "
                       "so it would handle nothing")


def _check_format(what: str, properties: Properties | None, payload: bytes) -> None:
    """MQTT 5 calls a payload declared UTF-8 that is not malformed: brokers and subscribers may refuse it
    (reason code 0x99), so the worker that made the mistake hears of it instead."""
    if properties is not None and properties.payload_format_indicator == 1:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what}: payload_format_indicator=1 declares a UTF-8 payload, but the payload "
                             "is not valid UTF-8") from None


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2) or isinstance(qos, bool):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")


def serve(app: type[Worker], slot: int, generation: int, config: Config, inbound: socket.socket,
          upstream: socket.socket, shared: SharedState) -> int:
    """The worker process's main loop, after fork; returns the process exit code.

    Exits: a STOP record (graceful stop or recycling: everything queued before it is handled
    first), SIGTERM (stop after the current message), or the agent side closing for good.
    Apps with async handlers run ``aioworker.serve_async`` instead, with the same exits.
    """
    log = logs.get("worker")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # the supervisor's hang report
    signals = SignalQueue([signal.SIGTERM])
    inbound.setblocking(False)
    link = _AgentLink(slot, generation, inbound, upstream, config, wakeup=signals.fileno())
    recycle = _Recycler(config)
    if uses_asyncio(app):
        return aioworker.serve_async(app, slot, generation, config, link, shared, signals, recycle)
    try:
        worker = app()
        worker._attach(slot, config, link)
        worker.on_start()
    except Exception:
        log.exception("worker %d failed to boot (%s.__init__ or on_start raised)", slot, app.__name__)
        return ExitCode.APP
    link.send(channel.Ready(slot, generation))
    log.debug("worker %d ready", slot)
    finished = 0
    try:
        while True:
            if signals.pop():
                log.info("SIGTERM: stopping after the current message")
                break
            record = link.next()
            if isinstance(record, channel.Deliver):
                shared.set_current(slot, generation, record.delivery_id)
                began = time.monotonic()
                shared.set_busy_since(slot, began)
                outcome = worker.handle(Message(record.topic, record.payload, record.qos, record.retain,
                                                record.redelivered, record.properties))
                shared.set_busy_since(slot, 0.0)
                shared.set_current(slot, generation, 0)
                finished += 1
                shared.set_finished(slot, finished)
                link.send_later(channel.Done(record.delivery_id, outcome, time.monotonic() - began))
                reason = recycle.due(finished)
                if reason:
                    log.info("recycling: %s; finishing what this worker holds", reason)
                    link.send(channel.Retire(slot, generation))
            elif isinstance(record, channel.Stop):
                log.debug("stop requested; every message received was handled")
                break
            elif link.closed:
                log.warning("the agent's channel closed; stopping")
                break
    finally:
        try:
            link.flush()  # completions still queued
        except OSError:
            log.warning("could not report the last completions: the agent side is gone")
        try:
            worker.on_stop()
        except Exception:
            log.exception("on_stop raised")
    return ExitCode.OK


class _Recycler:
    """Decides when a worker should be replaced: after max_messages (+ jitter) or above max_memory_mb."""

    def __init__(self, config: Config) -> None:
        w = config.workers
        self.limit = w.max_messages + random.randint(0, w.max_messages_jitter) if w.max_messages else 0
        self.max_rss = w.max_memory_mb * 1024 * 1024
        self.next_memory_check = 0.0
        self.requested = False

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
