"""A broker that sends what Mosquitto never does (tests/hostile_broker.py): the agent counts, logs
once, acknowledges and goes on, or drops the connection and reconnects; it never crashes, since a
crash would repeat at every resend."""

from __future__ import annotations

import re

import pytest
from harness import Procmqtt, records, wait_until, write_config
from hostile_broker import PUBACK, PUBCOMP, Connection, HostileBroker, packet, publish

BAD_TOPIC_WARNING = r"WARNING a message whose topic is not valid UTF-8"


def _run(tmp_path, runs, port: int, v5: bool) -> tuple[Procmqtt, object]:
    rec = tmp_path / "records"
    rec.mkdir()
    cfg = write_config(
        tmp_path / "procmqtt.toml",
        None,
        topics={"t/#": 1},
        app={"record_dir": str(rec)},  # type: ignore[arg-type]
        mqtt='protocol = "5"' if v5 else "",
        port=port,
    )
    run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg)
    runs.append(run)
    return run, rec


def _topics(rec) -> list[str]:
    return [r["topic"] for r in records(rec)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "v5, qos, properties",
    [
        (False, 0, b""),
        (False, 1, b""),  # procmqtt's decoder stops at the topic; paho reads the packet
        (False, 2, b""),  # QoS 2: paho's, on PUBREL
        (True, 1, b""),  # MQTT 5 without properties: procmqtt's decoder
        (True, 1, b"\x03\x00\x04text"),  # with a content type: paho's
    ],
    ids=["3.1.1-qos0", "3.1.1-qos1", "3.1.1-qos2", "5-qos1", "5-qos1-properties"],
)
def test_a_topic_that_is_not_utf8_is_acknowledged_and_dropped(tmp_path, runs, v5, qos, properties):
    def after_subscribe(conn: Connection) -> None:
        conn.send(publish(b"t/\xff\xfe", b"bad", qos, 10, v5, properties))
        conn.send(publish(b"t/\xc3", b"bad too", qos, 11, v5, properties))
        conn.send(publish(b"t/ok", b"good", qos, 12, v5, properties))

    broker = HostileBroker(v5=v5, after_subscribe=after_subscribe)
    try:
        run, rec = _run(tmp_path, runs, broker.port, v5)
        wait_until(lambda: "t/ok" in _topics(rec), 15, "the valid message handled")
        if qos:
            ack = {1: PUBACK, 2: PUBCOMP}[qos]
            wait_until(lambda: {10, 11, 12} <= set(broker.acks(ack)), 10, "all three acknowledged")
        assert _topics(rec) == ["t/ok"]
        assert run.stop() == 0
        log = run.log()
        assert len(re.findall(BAD_TOPIC_WARNING, log)) == 1, log
        assert "2 bad topic(s) ignored" in log, log
        assert broker.connections == 1, log
    finally:
        broker.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5"])
def test_a_second_connack_drops_the_connection_and_the_agent_reconnects(tmp_path, runs, v5):
    """paho hands a second CONNACK to on_connect; the agent raised IllegalTransition and crashed."""

    def after_subscribe(conn: Connection) -> None:
        if conn.index == 0:
            conn.send(packet(0x20, b"\x00\x00\x00" if v5 else b"\x00\x00"))
        else:
            conn.send(publish(b"t/ok", b"good", 1, 12, v5))

    broker = HostileBroker(v5=v5, after_subscribe=after_subscribe)
    try:
        run, rec = _run(tmp_path, runs, broker.port, v5)
        wait_until(lambda: "t/ok" in _topics(rec), 15, "the message on the second connection handled")
        wait_until(lambda: 12 in broker.acks(PUBACK), 10, "its PUBACK")
        assert broker.connections == 2
        log = run.log()
        assert "protocol error: a second CONNACK on a live connection; dropping the connection" in log, log
        assert len(run.pids("agent")) == 1 and log.count("started agent") == 1, log
        assert run.stop() == 0
    finally:
        broker.close()
