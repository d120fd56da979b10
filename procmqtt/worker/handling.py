"""Handling one message: the framework's logic, kept off the ``Worker`` class so that no user
method can replace it (a user's ``handle`` is just a method).

``Runner`` is the one code path for a message in production (``worker.sync``, ``worker.aio``) and in
``procmqtt.testing``; it runs in the worker process, after fork (or in the test's process).

What a handler returns decides the outcome: None is OK; an ``Outcome`` is honoured (``FAILED``
goes through ``on_error`` like an exception, ``UNROUTED`` is acknowledged and counted apart);
anything else is a mistake, counted as FAILED and logged once per worker process, never
acknowledged silently as OK. A return annotation that promises such a value is refused at load
(``base.check_app``). ``procmqtt.Retry`` raised is a request, not an error: it is returned as is
(not logged, not re-raised in tests), and its delay goes to the agent with ``Outcome.RETRY``;
returning ``Outcome.RETRY`` is ``raise Retry()``.

The app's middleware (``worker.middleware``) wrap the call to ``on_message``: the chain is built once
per worker, and an app without message middleware takes the same path as before there were any.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from procmqtt.message import InvalidPayload, Message, Outcome, Retry
from procmqtt.worker.base import Worker
from procmqtt.worker.middleware import async_message_chain, message_chain
from procmqtt.worker.payloads import message_body


class Runner:
    """Runs ``worker.on_message`` for one message and turns how it ended into an ``Outcome``.

    ``raise_errors`` (``procmqtt.testing``): a handler's exception propagates instead of being
    logged and counted as FAILED.
    """

    def __init__(self, worker: Worker, *, raise_errors: bool = False) -> None:
        self.worker = worker
        self.raise_errors = raise_errors
        self._told = False  # a return value that is neither None nor an Outcome was logged
        self._call: Callable[[Message], Any] = worker.on_message
        body = message_body(type(worker))
        if body is not None:  # on_message declares a typed body: decode it first
            on_message, name, decode = worker.on_message, body.name, body.decode
            self._call = lambda message: on_message(message, **{name: decode(message.payload)})
        dead_letters = worker.config.workers.dead_letter_topic
        self._rejected = f"dead-lettered to {dead_letters!r}" if dead_letters else "dropped (no dead_letter_topic)"
        middleware = worker._middleware  # [workers] middleware, then the class's (checked at load)
        self._chain = message_chain(middleware, self._inner)
        self._async_chain = async_message_chain(middleware, self._inner_async)
        self._middleware = middleware
        for m in middleware:
            m.on_start(worker)

    def stop(self) -> None:
        """After the app's ``on_stop``: each middleware's ``on_stop``, the last listed first."""
        for m in reversed(self._middleware):
            m.on_stop(self.worker)

    def handle(self, message: Message) -> Outcome | Retry:
        """A sync app's message: run ``on_message``, log (never raise) its exception."""
        chain = self._chain
        try:
            result = self._call(message) if chain is None else chain(message)
        except Retry as retry:
            return retry
        except InvalidPayload as invalid:
            return self._invalid(message, invalid)
        except Exception:
            if self.raise_errors:
                raise
            return self._failed(message)
        if result is None:  # the common case, without the two calls below
            return Outcome.OK
        if inspect.iscoroutine(result):
            return self._coroutine(message, result)
        return self._outcome(message, result)

    async def handle_async(self, message: Message) -> Outcome | Retry:
        """``handle`` for apps with async handlers, on the worker's event loop; sync handlers run inline."""
        chain = self._async_chain
        try:
            if chain is None:
                result = self._call(message)
                if inspect.iscoroutine(result):
                    result = await result
            else:
                result = await chain(message)
        except Retry as retry:
            return retry
        except InvalidPayload as invalid:
            return self._invalid(message, invalid)
        except Exception:
            if self.raise_errors:
                raise
            return self._failed(message)
        return self._outcome(message, result)

    def _inner(self, message: Message) -> Outcome:
        """The innermost layer under middleware: the handler, its result made an ``Outcome``;
        exceptions pass out to the middleware."""
        result = self._call(message)
        if inspect.iscoroutine(result):
            return self._coroutine(message, result)
        return self._outcome(message, result)

    async def _inner_async(self, message: Message) -> Outcome:
        result = self._call(message)
        if inspect.iscoroutine(result):
            result = await result
        return self._outcome(message, result)

    def _coroutine(self, message: Message, result: Any) -> Outcome:
        """An async handler reached from a sync app: a bug, say so."""
        result.close()
        self.worker.log.error(
            "on_message for topic %r returned a coroutine, but this worker runs no "
            "event loop; declare the handler with async def on the class",
            message.topic,
        )
        return Outcome.FAILED

    def _outcome(self, message: Message, result: object) -> Outcome:
        if result is None:
            return Outcome.OK
        if isinstance(result, Outcome):
            return result
        if not self._told:
            self._told = True
            self.worker.log.error(
                "on_message for topic %r returned %.100r, which is neither None nor a procmqtt.Outcome; "
                "counted as FAILED (logged once per worker process)",
                message.topic,
                result,
            )
        return Outcome.FAILED

    def _invalid(self, message: Message, invalid: InvalidPayload) -> Outcome:
        """A body that does not validate: one line naming the field; the agent gives it up at once.
        Not an error of the app, so the harness returns it rather than raising."""
        self.worker.log.warning(
            "invalid body on topic %r: %s; %s, not retried", message.topic[:200], invalid, self._rejected
        )
        return Outcome.INVALID

    def _failed(self, message: Message) -> Outcome:
        """Called in an except block: log the handler's exception with its traceback."""
        self.worker.log.exception("on_message failed for topic %r", message.topic)
        return Outcome.FAILED
