"""The broker matrix: procmqtt against NATS's and RabbitMQ's MQTT (Mosquitto has the rest of the
suite). Each broker starts once per session (tests/conftest.py); docs/brokers.md has the table
these tests measure, cell by cell.

Per broker: QoS 0 and 1 through ``procmqtt run`` with 2 workers, a worker and then the agent
SIGKILLed with nothing lost, a reconnect after the broker restarts, and probes of what the broker
does not do (QoS 2, ``$share``, MQTT 5, retained messages). ``share_group`` on a broker without
shared subscriptions: tests/test_share_check.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from harness import publish_all, publisher, records, start, wait_until
from paho.mqtt.enums import CallbackAPIVersion

BROKERS = ["nats_broker", "rabbitmq_broker"]


def _handled(rec, prefix: str) -> Counter[str]:
    return Counter(bytes.fromhex(r["payload"]).decode() for r in records(rec) if r["topic"].startswith(prefix))


def _all(rec, prefix: str, n: int, timeout: float, what: str) -> Counter[str]:
    wait_until(lambda: len(_handled(rec, prefix)) >= n, timeout, what)
    counts = _handled(rec, prefix)
    assert set(counts) == {str(i) for i in range(n)}, counts
    return counts


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker_fixture", BROKERS)
def test_qos_0_and_1_and_kills_lose_nothing(tmp_path, runs, request, broker_fixture):
    """QoS 0 and 1 with 2 workers; a worker SIGKILLed mid-message, then the agent: every QoS 1
    message is handled (the agent's ones again: NATS after its ``ack_wait``, RabbitMQ at once)."""
    broker = request.getfixturevalue(broker_fixture)
    run, rec = start(runs, tmp_path, broker, topics={"m0/#": 0, "m1/#": 1, "wk/#": 1, "ak/#": 1}, app={"delay": 0.02})
    pub = publisher(broker)
    publish_all(pub, [(f"m0/{i % 3}", str(i).encode()) for i in range(20)], qos=0)
    publish_all(pub, [(f"m1/{i % 3}", str(i).encode()) for i in range(20)])
    assert max(_all(rec, "m1/", 20, 20, "20 QoS 1 handled").values()) == 1, "a QoS 1 message was handled twice"
    _all(rec, "m0/", 20, 5, "20 QoS 0 handled (loopback: none lost)")
    assert {r["worker"] for r in records(rec)} == {0, 1}, "both workers took messages"

    victim = run.pids("worker")[0]
    publish_all(pub, [(f"wk/{i % 3}", str(i).encode()) for i in range(30)])
    wait_until(
        lambda: any(r["pid"] == victim and r["topic"].startswith("wk/") for r in records(rec, "received")),
        10,
        "worker 0 busy",
    )
    os.kill(victim, signal.SIGKILL)
    _all(rec, "wk/", 30, 20, "30 handled across a worker kill")

    agent = run.pids("agent")[-1]
    publish_all(pub, [(f"ak/{i % 3}", str(i).encode()) for i in range(30)])
    wait_until(lambda: any(r["topic"].startswith("ak/") for r in records(rec, "received")), 10, "ak/ under way")
    os.kill(agent, signal.SIGKILL)
    killed = time.monotonic()
    _all(rec, "ak/", 30, 30, "30 handled across an agent kill")
    print(f"{broker.name}: all handled {time.monotonic() - killed:.1f}s after the agent kill")
    pub.loop_stop()
    assert run.stop() == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker_fixture", BROKERS)
def test_reconnects_after_the_broker_restarts(tmp_path, runs, request, broker_fixture):
    """NATS restarts in a blink; a RabbitMQ node takes ~7 s to stop and boot, and procmqtt's backoff
    (0.5, 1, 2, 4, 8 s) then reconnects ~8-16 s after the stop (docs/brokers.md has the measured
    figure); the RabbitMQ tests run in one xdist worker beside the rest of the suite."""
    broker = request.getfixturevalue(broker_fixture)
    run, rec = start(runs, tmp_path, broker, topics={"rs/#": 1})
    began = time.monotonic()
    broker.stop()
    run.wait_for_log(r"connection lost")
    broker.start()
    run.wait_for_log(r"\[agent\] INFO subscribed to", count=2, timeout=30)
    print(f"{broker.name}: restarted and resubscribed in {time.monotonic() - began:.1f}s")
    pub = publisher(broker)
    publish_all(pub, [(f"rs/{i}", str(i).encode()) for i in range(10)])
    _all(rec, "rs/", 10, 15, "10 handled after the restart")
    pub.loop_stop()
    assert run.stop() == 0


def _client(broker, name: str, protocol: int = mqtt.MQTTv311) -> tuple[mqtt.Client, dict]:
    seen: dict = {"messages": []}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{name}-{os.getpid()}", protocol=protocol)
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason, properties):
        seen["connack"] = reason
        connected.set()

    def on_disconnect(client, userdata, flags, reason, properties):
        seen.setdefault("closed", reason)
        connected.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.on_subscribe = lambda client, userdata, mid, reasons, properties: seen.__setitem__("suback", reasons)
    c.on_message = lambda client, userdata, msg: seen["messages"].append((msg.topic, msg.qos, msg.retain))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    assert connected.wait(5), f"no CONNACK from {broker.name}"
    return c, seen


