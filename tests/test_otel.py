"""procmqtt.otel.Tracing: spans through WorkerHarness, trace context in MQTT 5 user properties, the
one-line errors, and a round trip across worker processes on a real Mosquitto (MQTT 5).

Skipped without the otel extra (``pip install -e '.[otel]'``), except the test of that error line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from harness import Mosquitto, Procmqtt, records, wait_until, write_config
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from procmqtt import InvalidPayload, Message, Outcome, Properties, Retry, Worker, route
from procmqtt.otel import Tracing, TracingError
from procmqtt.testing import WorkerHarness

try:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError:  # the extra is not installed: only test_without_the_extra runs
    HAVE_OTEL = False
else:
    HAVE_OTEL = True

needs_otel = pytest.mark.skipif(not HAVE_OTEL, reason="the otel extra is not installed (pip install -e '.[otel]')")
ROOT = Path(__file__).resolve().parent.parent
V5 = {"mqtt": {"protocol": "5"}}
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"

EXPORTER: list[InMemorySpanExporter] = []  # the current test's, read by the apps' setup
if HAVE_OTEL:  # the global provider, as an app would set it: the handlers' own spans go there
    GLOBAL = InMemorySpanExporter()
    trace.set_tracer_provider(TracerProvider())
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(GLOBAL))


def in_memory(worker: Worker) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER[-1]))
    return provider


@pytest.fixture
def spans() -> InMemorySpanExporter:
    EXPORTER.append(InMemorySpanExporter())
    return EXPORTER[-1]


if HAVE_OTEL:

    class Sensors(Worker):
        middleware = (Tracing(setup=in_memory),)

        @route("sensors/{device}/temperature")
        def temperature(self, message: Message, device: str) -> Outcome | None:
            if message.payload == b"boom":
                raise ValueError("sensor on fire")
            if message.payload == b"retry":
                raise Retry(after=1)
            if message.payload == b"invalid":
                raise InvalidPayload("celsius", "not a number")
            if message.payload == b"failed":
                return Outcome.FAILED
            v5 = {"user_properties": [("tenant", "acme")]} if self.config.mqtt.protocol == "5" else {}
            self.publish(f"alerts/{device}", message.payload, qos=1, **v5)
            return None

        @route("service/{name}")
        def service(self, message: Message, name: str) -> None:
            self.reply(message, b"answer")
            self.request("other/service", b"question", timeout=1)

    class AsyncSensors(Worker):
        middleware = (Tracing(setup=in_memory),)

        async def on_message(self, message: Message) -> None:
            with trace.get_tracer("app").start_as_current_span("app work"):
                if message.payload == b"boom":
                    raise ValueError("async boom")


def by_name(exporter: InMemorySpanExporter) -> dict[str, object]:
    return {span.name: span for span in exporter.get_finished_spans()}


pytestmark = pytest.mark.timeout(30)


@needs_otel
@pytest.mark.unit
def test_a_message_gets_a_consumer_span_under_its_traceparent(spans):
    with WorkerHarness(Sensors, {"mqtt": {"protocol": "5", "client_id": "sensors-1"}}, worker_id=3) as h:
        props = Properties(user_properties=(("traceparent", TRACEPARENT), ("tracestate", "vendor=x")))
        assert h.deliver("sensors/d1/temperature", b"21.5", qos=1, redelivered=True, properties=props) is Outcome.OK
    found = by_name(spans)
    consumer, producer = found["process sensors/{device}/temperature"], found["publish"]
    assert consumer.kind is trace.SpanKind.CONSUMER
    assert f"{consumer.context.trace_id:032x}" == TRACE and f"{consumer.parent.span_id:016x}" == PARENT
    assert consumer.parent.is_remote and consumer.context.trace_state.get("vendor") == "x"
    assert dict(consumer.attributes) == {
        "messaging.system": "mqtt",
        "messaging.client.id": "sensors-1",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "sensors/d1/temperature",
        "messaging.destination.template": "sensors/{device}/temperature",
        "messaging.message.body.size": 4,
        "procmqtt.message.qos": 1,
        "procmqtt.message.redelivered": True,
        "procmqtt.worker.id": 3,
        "procmqtt.outcome": "OK",
    }
    assert consumer.status.status_code is trace.StatusCode.UNSET
    # the publish in the handler: a producer span, child of the consumer span, its context sent on
    assert producer.kind is trace.SpanKind.PRODUCER and producer.parent.span_id == consumer.context.span_id
    assert producer.attributes["messaging.operation.type"] == "send"
    assert producer.attributes["messaging.destination.name"] == "alerts/d1"
    sent = h.published_messages[0].properties
    assert sent.user_property("tenant") == "acme"  # the app's own properties kept
    assert sent.user_property("traceparent") == f"00-{TRACE}-{producer.context.span_id:016x}-01"
    assert sent.user_property("tracestate") == "vendor=x"


@needs_otel
@pytest.mark.unit
def test_failures_set_the_error_status_and_the_outcome(spans):
    with WorkerHarness(Sensors, V5, raise_exceptions=False) as h:
        for payload in (b"boom", b"retry", b"invalid", b"failed"):
            h.deliver("sensors/d1/temperature", payload)
    boom, retry, invalid, failed = spans.get_finished_spans()
    assert boom.status.status_code is trace.StatusCode.ERROR and "sensor on fire" in boom.status.description
    assert boom.attributes["error.type"] == "ValueError" and boom.attributes["procmqtt.outcome"] == "FAILED"
    assert [e.name for e in boom.events] == ["exception"]
    assert retry.status.status_code is trace.StatusCode.UNSET and retry.attributes["procmqtt.outcome"] == "RETRY"
    assert invalid.status.status_code is trace.StatusCode.ERROR and invalid.attributes["procmqtt.outcome"] == "INVALID"
    assert failed.status.status_code is trace.StatusCode.ERROR and failed.attributes["error.type"] == "FAILED"
    assert "error.type" not in retry.attributes


@needs_otel
@pytest.mark.unit
def test_reply_and_request_are_named_and_carry_the_context(spans):
    with WorkerHarness(Sensors, V5) as h:
        h.respond("other/#", b"ok")
        props = Properties(response_topic="back/here", correlation_data=b"id")
        assert h.deliver("service/x", properties=props) is Outcome.OK
    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["reply", "request", "process service/{name}"]
    reply, request = h.published_messages
    assert reply.topic == "back/here" and reply.properties.correlation_data == b"id"
    assert reply.properties.user_property("traceparent") and request.properties.user_property("traceparent")


@needs_otel
@pytest.mark.unit
def test_mqtt_311_has_spans_but_no_propagation(spans):
    with WorkerHarness(Sensors) as h:
        assert h.deliver("sensors/d1/temperature", b"20") is Outcome.OK
    assert h.published_messages[0].properties is None  # nothing to carry the context in
    assert sorted(s.name for s in spans.get_finished_spans()) == ["process sensors/{device}/temperature", "publish"]


@needs_otel
@pytest.mark.unit
def test_async_apps_get_spans_and_the_apps_own_spans_are_children(spans):
    with WorkerHarness(AsyncSensors, V5, raise_exceptions=False) as h:
        assert h.deliver("any/topic", b"x") is Outcome.OK
        assert h.deliver("any/topic", b"boom") is Outcome.FAILED
    process = spans.get_finished_spans()
    assert [s.name for s in process] == ["process", "process"]  # no route or subscription names it
    assert process[1].attributes["error.type"] == "ValueError"
    own = [s for s in GLOBAL.get_finished_spans() if s.name == "app work"]
    assert [s.parent.span_id for s in own] == [s.context.span_id for s in process]  # the handler's spans nest


@needs_otel
@pytest.mark.unit
def test_the_worker_stop_exports_what_a_batch_processor_holds(spans):
    """The process ends with os._exit, past atexit: a batch processor's spans leave in on_stop."""

    def batched(worker: Worker) -> TracerProvider:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(spans, schedule_delay_millis=600_000))
        return provider

    class Batched(Worker):
        middleware = (Tracing(setup=batched),)

        def on_message(self, message: Message) -> None:
            pass

    with WorkerHarness(Batched) as h:
        h.deliver("a/b", b"1")
        assert spans.get_finished_spans() == ()  # still in the batch
    assert [s.name for s in spans.get_finished_spans()] == ["process"]


