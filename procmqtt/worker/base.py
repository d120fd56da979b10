"""The ``Worker`` base class users subclass, and the loop that runs it in a worker process.

A worker never talks to the broker. It reads deliveries from its own channel (written only by the
agent), and sends completions, publishes and subscription changes on the publish channel that all
workers share (``link.py`` holds that side). Everything here runs in the worker process, after fork.
"""

from __future__ import annotations

import faulthandler
import inspect
import logging
import math
import os
import random
import signal
import socket
import sys
import time
from typing import Any

from procmqtt import logs, mqtt5
from procmqtt.config import Config
from procmqtt.errors import AppError, ExitCode
from procmqtt.ipc import channel
from procmqtt.ipc.shared import SharedState
from procmqtt.ipc.signals import SignalQueue
from procmqtt.message import EMPTY, Message, Outcome, Properties
from procmqtt.topics import (
    MAX_TOPIC_BYTES,
    filter_problem,
    packet_problem,
    topic_problem,
)
from procmqtt.worker import aio
from procmqtt.worker.link import (  # noqa: F401  (re-exported: procmqtt.worker.PublishHandle etc. stay importable)
    AGENT_GONE,
    Payload,
    PublishHandle,
    _AgentLink,
    _ReplyWaiter,
    describe_error,
    to_bytes,
)
from procmqtt.worker.routes import Router, routes_of


class Worker:
    """Subclass this and add ``@route`` methods, or implement ``on_message``.

    One instance lives in each worker process; it is created after fork, so ``__init__`` and
    ``on_start`` may open connections and files freely. ``worker_id``, ``config`` and ``log`` are
    set before ``on_start`` runs. Any of ``on_start``, ``on_message``, ``on_stop`` and the routes
    may be ``async def``: the worker then runs them on an event loop (see ``worker.aio``).
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
        _check_size("publish", topic, data, qos, props, v5=self.config.mqtt.protocol == "5")
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
        _check_size("request", topic, data, qos, props, v5=True, request=True)
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
        self._check_filter("subscribe", topic_filter)
        _check_qos(qos)
        self._require_link().send(channel.Subscribe(topic_filter, qos))

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe the whole app from ``topic_filter``."""
        self._check_filter("unsubscribe", topic_filter)
        self._require_link().send(channel.Unsubscribe(topic_filter))

    def _check_filter(self, what: str, topic_filter: str) -> None:
        """The filter as the agent will send it (inside ``$share/<group>/`` with ``share_group``) must
        be valid: checked here, where the caller sees the error, not when the broker or paho refuses."""
        problem = filter_problem(topic_filter)
        if problem is None and self.config.mqtt.share_group:
            problem = filter_problem(self.config.mqtt.wire_filter(topic_filter))
            if problem is not None:
                problem += f" as subscribed, inside $share/{self.config.mqtt.share_group}/ ([mqtt] share_group)"
        if problem:
            shown = repr(topic_filter) if len(topic_filter) <= 100 else \
                f"{topic_filter[:100]!r}... ({len(topic_filter)} characters)"
            raise ValueError(f"{what}: {problem}, got {shown}")

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


def _check_size(what: str, topic: str, payload: bytes, qos: int, properties: Properties | None, *,
                v5: bool, request: bool = False) -> None:
    """A packet over MQTT's maximum size fails here, in the handler that made it, not in the agent.
    A request's response topic is set by the agent: the most it can take is counted."""
    size = None
    if v5:
        size = len(mqtt5.to_paho(properties).pack()) if properties is not None else 0
        size += 3 + MAX_TOPIC_BYTES if request else 0
    problem = packet_problem(topic, len(payload), qos, size)
    if problem:
        raise ValueError(f"{what} to {topic[:100]!r}: {problem}")


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2) or isinstance(qos, bool):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")


def serve(app: type[Worker], slot: int, generation: int, config: Config, inbound: socket.socket,
          upstream: socket.socket, shared: SharedState) -> int:
    """The worker process's main loop, after fork; returns the process exit code.

    Exits: a STOP record (graceful stop or recycling: everything queued before it is handled
    first), SIGTERM (stop after the current message), or the agent side closing for good.
    Apps with async handlers run ``aio.serve_async`` instead, with the same exits.
    """
    log = logs.get("worker")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # the supervisor's hang report
    signals = SignalQueue([signal.SIGTERM])
    inbound.setblocking(False)
    link = _AgentLink(slot, generation, inbound, upstream, config, wakeup=signals.fileno())
    recycle = _Recycler(config)
    if uses_asyncio(app):
        return aio.serve_async(app, slot, generation, config, link, shared, signals, recycle)
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
                # It stays current until the next one starts: dying before its Done is on the channel
                # still charges it an attempt (the agent reads what was sent before it charges).
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
