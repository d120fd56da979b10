"""MQTT 5 against a real Mosquitto 2: properties both ways, request/reply across two procmqtt
instances, reason codes in errors, and Receive Maximum as the broker applies it."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from harness import Mosquitto, Procmqtt, records, wait_until, write_config
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

V5 = 'protocol = "5"'


def v5_client(broker: Mosquitto, name: str) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"test-{name}-{os.getpid()}-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
    )
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


class V5Subscriber:
    """A paho MQTT 5 client that keeps every message with its properties."""

    def __init__(self, broker: Mosquitto, topic_filter: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.client = v5_client(broker, "sub5")
        self.client.on_message = lambda c, u, msg: self.messages.append(msg)
        subscribed: list[bool] = []
        self.client.on_subscribe = lambda *a: subscribed.append(True)
        self.client.subscribe(topic_filter, 1)
        wait_until(lambda: subscribed, 10, f"subscribed to {topic_filter}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish_v5(client: mqtt.Client, topic: str, payload: bytes, props: PahoProperties | None = None, qos: int = 1):
    info = client.publish(topic, payload, qos, properties=props)
    info.wait_for_publish(10)
    assert info.is_published()


def run_app(
    runs: list[Procmqtt],
    directory: Path,
    broker: Mosquitto,
    app: str,
    *,
    topics: dict[str, int],
    workers: int = 2,
    settings: dict | None = None,
    mqtt_toml: str = V5,
    workers_toml: str = "",
    ready: bool = True,
) -> tuple[Procmqtt, Path]:
    """One procmqtt instance in its own directory (its own client id and records)."""
    directory.mkdir()
    rec = directory / "records"
    rec.mkdir()
    cfg = write_config(
        directory / "procmqtt.toml",
        broker,
        topics=topics,
        workers=workers,
        app={"record_dir": str(rec), **(settings or {})},
        mqtt=mqtt_toml,
        workers_toml=workers_toml,
    )
    run = Procmqtt(directory, app, cfg)
    runs.append(run)
    if ready:
        run.ready()
        run.wait_for_log(r"started worker", count=workers)
    return run, rec


@pytest.mark.timeout(60)
def test_properties_from_a_v5_publisher_reach_message_properties(tmp_path, broker, runs):
    run, rec = run_app(runs, tmp_path / "app", broker, "tests/apps_mqtt5.py:Props", topics={"props/#": 1})
    pub = v5_client(broker, "pub5")
    props = PahoProperties(PacketTypes.PUBLISH)
    props.UserProperty = [("tenant", "acme"), ("trace", "t-1"), ("tenant", "second")]
    props.ContentType = "application/json"
    props.ResponseTopic = "back/to/me"
    props.CorrelationData = b"\x00\xffid-42"
    props.MessageExpiryInterval = 3600
    props.PayloadFormatIndicator = 1
    publish_v5(pub, "props/full", b'{"a":1}', props)
    publish_v5(pub, "props/none", b"plain")
    wait_until(lambda: len(records(rec, "received")) >= 2, 15, "both messages handled")
    got = {r["topic"]: r["properties"] for r in records(rec, "received")}
    full = got["props/full"]
    assert full["user_properties"] == [["tenant", "acme"], ["trace", "t-1"], ["tenant", "second"]]  # order kept
    assert full["content_type"] == "application/json" and full["response_topic"] == "back/to/me"
    assert full["correlation_data"] == b"\x00\xffid-42".hex() and full["payload_format_indicator"] == 1
    assert 3590 <= full["message_expiry"] <= 3600  # what was left when the broker delivered it
    assert got["props/none"] == {
        "user_properties": [],
        "content_type": None,
        "response_topic": None,
        "correlation_data": None,
        "message_expiry": None,
        "payload_format_indicator": None,
    }
    pub.loop_stop()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_worker_publishes_with_properties_seen_by_a_v5_subscriber(tmp_path, broker, runs):
    run, _ = run_app(runs, tmp_path / "app", broker, "tests/apps_mqtt5.py:Props", topics={"echo5/#": 1})
    sub = V5Subscriber(broker, "echoed5/#")
    publish_v5(v5_client(broker, "pub5"), "echo5/1", '{"ü": 1}'.encode())
    wait_until(lambda: sub.messages, 15, "the echo")
    msg = sub.messages[0]
    assert msg.topic == "echoed5/1" and msg.payload == '{"ü": 1}'.encode()
    p = msg.properties
    assert p.UserProperty == [("from", "procmqtt"), ("worker", "w")]
    assert p.ContentType == "application/json" and p.ResponseTopic == "answers/here"
    assert p.CorrelationData == b"\x00\x01corr" and p.PayloadFormatIndicator == 1
    assert 590 <= p.MessageExpiryInterval <= 600
    sub.close()
    assert run.stop() == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("asker", ["Props", "AsyncAsker"])
def test_request_reply_between_two_instances_reaches_the_asking_worker(tmp_path, broker, runs, asker):
    """App A (2 workers) asks; app B (2 workers) answers with self.reply. Every reply must reach the
    worker that asked: one routed elsewhere would leave its request to time out."""
    _, served = run_app(runs, tmp_path / "responder", broker, "tests/apps_mqtt5.py:Props", topics={"service/#": 1})
    workers_toml = "concurrency = 4" if asker == "AsyncAsker" else ""
    run, rec = run_app(
        runs,
        tmp_path / "asker",
        broker,
        f"tests/apps_mqtt5.py:{asker}",
        topics={"ask/#": 1, "procmqtt/#": 0},
        settings={"service": "service/echo"},
        workers_toml=workers_toml,
    )
    pub = v5_client(broker, "pub5")
    for i in range(40):
        publish_v5(pub, f"ask/{i}", f"question {i}".encode())
    wait_until(lambda: len(records(rec, "done")) >= 40, 40, "40 requests answered")
    replies = records(rec, "reply")
    assert not records(rec, "timeout")
    assert sorted(r["reply"]["answer"] for r in replies) == sorted(f"question {i}" for i in range(40))
    for r in replies:
        assert r["reply_topic"].startswith("procmqtt/reply/") and r["reply_topic"].endswith(f"/{r['worker']}")
        assert r["properties"]["content_type"] == "application/json"
        assert r["properties"]["user_properties"] == [["answered-by", str(r["reply"]["by"])]]
    assert set(Counter(r["worker"] for r in replies)) == {0, 1}, "both asking workers made requests"
    # 'procmqtt/#' subscribes the asker to its replies a second time: they still never reach on_message
    assert not [r for r in records(rec, "received") if r["topic"].startswith("procmqtt/")]
    assert all(r["properties"]["response_topic"].startswith("procmqtt/reply/") for r in records(served, "received"))
    assert len({r["properties"]["correlation_data"] for r in records(served, "received")}) == 40
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_request_without_an_answer_raises_timeout_error(tmp_path, broker, runs):
    run, rec = run_app(
        runs,
        tmp_path / "app",
        broker,
        "tests/apps_mqtt5.py:Props",
        topics={"ask/#": 1},
        workers=1,
        settings={"service": "nobody/listens", "request_timeout": 0.5},
    )
    publish_v5(v5_client(broker, "pub5"), "ask/1", b"hello?")
    wait_until(lambda: records(rec, "timeout"), 15, "the request to time out")
    (timeout,) = records(rec, "timeout")
    assert timeout["error"] == "request to 'nobody/listens': no reply within 0.5s"
    assert 0.5 <= timeout["elapsed"] < 3
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_v5_wrong_credentials_exit_4_with_the_reason_code(tmp_path, runs):
    broker = Mosquitto(tmp_path / "auth-broker", users={"svc": "right-password"})
    broker.start()
    try:
        cfg = write_config(
            tmp_path / "auth.toml",
            broker,
            topics={"x/#": 1},
            app={"record_dir": str(tmp_path)},
            mqtt=f'{V5}\nusername = "svc"\npassword_env = "PMQ_PW"',
        )
        run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg, env={"PMQ_PW": "Sup3r-Secret-Wrong"})
        runs.append(run)
        assert run.wait(30) == 4
        log = run.log()
        # Mosquitto 2.0 answers an MQTT 5 client's wrong password with "Not authorized"
        assert re.search(
            r"refused the credentials of user 'svc': (Not authorized \(CONNACK reason code 135\)|"
            r"Bad user name or password \(CONNACK reason code 134\))",
            log,
        ), log
        assert "Sup3r-Secret-Wrong" not in log
    finally:
        broker.stop()


@pytest.mark.timeout(60)
def test_v5_reason_strings_for_refused_subscription_and_publish(tmp_path, runs):
    """A broker that refuses a filter and a topic: the log names MQTT 5's reason for each."""
    broker = Mosquitto(
        tmp_path / "deny-broker",
        deny=[
            {"acltype": "subscribePattern", "topic": "secret/#"},
            {"acltype": "publishClientSend", "topic": "echoed5/#"},
        ],
    )
    broker.start()
    try:
        run, _ = run_app(
            runs,
            tmp_path / "app",
            broker,
            "tests/apps_mqtt5.py:Props",
            topics={"echo5/#": 1, "secret/#": 1},
            ready=False,
        )
        run.wait_for_log(r"refused the subscription to secret/#: Not authorized")
        run.wait_for_log(r"subscribed to echo5/# \(qos 1\)")
        publish_v5(v5_client(broker, "pub5"), "echo5/1", b"{}")  # echoed to echoed5/1: refused
        run.wait_for_log(r"the broker refused the publish to 'echoed5/1': Not authorized \(reason code 135\)")
        assert run.stop() == 0
    finally:
        broker.stop()


