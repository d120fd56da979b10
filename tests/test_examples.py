"""The examples: each through procmqtt.testing.WorkerHarness, and the transform end to end."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from harness import (
    ROOT,
    Procmqtt,
    Subscriber,
    publish_all,
    publisher,
    wait_until,
    write_config,
)

import procmqtt
from procmqtt import config as config_mod
from procmqtt.cli.app import load_app

EXAMPLES = ROOT / "examples"


def example(spec: str) -> type[procmqtt.Worker]:
    path, _, name = spec.partition(":")
    return load_app(f"{EXAMPLES / path}:{name}")


@pytest.fixture
def WorkerHarness() -> Any:
    from procmqtt.testing import WorkerHarness

    return WorkerHarness


@pytest.mark.unit
def test_sensors(WorkerHarness):
    with WorkerHarness(example("sensors.py:Sensors"), config={"app": {"alert_above": 30.0}}) as h:
        h.deliver("sensors/d1/temperature", b'{"celsius": 21.5}')
        h.deliver("sensors/d2/temperature", b'{"celsius": 31.5}')
        assert h.published == [("alerts/d2", b'{"device":"d2","celsius":31.5}', 1, False)]


@pytest.mark.unit
def test_sensor_routes(WorkerHarness):
    from procmqtt.worker.routes import routes_of

    app = example("sensor_routes.py:SensorRoutes")
    assert {(r.topic_filter, r.qos) for r in routes_of(app)} == {
        ("sensors/+/temperature", 1),
        ("sensors/+/humidity", 1),
        ("sensors/#", 0),
    }
    with WorkerHarness(app, config={"app": {"max_celsius": 30.0, "max_humidity": 90.0}}) as h:
        h.deliver("sensors/d1/temperature", b'{"celsius": 31.5}')
        h.deliver("sensors/d1/temperature", b'{"celsius": 20}')
        h.deliver("sensors/d7/humidity", b'{"percent": 97}')
        h.deliver("sensors/d7/humidity", b"not json")  # logged and skipped
        h.deliver("sensors/d7/pressure", b'{"hpa": 1013}')  # the catch-all route
        assert h.published == [
            ("alerts/d1/temperature", b'{"device":"d1","celsius":31.5}', 1, False),
            ("alerts/d7/humidity", b'{"device":"d7","percent":97.0}', 1, False),
        ]


def request(method_args: dict[str, Any], reply_to: Any = "replies/me", correlation_id: str = "42") -> bytes:
    return json.dumps({"reply_to": reply_to, "correlation_id": correlation_id, "args": method_args}).encode()


@pytest.mark.unit
def test_request_reply(WorkerHarness):
    with WorkerHarness(example("request_reply.py:Calculator")) as h:
        h.deliver("rpc/sum", request({"numbers": [1, 2, 3.5]}))
        h.deliver("rpc/sqrt", request({"x": -1}, correlation_id="43"))
        h.deliver("rpc/cube", request({"x": 2}, correlation_id="44"))
        h.deliver("rpc/sum", request({"numbers": [1]}, reply_to="replies/#"))  # not a topic name: no reply
        h.deliver("rpc/sum", b'{"args": {}}')  # no reply_to: no reply
        topics = [p[0] for p in h.published]
        replies = [json.loads(p[1]) for p in h.published]
        assert topics == ["replies/me"] * 3 and all(p[2:] == (1, False) for p in h.published)
        assert replies[0] == {"correlation_id": "42", "result": 6.5}
        assert replies[1] == {"correlation_id": "43", "error": "sqrt: math domain error"}
        assert replies[2]["correlation_id"] == "44" and "unknown method 'cube'" in replies[2]["error"]


@pytest.mark.unit
def test_transform(WorkerHarness):
    app = example("transform.py:Transform")
    transform = sys.modules[app.__module__].transform
    with WorkerHarness(app, config={"app": {"rounds": 100}}) as h:
        h.deliver("jobs/7", b'{"text": "hello"}')
        h.deliver("jobs/8", b'{"text": "hello", "rounds": 3}')
        assert h.published == [
            (
                "transformed/7",
                json.dumps({"id": "7", "digest": transform("hello", 100), "worker": 0}, separators=(",", ":")).encode(),
                1,
                False,
            ),
            (
                "transformed/8",
                json.dumps({"id": "8", "digest": transform("hello", 3), "worker": 0}, separators=(",", ":")).encode(),
                1,
                False,
            ),
        ]


@pytest.mark.unit
def test_async_client(WorkerHarness):
    app = example("async_client.py:Enricher")
    with WorkerHarness(app, config={"app": {"latency": 0.01}}) as h:
        h.deliver("orders/o-1", b'{"customer": "c-3", "amount": 12.5}')
        h.deliver("orders/o-2", b'{"customer": "c-0", "amount": 3}')
        tiers = {c: "gold" if zlib.crc32(c.encode()) % 4 == 0 else "standard" for c in ("c-3", "c-0")}
        assert [(t, json.loads(p), q, r) for t, p, q, r in h.published] == [
            ("enriched/o-1", {"customer": "c-3", "amount": 12.5, "order_id": "o-1", "tier": tiers["c-3"]}, 1, False),
            ("enriched/o-2", {"customer": "c-0", "amount": 3, "order_id": "o-2", "tier": tiers["c-0"]}, 1, False),
        ]


@pytest.mark.parametrize("name", ["sensors.toml", "sensor_routes.toml", "transform.toml", "async_client.toml"])
@pytest.mark.unit
def test_example_configs_load(name):
    config = config_mod.load(str(EXAMPLES / name))
    assert config.workers.count >= 1


@pytest.mark.timeout(60)
def test_transform_end_to_end(broker, runs, tmp_path: Path):
    """The real thing: Mosquitto, procmqtt run with 2 workers, 20 jobs, 20 correct results."""
    transform = sys.modules[example("transform.py:Transform").__module__].transform
    cfg = write_config(tmp_path / "transform.toml", broker, topics={"jobs/+": 1}, workers=2, app={"rounds": 2000})
    run = Procmqtt(tmp_path, "examples/transform.py:Transform", cfg)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=2)
    results = Subscriber(broker, "transformed/#")
    client = publisher(broker)
    try:
        publish_all(client, [(f"jobs/{i}", json.dumps({"text": f"job {i}"}).encode()) for i in range(20)])
        wait_until(lambda: len(results.payloads()) >= 20, 30, "20 transformed jobs")
        got = {r["id"]: r for r in map(json.loads, results.payloads())}
        assert got.keys() == {str(i) for i in range(20)}
        assert all(r["digest"] == transform(f"job {r['id']}", 2000) for r in got.values())
        assert {r["worker"] for r in got.values()} == {0, 1}  # random dispatch: both took some
        assert run.stop() == 0
    finally:
        client.loop_stop()
        results.close()
