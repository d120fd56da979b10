"""Tracing with OpenTelemetry (the ``otel`` extra): ``Tracing``, a middleware.

One consumer span per handled message and one producer span per publish, request and reply, with
the messaging semantic conventions; the W3C trace context (``traceparent``, ``tracestate``) rides
in MQTT 5 user properties both ways (MQTT 3.1.1 has none: no propagation there).

The SDK is set up in each worker process, after fork, in ``Tracing.on_start``: a span processor's
export thread does not survive a fork, and the process ends with ``os._exit``, so ``on_stop``
shuts the provider down (flushing what is buffered). ``opentelemetry`` is imported only when a
``Tracing`` is created, so ``import procmqtt`` works without the extra; without it, ``Tracing()``
fails in one line. docs/tracing.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from procmqtt.errors import AppError, ExitCode
from procmqtt.message import EMPTY, InvalidPayload, Message, Outcome, Retry
from procmqtt.topics import topic_matches
from procmqtt.worker.middleware import AsyncMessageNext, MessageNext, Middleware, Outgoing, PublishNext
from procmqtt.worker.routes import routes_of

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from procmqtt.worker.answers import PublishHandle
    from procmqtt.worker.base import Worker

Setup = Callable[["Worker"], "TracerProvider | None"]
"""``Tracing(setup=...)``: called in each worker process after fork; returns the provider to use
(None: the global one, which ``setup`` may have set)."""

INSTALL = "pip install 'procmqtt[otel]'"
EXPORTERS = "opentelemetry_traces_exporter"  # the SDK's entry point group for OTEL_TRACES_EXPORTER
_PROPAGATED = ("traceparent", "tracestate")


class TracingError(AppError):
    """Tracing asked for but not possible (no ``otel`` extra, an unknown exporter): exit 2, one line."""

    exit_code = ExitCode.USAGE


class Tracing(Middleware):
    """Spans for every message and publish of the app it is listed on (``middleware = (Tracing(),)``).

    ``setup``: a function of the worker, called in each worker process after fork, that returns the
    ``TracerProvider`` to use (or sets the global one and returns None). Without it the provider is
    built from the ``OTEL_*`` environment: ``OTEL_TRACES_EXPORTER`` (default ``otlp``; ``console``,
    ``none``, or any installed exporter's name), a batch span processor per exporter, and the resource
    from ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``. Exporters are looked up here, where
    the app is imported, so an unknown name stops procmqtt before any fork; they are imported and
    created in each worker.
    """

    def __init__(self, setup: Setup | None = None) -> None:
        _require()
        if setup is not None and not callable(setup):
            raise TracingError(f"Tracing(setup=...): expected a function of the worker, got {setup!r}")
        self.setup = setup
        self.exporters = _exporters() if setup is None else []
        self.provider: TracerProvider | None = None
        self.tracer: Tracer | None = None
        self.owned = False  # the provider is ours to shut down at stop
        self.attributes: dict[str, Any] = {}
        self.templates: tuple[tuple[str, str], ...] = ()  # (filter, name shown): routes, then [mqtt.topics]
        self.v5 = False

    # --- the worker process's life ----------------------------------------------------------------

    def on_start(self, worker: Worker) -> None:
        """After fork: the SDK, the tracer, and what every span carries."""
        from opentelemetry import trace

        provider = self.setup(worker) if self.setup is not None else self._from_environment()
        self.owned = provider is not None
        if provider is None:
            provider = trace.get_tracer_provider()
        elif isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider)  # the app's own spans join ours
        self.provider = provider
        self.tracer = provider.get_tracer("procmqtt", _version())
        config = worker.config
        self.v5 = config.mqtt.protocol == "5"
        self.attributes = {"messaging.system": "mqtt", "procmqtt.worker.id": worker.worker_id}
        if config.mqtt.client_id:  # None: the supervisor's default, not known here
            self.attributes["messaging.client.id"] = config.mqtt.client_id
        routes = [(r.topic_filter, r.pattern) for r in routes_of(type(worker))]
        self.templates = (*routes, *((s.topic_filter, s.topic_filter) for s in config.mqtt.topics))

    def on_stop(self, worker: Worker) -> None:
        """Export what is buffered: the process ends with ``os._exit``, past any ``atexit``."""
        provider: Any = self.provider
        if provider is None:
            return
        if self.owned and hasattr(provider, "shutdown"):
            provider.shutdown()
        elif hasattr(provider, "force_flush"):
            provider.force_flush()

    def _from_environment(self) -> TracerProvider:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "procmqtt"}))
        provider = TracerProvider(resource=resource)
        for exporter in self.exporters:  # imported here, after fork (an OTLP/gRPC exporter brings grpc)
            provider.add_span_processor(BatchSpanProcessor(exporter.load()()))
        return provider

    # --- messages ---------------------------------------------------------------------------------

    def on_message(self, message: Message, call_next: MessageNext) -> Outcome:
        span, tokens = self._consume(message)
        try:
            outcome = call_next(message)
        except BaseException as exc:
            self._ended(span, None, exc)
            raise
        else:
            self._ended(span, outcome, None)
        finally:
            _leave(tokens)
        return outcome

    async def on_message_async(self, message: Message, call_next: AsyncMessageNext) -> Outcome:
        span, tokens = self._consume(message)
        try:
            outcome = await call_next(message)
        except BaseException as exc:
            self._ended(span, None, exc)
            raise
        else:
            self._ended(span, outcome, None)
        finally:
            _leave(tokens)
        return outcome

    def _consume(self, message: Message) -> tuple[Span, tuple[Any, Any]]:
        """The consumer span, made current (the handler's spans and publishes are its children)."""
        from opentelemetry import context, propagate, trace

        tracer = self._tracer()
        parent = None
        if message.properties is not None and message.properties.user_properties:
            parent = propagate.extract(message.properties.user_properties, getter=_GETTER)
        template = self._template(message.topic)
        attributes = {
            **self.attributes,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": message.topic,
            "messaging.message.body.size": len(message.payload),
            "procmqtt.message.qos": message.qos,
            "procmqtt.message.redelivered": message.redelivered,
        }
        if template is not None:
            attributes["messaging.destination.template"] = template
        span = tracer.start_span(
            f"process {template}" if template else "process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
        return span, (context.attach(trace.set_span_in_context(span)), _current.set(message))

    def _ended(self, span: Span, outcome: Outcome | None, exc: BaseException | None) -> None:
        """The outcome on the span, error status for a failure, then the span ends."""
        from opentelemetry.trace import Status, StatusCode

        error: str | None = None
        if isinstance(exc, Retry):
            outcome = Outcome.RETRY
        elif isinstance(exc, InvalidPayload):
            outcome, error = Outcome.INVALID, "InvalidPayload"
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
        elif exc is not None:
            outcome, error = Outcome.FAILED, type(exc).__qualname__
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
        elif outcome is Outcome.FAILED or outcome is Outcome.INVALID:
            error = outcome.name
            span.set_status(Status(StatusCode.ERROR, f"the handler returned Outcome.{outcome.name}"))
        if outcome is not None:
            span.set_attribute("procmqtt.outcome", outcome.name)
        if error is not None:
            span.set_attribute("error.type", error)
        span.end()

    def _template(self, topic: str) -> str | None:
        """The route pattern or subscription the topic came by: a span name of few values."""
        for topic_filter, shown in self.templates:
            if topic_matches(topic_filter, topic):
                return shown
        return None

    # --- publishes --------------------------------------------------------------------------------

    def on_publish(self, publish: Outgoing, call_next: PublishNext) -> PublishHandle:
        if self.tracer is None:  # the app's own on_start, before ours: not traced
            return call_next(publish)
        from dataclasses import replace

        from opentelemetry import propagate, trace

        operation = "request" if publish.request else "reply" if self._is_reply(publish) else "publish"
        attributes = {
            **self.attributes,
            "messaging.operation.type": "send",
            "messaging.operation.name": operation,
            "messaging.destination.name": publish.topic,
            "messaging.message.body.size": len(publish.payload),
            "procmqtt.message.qos": publish.qos,
        }
        with self.tracer.start_as_current_span(
            operation, kind=trace.SpanKind.PRODUCER, attributes=attributes, record_exception=True
        ):
            if self.v5:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                props = publish.properties or EMPTY
                kept = tuple(p for p in props.user_properties if p[0] not in carrier)
                props = replace(props, user_properties=kept + tuple(carrier.items()))
                publish = replace(publish, properties=props)
            return call_next(publish)

    def _is_reply(self, publish: Outgoing) -> bool:
        """A publish to the response topic of the message being handled, with correlation data."""
        current = _current.get()
        if current is None or publish.properties is None or publish.properties.correlation_data is None:
            return False
        asked = current.properties
        return asked is not None and asked.response_topic == publish.topic

    def _tracer(self) -> Tracer:
        if self.tracer is None:  # pragma: no cover - on_start runs before the first message
            raise RuntimeError("Tracing: on_start has not run in this process")
        return self.tracer


_current: ContextVar[Message | None] = ContextVar("procmqtt_otel_message", default=None)
"""The message being handled, for telling a reply from a publish."""


def _leave(tokens: tuple[Any, Any]) -> None:
    from opentelemetry import context

    context.detach(tokens[0])
    _current.reset(tokens[1])


class _UserProperties:
    """The propagator's getter over MQTT 5 user properties (pairs; the first value of a name wins)."""

    def get(self, carrier: Iterable[tuple[str, str]], key: str) -> list[str] | None:
        for name, value in carrier:
            if name == key:
                return [value]
        return None

    def keys(self, carrier: Iterable[tuple[str, str]]) -> list[str]:
        return [name for name, _ in carrier]


_GETTER: Any = _UserProperties()


def _require() -> None:
    """The extra is installed, or one line saying how to install it."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
        from opentelemetry import propagate, trace  # noqa: F401
    except ImportError as exc:
        raise TracingError(f"procmqtt.otel.Tracing needs the otel extra ({exc}); install it: {INSTALL}") from None


def _exporters() -> list[EntryPoint]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names, found by the SDK's entry points (not
    imported: that happens in each worker, after fork)."""
    value = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip()
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["none"]:
        return []
    found = {ep.name: ep for ep in entry_points(group=EXPORTERS)}
    out = []
    for name in names:
        if name not in found:
            known = ", ".join(sorted({*found, "none"}))
            hint = " (pip install opentelemetry-exporter-otlp)" if name.startswith("otlp") else ""
            raise TracingError(
                f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed{hint}; expected one of: {known}"
            )
        out.append(found[name])
    return out


def _version() -> str:
    from procmqtt import __version__

    return __version__