def _first_burst(log: str, client_id: str) -> int:
    """From Mosquitto's debug log: messages sent to ``client_id``'s last connection before its first PUBACK."""
    sent = 0
    for line in log.splitlines():
        if "New client connected from" in line and f" as {client_id} " in line:
            sent = 0
        elif f"Sending PUBLISH to {client_id} (" in line:
            sent += 1
        elif f"Received PUBACK from {client_id} (" in line:
            return sent
    return sent


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_receive_maximum_is_workers_times_prefetch_at_the_broker(tmp_path, runs, protocol):
    """MQTT 5 sends Receive Maximum = count x prefetch (2 x 2 here). 30 messages wait in the session
    while procmqtt is stopped; on reconnect the broker's debug log shows how many it sends before our
    first acknowledgement: 4 over MQTT 5, the broker's own limit (20) over 3.1.1, so the measure tells
    the two apart.

    Only the first window is measured: Mosquitto 2.0.11 refills a whole window per acknowledgement
    afterwards (eclipse-mosquitto/mosquitto#2301); the agent's own window still bounds what reaches
    the workers."""
    broker = Mosquitto(tmp_path / "debug-broker", debug=True)
    broker.start()
    try:
        settings = {"delay": 0.02}
        run, rec = run_app(
            runs,
            tmp_path / "app",
            broker,
            "tests/apps.py:Recorder",
            topics={"slow/#": 1},
            settings=settings,
            mqtt_toml=f'protocol = "{protocol}"',
            workers_toml="prefetch = 2",
        )
        assert run.stop() == 0
        pub = v5_client(broker, "pub5")
        for i in range(30):
            publish_v5(pub, "slow/x", str(i).encode())
        again = Procmqtt(tmp_path / "app", "tests/apps.py:Recorder", str(tmp_path / "app" / "procmqtt.toml"))
        runs.append(again)
        wait_until(lambda: len(records(rec)) >= 30, 30, "the 30 queued messages handled")
        client_id = re.search(r'client_id = "([^"]+)"', (tmp_path / "app" / "procmqtt.toml").read_text()).group(1)
        burst = _first_burst(broker.log_path.read_text(), client_id)
        print(f"protocol {protocol}: {burst} messages sent before the first acknowledgement")
        if protocol == "5":
            assert burst == 4
        else:
            assert burst > 4
        assert again.stop() == 0
    finally:
        broker.stop()


