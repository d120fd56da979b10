"""The app of the tracing integration test: spans exported from each worker process as JSON lines."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from apps import Recording
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from procmqtt import Message, Worker
from procmqtt.otel import Tracing


class JsonLines(SpanExporter):
    """Appends one JSON line per span to a file (O_APPEND, one write per batch)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_json(span)) + "\n" for span in spans]
        os.write(self.fd, "".join(lines).encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        os.close(self.fd)


def span_json(span: ReadableSpan) -> dict[str, object]:
    context = span.get_span_context()
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace": f"{context.trace_id:032x}" if context else None,
        "span": f"{context.span_id:016x}" if context else None,
        "parent": f"{span.parent.span_id:016x}" if span.parent else None,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


def json_lines(worker: Worker) -> TracerProvider:
    """Tracing's setup, in each worker after fork: a batch processor whose delay is far longer
    than the test, so the spans reach the file only when the worker's stop flushes them."""
    provider = TracerProvider()
    path = os.path.join(worker.config.app["spans"], f"{os.getpid()}.jsonl")
    provider.add_span_processor(BatchSpanProcessor(JsonLines(path), schedule_delay_millis=600_000))
    return provider


class Traced(Recording):
    """'otel/start' publishes 'otel/next' (through the broker to a worker of the same app)."""

    middleware = (Tracing(setup=json_lines),)

    def on_message(self, message: Message) -> None:
        if message.topic == "otel/start" and not self.publish("otel/next", b"next", qos=1).wait(10):
            raise RuntimeError("the publish was not confirmed")
        self.record("done", message)
