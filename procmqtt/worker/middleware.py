"""Middleware: code that wraps the handling of every message and every publish of an app.

A middleware is an instance of a ``Middleware`` subclass, listed on the Worker class; the first
listed is the outermost (it runs first on the way in and last on the way out)::

    class Sensors(procmqtt.Worker):
        middleware = (SlowLog(0.5), Tracing())

``[workers] middleware = ["pkg.mod:Class", ...]`` adds middleware by configuration (made with no
arguments, in each worker process): they come first, outermost, around the class's own.

The hooks, each overridden only when needed (a middleware is on a hook's chain only if its class
overrides that hook, so an app without middleware runs exactly the code it ran before):

- ``on_message(message, call_next) -> Outcome``, in sync apps; ``async on_message_async(message,
  call_next) -> Outcome`` in apps with async handlers (``call_next`` is then awaited). A middleware
  meant for both kinds of app overrides both; one that overrides only the kind the app does not
  run is refused at load (exit 2), never silently skipped.
- ``on_publish(publish, call_next) -> PublishHandle``: every ``publish``, ``reply`` and ``request``
  (``publish.request`` is True) of the worker, in both kinds of app (publishing is synchronous).
  ``publish`` is an ``Outgoing``; pass a changed copy (``dataclasses.replace``) to change what is
  sent. It is checked (topic, qos, size) after the middleware, so a change cannot send a bad packet.
- ``on_start(worker)``: once per worker process, after the app's ``on_start``, before the first
  message (``worker.log``, ``worker.worker_id`` and ``worker.config`` are set).
- ``on_stop(worker)``: once when the worker stops gracefully, after the app's ``on_stop``, the last
  listed first (flush what the middleware buffered: the process then ends with ``os._exit``, so
  ``atexit`` handlers never run).

``call_next(message)`` returns the inner layers' ``Outcome`` (a handler's None is already
``Outcome.OK``) and raises what they raised: an exception, ``procmqtt.Retry``, or
``InvalidPayload`` (a typed body that did not validate). A middleware may return another
``Outcome``, swallow an exception, or raise its own: whatever leaves the outermost middleware is
judged as a handler's result would be (an exception is logged and counted FAILED, ``Retry`` asks for
a retry). A middleware that raises in ``on_publish`` makes that publish raise in the handler.

Middleware run in the worker process, after fork (and in ``procmqtt.testing.WorkerHarness``); the
instances listed on the class are created where the app is imported, so each worker process has
its own copies and per-process state (counters, clients) belongs in ``on_start``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from procmqtt.config import Config
from procmqtt.errors import ConfigError, HandlerError
from procmqtt.message import Message, Outcome, Properties

if TYPE_CHECKING:
    from procmqtt.worker.answers import PublishHandle
    from procmqtt.worker.base import Worker

MessageNext = Callable[[Message], Outcome]
"""``call_next`` of ``Middleware.on_message``."""
AsyncMessageNext = Callable[[Message], Awaitable[Outcome]]
"""``call_next`` of ``Middleware.on_message_async``."""
PublishNext = Callable[["Outgoing"], "PublishHandle"]
"""``call_next`` of ``Middleware.on_publish``."""
_Next = TypeVar("_Next", MessageNext, AsyncMessageNext, PublishNext)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A publish on its way out, as ``Middleware.on_publish`` sees it: the payload already as bytes,
    ``properties`` the MQTT 5 properties (None on MQTT 3.1.1 or when none were given). ``request``:
    a ``Worker.request``, whose response topic the agent adds."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties | None = None
    request: bool = False


class Middleware:
    """Subclass and override the hooks you need; see the module docstring for the contract."""

    def on_start(self, worker: Worker) -> None:
        """Once per worker process, before the first message."""

    def on_stop(self, worker: Worker) -> None:
        """Once when the worker stops gracefully, after the app's ``on_stop``."""

    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        """Wrap one message's handling in a sync app: return ``call_next(message)``'s outcome (or another)."""
        return call_next(message)

    async def on_message_async(self, message: Message, call_next: AsyncMessageNext) -> Outcome:
        """``on_message`` for apps with async handlers: ``return await call_next(message)``."""
        return await call_next(message)

    def on_publish(self, publish: Outgoing, call_next: PublishNext) -> PublishHandle:
        """Wrap one publish: return ``call_next(publish)`` (or ``call_next`` of a changed copy)."""
        return call_next(publish)


def _overrides(middleware: Middleware, hook: str) -> bool:
    return getattr(type(middleware), hook) is not getattr(Middleware, hook)


def middleware_of(app: type[Any], *, is_async: bool) -> tuple[Middleware, ...]:
    """The app's ``middleware``, checked at load: Middleware instances, each with the message hook
    for the kind of app it is in. Raises ``HandlerError`` (exit 2), one line naming the entry."""
    listed = getattr(app, "middleware", ())
    where = f"{app.__qualname__}.middleware"
    if not isinstance(listed, (list, tuple)):
        raise HandlerError(f"{where}: expected a list of procmqtt.Middleware instances, got {listed!r}")
    return _checked(listed, where, app, is_async=is_async)