def _subscribe(c: mqtt.Client, seen: dict, topic_filter: str, qos: int) -> list:
    seen.pop("suback", None)
    c.subscribe(topic_filter, qos)
    return wait_until(lambda: seen.get("suback"), 5, f"SUBACK for {topic_filter}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker_fixture", BROKERS)
def test_what_the_broker_does_not_do(request, broker_fixture):
    """The probes behind docs/brokers.md's "not supported" cells, so a broker upgrade that adds a
    feature fails here and the table gets updated."""
    broker = request.getfixturevalue(broker_fixture)
    sub, seen = _client(broker, "sub")
    pub, pub_seen = _client(broker, "pub")

    # QoS 2 subscriptions are granted at QoS 1 by both.
    assert [r.value for r in _subscribe(sub, seen, "pq/x", 2)] == [1]
    # $share/<group>/<filter> is granted as an ordinary filter and nothing published reaches it.
    assert not _subscribe(sub, seen, "$share/g/ps/x", 1)[0].is_failure
    # Retained messages are kept and sent to a later subscriber (flagged retained).
    pub.publish("pr/x", b"kept", 1, retain=True).wait_for_publish(5)
    pub.publish("ps/x", b"shared?", 1).wait_for_publish(5)
    assert not _subscribe(sub, seen, "pr/x", 1)[0].is_failure
    wait_until(lambda: ("pr/x", 1, True) in seen["messages"], 5, "the retained message")
    time.sleep(0.3)  # the $share message had as long as the retained one and more
    assert not [m for m in seen["messages"] if m[0] == "ps/x"], "the broker now delivers through $share"
    pub.publish("pr/x", b"", 1, retain=True).wait_for_publish(5)  # clear it: the broker outlives the test

    # A QoS 2 publish: NATS closes the connection; RabbitMQ takes it as QoS 1.
    info = pub.publish("pq/x", b"two", 2)
    if broker.name == "nats":
        wait_until(lambda: "closed" in pub_seen, 5, "NATS to close the connection on a QoS 2 publish")
        assert "publish QoS=2 not supported" in broker.log_path.read_text()
    else:
        info.wait_for_publish(5)
        wait_until(lambda: ("pq/x", 1, False) in seen["messages"], 5, "the QoS 2 publish, delivered at QoS 1")

    # MQTT 5: refused (NATS with a CONNACK "Unsupported protocol version", RabbitMQ 3.10 by closing).
    v5, v5_seen = _client(broker, "v5", mqtt.MQTTv5)
    wait_until(lambda: "closed" in v5_seen, 5, "the MQTT 5 connection refused")
    if "connack" in v5_seen:
        assert v5_seen["connack"].is_failure, v5_seen["connack"]
    for c in (sub, pub, v5):
        c.loop_stop()
        c.disconnect()
