"""Apps with routes and async handlers, run by the integration tests (and loaded by the CLI tests)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from apps import Recording

from procmqtt import InvalidPayload, Message, Middleware, Outcome, Worker, route
from procmqtt.worker.middleware import MessageNext


class Routed(Recording):
    """Two routes, one with a parameter; everything else the config subscribes to is unrouted."""

    @route("sensors/{device}/temperature", qos=1)
    def temperature(self, message: Message, device: str) -> None:
        self.record("done", message, route="temperature", device=device)

    @route("logs/#")
    def logs(self, message: Message) -> None:
        self.record("done", message, route="logs")


class AsyncSleeper(Recording):
    """Each message awaits ``delay`` seconds; with [workers] concurrency they overlap."""

    @route("work/#", qos=1)
    async def work(self, message: Message) -> None:
        self.record("received", message)
        await asyncio.sleep(self.delay)
        self.record("done", message)


class AsyncOrdered(Recording):
    """``ord/#``: awaits a random time up to ``max_delay``, so with concurrency the handlings overlap."""

    @route("ord/#", qos=1)
    async def ordered(self, message: Message) -> None:
        self.record("received", message)
        await asyncio.sleep(random.uniform(0, float(self.config.app.get("max_delay", 0))))
        self.record("done", message)


class AsyncEcho(Recording):
    """Async on_message: republishes on echoed/... and records whether the broker confirmed it."""

    async def on_start(self) -> None:
        super().on_start()
        await asyncio.sleep(0)

    async def on_message(self, message: Message) -> None:
        confirmed = await self.publish("echoed/" + message.topic.split("/", 1)[1], message.payload, qos=1)
        self.record("done", message, confirmed=confirmed)


@dataclass(frozen=True)
class Reading:
    celsius: float
    seq: int


class Outcomes(Middleware):
    """Records, in the worker process, how each message left the handler."""

    def on_start(self, worker: Worker) -> None:
        assert isinstance(worker, Recording)
        self.worker = worker

    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        try:
            outcome = call_next(message)
        except InvalidPayload as exc:
            self.worker.record("middleware", message, ended="invalid", field=exc.field)
            raise
        self.worker.record("middleware", message, ended=outcome.name)
        return outcome


class Typed(Recording):
    """``typed/{device}``: a JSON ``Reading`` body, decoded before the handler runs (the test adds
    ``Outcomes`` by ``[workers] middleware``)."""

    @route("typed/{device}", qos=1)
    def reading(self, message: Message, device: str, reading: Reading) -> None:
        self.record("done", message, device=device, celsius=reading.celsius, seq=reading.seq)


class BadFilter(Worker):
    @route("a/#/b")
    def handler(self, message: Message) -> None:  # pragma: no cover - never loaded
        pass


class BadParam(Worker):
    @route("sensors/{device}/temperature")
    def handler(self, message: Message) -> None:  # pragma: no cover - never loaded
        pass