@pytest.mark.timeout(60)
def test_replies_never_wait_behind_the_window_their_requests_hold(tmp_path, broker, runs):
    """One worker with prefetch 2: both messages of the Receive Maximum window are held by handlers
    waiting for replies. Replies come at QoS 0, outside that window, so none waits for a slot that
    only its own arrival would free."""
    run_app(runs, tmp_path / "responder", broker, "tests/apps_mqtt5.py:Props", topics={"service/#": 1})
    run, rec = run_app(
        runs,
        tmp_path / "asker",
        broker,
        "tests/apps_mqtt5.py:Props",
        topics={"ask/#": 1},
        workers=1,
        workers_toml="prefetch = 2",
        settings={"request_timeout": 3},
    )
    pub = v5_client(broker, "pub5")
    for i in range(10):
        publish_v5(pub, f"ask/{i}", f"question {i}".encode())
    wait_until(lambda: len(records(rec, "done")) >= 10, 40, "10 requests over")
    assert not records(rec, "timeout") and len(records(rec, "reply")) == 10
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_a_broker_receive_maximum_below_max_inflight_is_named(tmp_path, runs):
    """Mosquitto announces max_inflight_messages as its Receive Maximum. paho cannot lower its window
    on a live connection, so the agent says which key to change (MQTT 5 defaults to 20)."""
    small = Mosquitto(tmp_path / "broker", extra=("max_inflight_messages 5",))
    small.start()
    try:
        run, _ = run_app(runs, tmp_path / "app", small, "tests/apps_mqtt5.py:Props", topics={"echo5/#": 1})
        run.wait_for_log(
            r"WARNING the broker's Receive Maximum is 5, below \[mqtt\] max_inflight \(20\): a broker "
            r"that enforces it may disconnect us; set max_inflight = 5"
        )
        assert run.stop() == 0
        run2, _ = run_app(
            runs,
            tmp_path / "app2",
            small,
            "tests/apps_mqtt5.py:Props",
            topics={"echo5/#": 1},
            mqtt_toml=V5 + "\nmax_inflight = 5",
        )
        sub = V5Subscriber(small, "echoed5/#")
        pub = v5_client(small, "pub5")
        for i in range(30):
            publish_v5(pub, f"echo5/{i}", b"x")
        wait_until(lambda: len(sub.messages) >= 30, 20, "30 echoes, 5 in flight at a time")
        assert "Receive Maximum" not in run2.log()
        sub.close()
        assert run2.stop() == 0
    finally:
        small.stop()
