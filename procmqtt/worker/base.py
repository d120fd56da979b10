"""The ``Worker`` base class users subclass, and the load-time checks of an app.

A worker never talks to the broker: ``publish``, ``request`` and ``subscribe`` go through its link
to the agent (``link.py``; typed as ``answers.Link``). The class holds the user's API only: the
framework's entry point for a message is ``handling.Runner``, outside the user's namespace, and the
loop that runs the process is ``worker.loop`` with its sync and async subclasses.

``check_app`` and ``uses_asyncio`` run where the app is loaded: in the supervisor before any fork,
and in ``procmqtt.testing``. A ``Worker`` instance is created and used in the worker process only.
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import math
import os
import re
import types
import typing
from collections.abc import Awaitable, Sequence
from typing import Any, ClassVar

from procmqtt import mqtt5
from procmqtt.config import Config
from procmqtt.errors import AppError, HandlerError
from procmqtt.ipc import channel
from procmqtt.message import EMPTY, Message, Outcome, Properties
from procmqtt.topics import (
    MAX_TOPIC_BYTES,
    filter_problem,
    packet_problem,
    topic_problem,
)
from procmqtt.worker.answers import Link, PublishHandle, _ReplyWaiter
from procmqtt.worker.link import Payload, to_bytes
from procmqtt.worker.middleware import Middleware, Outgoing, PublishNext, configured, middleware_of, publish_chain
from procmqtt.worker.payloads import Body, body_of
from procmqtt.worker.routes import Router, routes_of

_ALLOWED_RETURNS: frozenset[Any] = frozenset({None, type(None), Outcome, Any, object, typing.NoReturn})
_ALLOWED_NAMES = frozenset({"None", "Outcome", "Any", "object", "NoReturn", "Never"})
_WRAPPERS = frozenset({"Optional", "Union", "Awaitable", "Coroutine"})


class Worker:
    """Subclass this and add ``@route`` methods, or implement ``on_message``.

    One instance lives in each worker process; it is created after fork, so ``__init__`` and
    ``on_start`` may open connections and files freely. ``worker_id``, ``config`` and ``log`` are
    set before ``on_start`` runs. Any of ``on_start``, ``on_message``, ``on_stop`` and the routes
    may be ``async def``: the worker then runs them on an event loop (see ``worker.aio``).

    ``middleware``: ``procmqtt.Middleware`` instances wrapping each message and each publish, the
    first listed outermost (``worker.middleware``; docs/middleware.md).
    """

    middleware: ClassVar[Sequence[Middleware]] = ()
    worker_id: int
    config: Config
    log: logging.Logger
    _link: Link | None = None
    _router: Router | None = None
    _publishing: PublishNext | None = None  # the on_publish chain; None without publish middleware
    _middleware: tuple[Middleware, ...] = ()  # [workers] middleware, then the class's: outermost first

    def on_start(self) -> Awaitable[None] | None:
        """Called once in the worker process before the first message."""

    def on_message(self, message: Message) -> Outcome | Awaitable[Outcome | None] | None:
        """Called for each message this worker is given.

        The default hands the message to the most specific matching ``@route`` method and returns
        ``Outcome.UNROUTED`` when none matches. An override receives every message (routes then
        only subscribe), and may call ``super().on_message(message)`` to dispatch. Return None (or
        an ``Outcome``, which is honoured); any other value counts as a failure (``handling``). An
        override or a route may declare a typed body parameter (docs/typed-payloads.md).
        """
        router = self._router or self._make_router()
        found = router.match(message.topic)
        if found is None:
            router.unrouted(message.topic)
            return Outcome.UNROUTED
        handler, params, body = found
        if body is not None:
            params[body.name] = body.decode(message.payload)
        result: Outcome | Awaitable[Outcome | None] | None = handler(message, **params)
        return result

    def on_stop(self) -> Awaitable[None] | None:
        """Called once when the worker stops gracefully."""

    def publish(
        self,
        topic: str,
        payload: Payload = b"",
        qos: int = 0,
        retain: bool = False,
        *,
        properties: Properties | None = None,
        **fields: Any,
    ) -> PublishHandle:
        """Publish through the agent. ``payload``: bytes, str (UTF-8) or a JSON-serialisable object.

        MQTT 5: ``properties`` (a ``Properties``) and/or its fields as keywords (``user_properties``,
        ``content_type``, ``response_topic``, ``correlation_data``, ``message_expiry``,
        ``payload_format_indicator``); keywords override ``properties``.
        """
        props = self._properties("publish", properties, fields)
        data = to_bytes(payload)
        if self._publishing is not None:
            return self._publishing(Outgoing(topic, data, qos, bool(retain), props))
        return self._send(topic, data, qos, bool(retain), props)

    def _send(self, topic: str, data: bytes, qos: int, retain: bool, props: Properties | None) -> PublishHandle:
        """The innermost step of a publish, after any middleware: check it, hand it to the agent."""
        problem = topic_problem(topic)
        if problem:
            raise ValueError(f"publish: {problem}, got {topic!r}")
        _check_qos(qos)
        _check_format("publish", props, data)
        _check_size("publish", topic, data, qos, props, v5=self.config.mqtt.protocol == "5")
        return self._require_link().publish(topic, data, qos, retain, props)

    def _send_outgoing(self, out: Outgoing) -> PublishHandle:
        """The end of the ``on_publish`` chain."""
        if not isinstance(out, Outgoing):
            raise TypeError(f"on_publish: call_next takes a procmqtt.Outgoing, got {out!r}")
        if out.request:
            return self._send_request_now(out)
        return self._send(out.topic, out.payload, out.qos, out.retain, out.properties)

    def request(
        self,
        topic: str,
        payload: Payload = b"",
        timeout: float = 10.0,
        qos: int = 1,
        *,
        properties: Properties | None = None,
        **fields: Any,
    ) -> Message:
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

    async def request_async(
        self,
        topic: str,
        payload: Payload = b"",
        timeout: float = 10.0,
        qos: int = 1,
        *,
        properties: Properties | None = None,
        **fields: Any,
    ) -> Message:
        """``request`` for async handlers: awaits the reply without blocking the event loop."""
        waiter = self._send_request(topic, payload, timeout, qos, properties, fields)
        await waiter.wait_async(timeout)
        return waiter.result(topic, timeout)

    def reply(
        self,
        message: Message,
        payload: Payload = b"",
        qos: int = 1,
        *,
        properties: Properties | None = None,
        **fields: Any,
    ) -> PublishHandle:
        """Answer a request (MQTT 5): publish to its response topic with its correlation data.

        Raises ``ValueError`` when ``message`` has no response topic (it was not a request).
        """
        asked = message.properties
        if asked is None:
            raise ValueError(
                f"reply: the message on {message.topic!r} came over MQTT 3.1.1, which has no "
                f'response topic; set [mqtt] protocol = "5"'
            )
        if asked.response_topic is None:
            raise ValueError(f"reply: the message on {message.topic!r} has no response topic (it is not a request)")
        props = (self._properties("reply", properties, fields) or EMPTY).merged(correlation_data=asked.correlation_data)
        return self.publish(asked.response_topic, payload, qos, properties=props)

    def _send_request(
        self,
        topic: str,
        payload: Payload,
        timeout: float,
        qos: int,
        properties: Properties | None,
        fields: dict[str, Any],
    ) -> _ReplyWaiter:
        if self.config.mqtt.protocol != "5":
            raise ValueError(
                f"request: request/reply needs MQTT 5 (response topic and correlation data); "
                f'set [mqtt] protocol = "5" (this app uses {self.config.mqtt.protocol})'
            )
        problem = topic_problem(topic)
        if problem:
            raise ValueError(f"request: {problem}, got {topic!r}")
        _check_qos(qos)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"request: timeout must be a number of seconds above 0, got {timeout!r}")
        props = self._properties("request", properties, fields) or EMPTY
        if props.response_topic is not None or props.correlation_data is not None:
            raise ValueError(
                "request: response_topic and correlation_data are set by request itself; use publish to send your own"
            )
        props = props.merged(correlation_data=os.urandom(16), message_expiry=props.message_expiry or math.ceil(timeout))
        data = to_bytes(payload)
        if self._publishing is None:
            return self._send_request_now(Outgoing(topic, data, qos, False, props, request=True)).reply_waiter()
        return self._publishing(Outgoing(topic, data, qos, False, props, request=True)).reply_waiter()

    def _send_request_now(self, out: Outgoing) -> PublishHandle:
        """The innermost step of a request: check it, hand it to the agent; the handle holds the waiter."""
        problem = topic_problem(out.topic)
        if problem:
            raise ValueError(f"request: {problem}, got {out.topic!r}")
        _check_qos(out.qos)
        props = out.properties or EMPTY
        if not props.correlation_data:
            raise ValueError("request: a middleware removed the request's correlation_data")
        _check_format("request", props, out.payload)
        _check_size("request", out.topic, out.payload, out.qos, props, v5=True, request=True)
        waiter = self._require_link().request(out.topic, out.payload, out.qos, props)
        handle = waiter.handle
        if handle is None:  # pragma: no cover - both links set it
            raise RuntimeError("request: the link gave no publish handle")
        handle._waiter = waiter
        return handle

    def _properties(self, what: str, properties: Properties | None, fields: dict[str, Any]) -> Properties | None:
        """The MQTT 5 properties of a publish, or None; a clear error on MQTT 3.1.1 or for a bad value."""
        if properties is None and not fields:
            return None
        if self.config.mqtt.protocol != "5":
            raise ValueError(
                f'{what}: message properties need MQTT 5; set [mqtt] protocol = "5" '
                f"(this app uses {self.config.mqtt.protocol})"
            )
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
            shown = (
                repr(topic_filter)
                if len(topic_filter) <= 100
                else f"{topic_filter[:100]!r}... ({len(topic_filter)} characters)"
            )
            raise ValueError(f"{what}: {problem}, got {shown}")

    def _attach(self, worker_id: int, config: Config, link: Link) -> None:
        """In the worker process (or the harness), right after ``__init__``: before ``on_start``."""
        self.worker_id = worker_id
        self.config = config
        self.log = logging.getLogger(f"procmqtt.app.{type(self).__name__}")
        self._link = link
        self._make_router()
        self._middleware = (*configured(config), *type(self).middleware)
        self._publishing = publish_chain(self._middleware, self._send_outgoing)

    def _make_router(self) -> Router:
        self._router = Router(routes_of(type(self)), self, logging.getLogger("procmqtt.worker.routes"))
        return self._router

    def _require_link(self) -> Link:
        if self._link is None:
            raise RuntimeError("this worker is not running under procmqtt")
        return self._link


def uses_asyncio(app: type[Worker]) -> bool:
    """True when any hook or route is ``async def``: the worker then runs an event loop."""
    names = ["on_start", "on_message", "on_stop", *(r.name for r in routes_of(app))]
    return any(inspect.iscoroutinefunction(getattr(app, name)) for name in names)


def check_app(app: type[Worker]) -> None:
    """Load-time checks (supervisor, harness): the routes are valid, something handles messages, and
    no handler is declared to return what procmqtt cannot honour."""
    routes = routes_of(app)
    if not routes and app.on_message is Worker.on_message:
        raise AppError(
            f"{app.__qualname__} has no @route methods and does not override on_message, so it would handle nothing"
        )
    middleware_of(app, is_async=uses_asyncio(app))
    message_body(app)
    handlers = [r.name for r in routes]
    if app.on_message is not Worker.on_message:
        handlers.insert(0, "on_message")
    for name in dict.fromkeys(handlers):
        _check_return(app, name)


def message_body(app: type[Worker]) -> Body | None:
    """The typed body an ``on_message`` override declares (``payloads``), or None."""
    if app.on_message is Worker.on_message:
        return None
    func = inspect.getattr_static(app, "on_message")
    func = getattr(func, "__func__", func)
    return body_of(func, (), f"{getattr(func, '__qualname__', 'on_message')}") if callable(func) else None


def _check_return(app: type[Worker], name: str) -> None:
    """Refuse a return annotation that is neither None nor ``Outcome`` (nor ``Optional[Outcome]``):
    the value would otherwise be counted as a failure at run time. ``Any`` and ``object`` pass (they
    promise nothing); what they return is checked when it is returned."""
    func = inspect.getattr_static(app, name)
    func = getattr(func, "__func__", func)
    written = getattr(func, "__annotations__", {}).get("return", inspect.Parameter.empty)
    try:
        annotation = inspect.get_annotations(func, eval_str=True).get("return", inspect.Parameter.empty)
    except Exception:  # noqa: BLE001 - a name only imported for type checking: judge the text
        annotation = written
    if annotation is inspect.Parameter.empty or _allowed(annotation):
        return
    shown = written if isinstance(written, str) else inspect.formatannotation(annotation)
    raise HandlerError(
        f"{getattr(func, '__qualname__', name)}: declared to return {shown}; a handler returns "
        "None or a procmqtt.Outcome (any other value would count as a failure)"
    )


def _allowed(annotation: Any) -> bool:
    """None, ``Outcome``, ``Any``, ``object``, ``NoReturn``, unions of these, and ``Awaitable`` or
    ``Coroutine`` of them (the base class's own signature)."""
    if isinstance(annotation, str):  # not evaluable here: judge the names in the text
        names = [t.strip().rsplit(".", 1)[-1] for t in re.split(r"[][,|]", annotation) if t.strip()]
        return all(n in _ALLOWED_NAMES or n in _WRAPPERS for n in names)
    try:
        if annotation in _ALLOWED_RETURNS or annotation is getattr(typing, "Never", None):
            return True
    except TypeError:  # unhashable: not one of them
        return False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return all(_allowed(arg) for arg in args)
    if origin in (collections.abc.Awaitable, collections.abc.Coroutine) and args:
        return _allowed(args[-1])
    return False


def _check_format(what: str, properties: Properties | None, payload: bytes) -> None:
    """MQTT 5 calls a payload declared UTF-8 that is not malformed: brokers and subscribers may refuse it
    (reason code 0x99), so the worker that made the mistake hears of it instead."""
    if properties is not None and properties.payload_format_indicator == 1:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{what}: payload_format_indicator=1 declares a UTF-8 payload, but the payload is not valid UTF-8"
            ) from None


def _check_size(
    what: str, topic: str, payload: bytes, qos: int, properties: Properties | None, *, v5: bool, request: bool = False
) -> None:
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