def configured(config: Config) -> tuple[Middleware, ...]:
    """``[workers] middleware``: each ``"pkg.mod:Class"`` imported and made with no arguments. In the
    supervisor at load (``check_configured``) and once in each worker process. Raises
    ``ConfigError`` (exit 2), one line naming the key and the entry."""
    made = []
    origin = config.origins.get("workers.middleware", config.source)  # the file, or the variable
    for spec in config.workers.middleware:
        where = f"{origin}: [workers] middleware {spec!r}"
        module_name, _, attr = spec.partition(":")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as for the app: a module next to it
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - whatever the import raised, one line
            raise ConfigError(f"{where}: cannot import it ({type(exc).__name__}: {exc})") from None
        if not (isinstance(obj, type) and issubclass(obj, Middleware)):
            raise ConfigError(f"{where}: not a procmqtt.Middleware subclass")
        try:
            made.append(obj())
        except Exception as exc:  # noqa: BLE001 - a constructor that needs arguments, or fails
            raise ConfigError(f"{where}: {attr}() raised {type(exc).__name__}: {exc}") from None
    return tuple(made)


def check_configured(app: type[Any], config: Config, *, is_async: bool) -> None:
    """At load: ``[workers] middleware`` can be imported, made, and run in ``app``'s kind (sync or
    async). ``ConfigError`` or ``HandlerError``, exit 2."""
    made = configured(config)
    if made:
        where = f"{config.origins.get('workers.middleware', config.source)}: [workers] middleware"
        try:
            _checked(made, where, app, is_async=is_async)
        except HandlerError as exc:
            raise ConfigError(str(exc)) from None


def _checked(listed: Sequence[Any], where: str, app: type[Any], *, is_async: bool) -> tuple[Middleware, ...]:
    for i, entry in enumerate(listed):
        if not isinstance(entry, Middleware):
            hint = " (a class: list an instance, e.g. Timing())" if isinstance(entry, type) else ""
            raise HandlerError(f"{where}[{i}]: expected a procmqtt.Middleware instance, got {entry!r}{hint}")
        name = type(entry).__qualname__
        if is_async and _overrides(entry, "on_message") and not _overrides(entry, "on_message_async"):
            raise HandlerError(
                f"{where}[{i}]: {name} overrides only on_message, but {app.__qualname__} has async handlers; "
                "add async def on_message_async"
            )
        if not is_async and _overrides(entry, "on_message_async") and not _overrides(entry, "on_message"):
            raise HandlerError(
                f"{where}[{i}]: {name} overrides only on_message_async, but {app.__qualname__} is a sync app; "
                "add def on_message"
            )
        for hook in ("on_message", "on_publish", "on_start", "on_stop"):
            if _overrides(entry, hook) and inspect.iscoroutinefunction(getattr(type(entry), hook)):
                raise HandlerError(
                    f"{where}[{i}]: {name}.{hook} must be a plain def (on_message_async is the async one)"
                )
    return tuple(listed)


def message_chain(middleware: Sequence[Middleware], inner: MessageNext) -> MessageNext | None:
    """``inner`` wrapped in every ``on_message`` (the first listed outermost); None when none wraps."""
    return _chain(middleware, "on_message", inner)


def async_message_chain(middleware: Sequence[Middleware], inner: AsyncMessageNext) -> AsyncMessageNext | None:
    """``message_chain`` with ``on_message_async``, for apps with async handlers."""
    return _chain(middleware, "on_message_async", inner)


def publish_chain(middleware: Sequence[Middleware], inner: PublishNext) -> PublishNext | None:
    """``inner`` wrapped in every ``on_publish``; None when none wraps (publish then skips ``Outgoing``)."""
    return _chain(middleware, "on_publish", inner)


def _chain(middleware: Sequence[Middleware], hook: str, inner: _Next) -> _Next | None:
    """One chain for any hook: each middleware that overrides ``hook`` around the next, inward."""
    wrapping = [m for m in middleware if _overrides(m, hook)]
    if not wrapping:
        return None
    chain: Callable[[Any], Any] = inner
    for m in reversed(wrapping):
        chain = _link(getattr(m, hook), chain)
    return cast("_Next", chain)


def _link(hook: Callable[[Any, Any], Any], call_next: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: hook(value, call_next)


class SlowLog(Middleware):
    """Logs a warning for each message whose handling (inner middleware included) took longer than
    ``seconds``, naming the topic and the outcome; for sync and async apps alike. The agent's
    ``procmqtt_processing_seconds`` histogram says how many were slow; this says which."""

    def __init__(self, seconds: float = 1.0) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError(f"SlowLog(seconds=...): expected a number of seconds >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.log = logging.getLogger("procmqtt.middleware.slow")

    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        began = time.perf_counter()
        outcome: Outcome | None = None
        try:
            outcome = call_next(message)
            return outcome
        finally:
            self._judge(message, began, outcome)

    async def on_message_async(self, message: Message, call_next: AsyncMessageNext) -> Outcome:
        began = time.perf_counter()
        outcome: Outcome | None = None
        try:
            outcome = await call_next(message)
            return outcome
        finally:
            self._judge(message, began, outcome)

    def _judge(self, message: Message, began: float, outcome: Outcome | None) -> None:
        took = time.perf_counter() - began
        if took > self.seconds:
            ended = "raised" if outcome is None else outcome.name
            self.log.warning("slow message on %r: %.3fs (over %gs), %s", message.topic[:200], took, self.seconds, ended)