@needs_otel
@pytest.mark.unit
def test_exporters_come_from_otel_traces_exporter(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert [ep.load().__name__ for ep in Tracing().exporters] == ["ConsoleSpanExporter"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert Tracing().exporters == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "nope")
    with pytest.raises(TracingError, match=r"OTEL_TRACES_EXPORTER: no span exporter 'nope' is installed; expected"):
        Tracing()
    with pytest.raises(TracingError, match=r"Tracing\(setup=...\): expected a function"):
        Tracing(setup="json")  # type: ignore[arg-type]


@needs_otel
@pytest.mark.unit
def test_without_setup_the_sdk_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")  # read where the app is imported

    class App(Worker):
        middleware = (Tracing(),)

        def on_message(self, message: Message) -> None:
            pass

    for service, expected in ((None, "procmqtt"), ("sensors", "sensors")):
        if service:
            monkeypatch.setenv("OTEL_SERVICE_NAME", service)
        with WorkerHarness(App) as h:
            assert h.runner._middleware[0].provider.resource.attributes["service.name"] == expected


@needs_otel
@pytest.mark.unit
def test_tracing_named_in_the_configuration_wraps_the_app(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")

    class Plain(Worker):
        @route("sensors/{device}/temperature")
        def temperature(self, message: Message, device: str) -> None:
            with trace.get_tracer("app").start_as_current_span("app work"):
                pass

    config = {"workers": {"middleware": ["procmqtt.otel:Tracing"]}}
    with WorkerHarness(Plain, config) as h:
        assert h.deliver("sensors/d1/temperature", b"1") is Outcome.OK
        (tracing,) = h.runner._middleware
    assert isinstance(tracing, Tracing) and tracing.tracer is not None
    work = [s for s in GLOBAL.get_finished_spans() if s.name == "app work"][-1]
    assert work.parent is not None  # under the consumer span, which went to the (no) exporter


@pytest.mark.unit
def test_without_the_extra_tracing_fails_in_one_line(monkeypatch):
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import opentelemetry raises ImportError
    with pytest.raises(TracingError) as failed:
        Tracing()
    assert "\n" not in str(failed.value)
    assert "procmqtt.otel.Tracing needs the otel extra" in str(failed.value)
    assert "pip install 'procmqtt[otel]'" in str(failed.value)
    assert failed.value.exit_code == 2


@needs_otel
def test_an_unknown_exporter_stops_procmqtt_before_any_fork_in_one_line(tmp_path):
    env = {"OTEL_TRACES_EXPORTER": "nope", "PYTHONPATH": str(ROOT / "tests")}
    (tmp_path / "app.py").write_text(
        "from procmqtt import Worker\nfrom procmqtt.otel import Tracing\n\n"
        "class App(Worker):\n    middleware = (Tracing(),)\n\n"
        "    def on_message(self, message):\n        pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "procmqtt", "check", str(tmp_path / "app.py") + ":App"],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, **env},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "no span exporter 'nope'" in done.stderr


@needs_otel
@pytest.mark.timeout(60)
def test_a_publish_and_its_handling_in_other_processes_share_the_trace(tmp_path: Path, broker: Mosquitto, runs):
    """External publisher -> worker handles otel/start and publishes otel/next (producer span) ->
    broker -> a worker handles otel/next: its consumer span's parent is that producer span."""
    spans_dir, record_dir = tmp_path / "spans", tmp_path / "records"
    spans_dir.mkdir()
    record_dir.mkdir()
    cfg = write_config(
        tmp_path / "procmqtt.toml",
        broker,
        topics={"otel/#": 1},
        workers=2,
        app={"record_dir": str(record_dir), "spans": str(spans_dir)},
        mqtt='protocol = "5"',
    )
    run = Procmqtt(tmp_path, "tests/apps_otel.py:Traced", cfg)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=2)
    run_pids = set(run.pids("worker").values())
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-otel-{os.getpid()}", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    props = PahoProperties(PacketTypes.PUBLISH)
    props.UserProperty = [("traceparent", TRACEPARENT)]
    info = client.publish("otel/start", b"go", 1, properties=props)
    info.wait_for_publish(10)
    client.loop_stop()
    client.disconnect()
    wait_until(lambda: len(records(record_dir)) >= 2, 15, "both messages handled")
    assert run.stop() == 0  # the stop flushes each worker's batch processor (delay: 10 minutes)
    found = [json.loads(line) for path in spans_dir.glob("*.jsonl") for line in path.read_text().splitlines()]
    named = {(s["kind"], s["attributes"]["messaging.destination.name"]): s for s in found}
    assert len(named) == len(found) == 3, found
    start, publish, handle = (
        named["CONSUMER", "otel/start"],
        named["PRODUCER", "otel/next"],
        named["CONSUMER", "otel/next"],
    )
    assert start["trace"] == publish["trace"] == handle["trace"] == TRACE  # the external publisher's trace
    assert start["parent"] == PARENT and publish["parent"] == start["span"]
    assert handle["parent"] == publish["span"]  # across the agent and the broker
    assert handle["name"] == "process otel/#" and handle["attributes"]["procmqtt.outcome"] == "OK"
    assert {start["pid"], handle["pid"]} <= run_pids  # exported by the worker processes themselves
