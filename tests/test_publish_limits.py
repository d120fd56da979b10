"""The agent's publish path at its limits, on a real broker: more workers than paho's message ids
once allowed, QoS 0 with a broker that stops reading, publishes the agent cannot send, and the
worker's own size checks (procmqtt/agent/outbox.py, procmqtt/agent/brokersocket.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections import defaultdict
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from harness import (
    Procmqtt,
    Subscriber,
    publish_all,
    publisher,
    records,
    start,
    wait_until,
    write_config,
)

from procmqtt import Worker, topics
from procmqtt.agent.outbox import Outbox, Outgoing
from procmqtt.testing import WorkerHarness

APP = "tests/apps_publish.py:Publishers"


def _run(runs: list, tmp_path, broker, *args: str, env: dict | None = None, **kwargs) -> Procmqtt:
    cfg = write_config(tmp_path / "p.toml", broker, **kwargs)
    run = Procmqtt(tmp_path, APP, cfg, *args, env=env)
    runs.append(run)
    run.ready()
    return run


def _in_order(sub: Subscriber) -> dict[str, list[int]]:
    got: dict[str, list[int]] = defaultdict(list)
    with sub.lock:
        for m in sub.messages:
            got[m.topic].append(int(m.payload))
    return got


@pytest.mark.timeout(90)
def test_64_workers_start_and_deliver_with_the_default_config(tmp_path, broker, runs):
    """-w 64 was refused: publish_buffer (1,000) x 64 is over the 60,000 paho message ids."""
    out = Subscriber(broker, "echoed/#")
    run, rec = start(runs, tmp_path, broker, topics={"echo/#": 1}, workers=1, args=("-w", "64"), wait_ready=False)
    run.ready(60)
    run.wait_for_log(r"started worker 63 ", 60)
    publish_all(publisher(broker), [(f"echo/{i}", str(i).encode()) for i in range(200)])
    wait_until(lambda: len(out.messages) >= 200, 60, "200 echoes")
    assert sorted(int(p) for p in out.payloads()) == list(range(200))
    assert len({r["worker"] for r in records(rec)}) > 10  # spread over the 64 workers
    out.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_publishes_past_what_paho_holds_wait_in_the_agent_and_go_out_in_order(tmp_path, broker, runs):
    """paho gets 3 at a time here (TEST_PAHO_WINDOW): 2 x 600 publishes queue in the agent."""
    out = Subscriber(broker, "out/#")
    run = _run(
        runs,
        tmp_path,
        broker,
        env={"TEST_PAHO_WINDOW": "3"},
        topics={"flood/#": 0},
        workers=2,
        workers_toml='dispatch = "round_robin"',
    )
    publish_all(publisher(broker), [("flood/600", b""), ("flood/600", b"")], qos=0)
    run.wait_for_log(r"flood: 600 of 600 confirmed", 40, count=2)
    wait_until(lambda: len(out.messages) >= 1200, 20, "the 1,200 publishes")
    assert _in_order(out) == {"out/0": list(range(600)), "out/1": list(range(600))}
    out.close()
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_more_publishes_outstanding_than_paho_has_message_ids(tmp_path, broker, runs):
    """70,000 QoS 1 publishes unconfirmed at once (the broker is frozen), then all delivered in order."""
    out = Subscriber(broker, "out/#")
    run = _run(
        runs,
        tmp_path,
        broker,
        topics={"flood/#": 0},
        workers=2,
        app={"delay": 1.0},
        mqtt="publish_buffer = 35000",
        workers_toml='dispatch = "round_robin"',
    )
    publish_all(publisher(broker), [("flood/35000", b""), ("flood/35000", b"")], qos=0)
    run.wait_for_log(r"handling flood/35000", 10, count=2)
    with frozen(broker):  # within the handlers' 1 s delay: nothing they publish is confirmed before...
        run.wait_for_log(r"flood: published 35000", 60, count=2)
    run.wait_for_log(r"flood: 35000 of 35000 confirmed", 60, count=2)  # ... the broker thaws
    wait_until(lambda: len(out.messages) >= 70_000, 60, "the 70,000 publishes")
    assert _in_order(out) == {"out/0": list(range(35_000)), "out/1": list(range(35_000))}
    out.close()
    assert run.stop() == 0


@contextlib.contextmanager
def frozen(broker) -> Iterator[None]:
    """The broker stopped (SIGSTOP): connections stay open, nothing is read or acknowledged."""
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        broker.proc.send_signal(signal.SIGCONT)


# --- QoS 0 is bounded, and confirmed only once in the kernel (issue 11, point 13) --------------


def _agent_pid(run: Procmqtt) -> int:
    return run.pids("agent")[-1]


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def _kernel_queued(pid: int, broker_port: int) -> int:
    """Bytes the kernel holds between the agent and the broker: the agent's send queue plus the
    broker's receive queue (/proc/net/tcp, IPv4 loopback)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    port = f"{broker_port:04X}"
    agent = next(r for r in rows if r[9] in inodes and r[2].endswith(":" + port))
    peer = next(r for r in rows if r[1] == agent[2] and r[2] == agent[1])
    return int(agent[4].split(":")[0], 16) + int(peer[4].split(":")[1], 16)


@pytest.mark.timeout(60)
def test_qos0_publishes_to_a_frozen_broker_hit_the_publish_buffer_and_memory_stays_bounded(tmp_path, broker, runs):
    """Before: every QoS 0 publish was confirmed once appended to the agent's unbounded buffer; the
    worker never blocked and the agent grew by every byte (here 1,000 x 64 KiB)."""
    size = 64 * 1024
    run = _run(
        runs,
        tmp_path,
        broker,
        topics={"qos0/#": 0},
        workers=1,
        app={"delay": 1.0, "most": 1000},
        mqtt="publish_buffer = 100\npublish_timeout = 1",
    )
    agent = _agent_pid(run)
    before = vm_rss_kb(agent)
    publish_all(publisher(broker), [(f"qos0/{size}", b"")], qos=0)
    run.wait_for_log(r"handling qos0/", 10)
    with frozen(broker):
        run.wait_for_log(r"qos0: (buffer full|all \d+ published)", 30)
        grown_mb = (vm_rss_kb(agent) - before) / 1024
        in_kernel = _kernel_queued(agent, broker.port)
    found = re.search(r"qos0: buffer full after (\d+) publishes, (\d+) confirmed", run.log())
    assert found, run.log()[-2000:]
    published, confirmed = int(found[1]), int(found[2])
    assert published - confirmed == 100  # the publish_buffer: unconfirmed QoS 0 count
    # confirmed means in the kernel: never more than the sockets hold (one packet's slack)
    assert confirmed * size <= in_kernel + size, (confirmed, in_kernel)
    assert grown_mb < 30, f"the agent grew by {grown_mb:.0f} MB"
    assert run.stop() == 0


# --- what the agent cannot send fails that publish, never the agent (point 8) ------------------


@pytest.mark.timeout(60)
def test_a_publish_the_agent_cannot_send_fails_it_and_the_agent_goes_on(tmp_path, broker, runs):
    """Before: paho's ValueError (a wildcard in the topic, past the worker's check) crashed the
    agent, and the broker sent the trigger again to the next one."""
    after = Subscriber(broker, "ok/#")
    run = _run(runs, tmp_path, broker, topics={"wildcard": 1}, workers=1)
    agent = _agent_pid(run)
    publish_all(publisher(broker), [("wildcard", b"")])
    run.wait_for_log(r"wildcard: then an ordinary publish confirmed True", 20)
    assert re.search(r"wildcard: confirmed False, error 3\b", run.log())  # MQTT_ERR_INVAL
    assert "publish to 'bad/+/topic' failed: a topic to publish to must not contain wildcards" in run.log()
    wait_until(lambda: after.payloads() == [b"fine"], 10, "the ordinary publish")
    assert run.pids("agent") == {-1: agent} and run.log().count("handling wildcard") == 1
    after.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_a_dead_letter_that_cannot_be_published_is_dropped_and_max_attempts_holds(tmp_path, broker, runs):
    """dead_letter_topic + '/' + the topic is over 65,535 bytes. Before: the agent crashed at every
    dead-lettering, the message came back, attempts were never counted (a crash loop)."""
    dead = "d" * (topics.MAX_TOPIC_BYTES - 2)
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"boom": 1, "load/#": 1},
        workers=1,
        workers_toml=f'on_error = "retry"\nmax_attempts = 2\ndead_letter_topic = "{dead}"',
    )
    agent = run.pids("agent")
    pub = publisher(broker)
    publish_all(pub, [("boom", b"bad")])
    run.wait_for_log(
        r"dropping the message on 'boom': on_message raised \(2 attempts\); its dead letter "
        r"cannot be published \(a topic must be at most 65535 bytes\)",
        20,
    )
    publish_all(pub, [("load/1", b"after")])  # handled after the drop: nothing of boom comes back
    wait_until(lambda: any(r["topic"] == "load/1" for r in records(rec)), 10, "the next message")
    assert [r["topic"] for r in records(rec, "received")] == ["boom", "boom", "load/1"]
    assert run.pids("agent") == agent
    assert run.stop() == 0
    assert ", 1 dropped" in run.log()


# --- the worker refuses what MQTT cannot carry -------------------------------------------------


@pytest.mark.unit
def test_packet_problem_names_the_limit():
    limit = topics.MAX_REMAINING_LENGTH
    assert topics.packet_problem("t", limit - 3, 0) is None  # 2 + 1 + payload: exactly the maximum
    assert "over MQTT's maximum packet size of 268,435,455" in topics.packet_problem("t", limit - 2, 0)
    assert topics.packet_problem("t", limit - 5, 1) is None and topics.packet_problem("t", limit - 4, 1)
    assert topics.packet_problem("t", limit - 8, 0, 0) is None  # MQTT 5: property length, at most 4 bytes
    assert topics.packet_problem("t" * 65_536, 0, 0) == "a topic must be at most 65535 bytes"


@pytest.mark.unit
def test_worker_publish_refuses_a_payload_over_the_packet_size(monkeypatch):
    monkeypatch.setattr(topics, "MAX_REMAINING_LENGTH", 1000)  # not 256 MiB of test memory
    with WorkerHarness(_Publishes) as h:
        with pytest.raises(
            ValueError,
            match=r"^publish to 'out': the payload of 997 bytes is too large: .* "
            r"takes 1,004 bytes, over MQTT's maximum packet size of 1,000$",
        ):
            h.worker.publish("out", b"x" * 997, qos=1)
        h.worker.publish("out", b"x" * 993, qos=1)  # 2 + 3 + 2 + 993: exactly the maximum
        assert len(h.published) == 1


class _Publishes(Worker):
    def on_message(self, message) -> None:
        pass


class _FakePaho:
    """paho's publish as the outbox sees it: every call takes the next message id."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, properties: object) -> mqtt.MQTTMessageInfo:
        self.sent.append((topic, qos))
        info = mqtt.MQTTMessageInfo(len(self.sent))
        info.rc = mqtt.MQTT_ERR_SUCCESS
        return info


@pytest.mark.unit
def test_the_outbox_hands_paho_max_inflight_qos1_publishes_in_order_and_the_rest_as_they_are_confirmed():
    answers: list[tuple[str, int]] = []
    box = Outbox(
        lambda e, error: answers.append((e.topic, error)), logging.getLogger("test"), v5=False, inflight=2, window=3
    )
    paho = _FakePaho()
    for topic, qos in [("a", 1), ("b", 1), ("c", 1), ("d", 0), ("e", 1)]:
        box.add(Outgoing(topic, b"", qos, False, slot=0, generation=1, request_id=ord(topic)))
    box.feed(paho)
    assert paho.sent == [("a", 1), ("b", 1)]  # max_inflight: c waits, and d behind it (in order)
    assert sorted(box.in_flight(0, 1, ord("e"))) == list(map(ord, "abcde"))
    box.confirmed(1, 0, None)
    box.feed(paho)
    assert paho.sent == [("a", 1), ("b", 1), ("c", 1), ("d", 0)]  # window 3: e waits for a slot
    box.confirmed(4, 0, None)  # QoS 0 written by paho's own socket: answered at once
    box.feed(paho)
    assert len(paho.sent) == 4  # e waits: b and c, 2 QoS 1 publishes, are in paho
    box.confirmed(2, 135, None)  # refused by the broker
    box.feed(paho)
    assert paho.sent[-1] == ("e", 1)
    assert answers == [("a", 0), ("d", 0), ("b", 135)] and len(box) == 2


@pytest.mark.unit
def test_a_publish_paho_cannot_encode_fails_alone():
    answers: list[tuple[str, int]] = []
    box = Outbox(lambda e, error: answers.append((e.topic, error)), logging.getLogger("test"), v5=False, inflight=9)
    box.add(Outgoing("bad/#", b"", 1, False))
    box.add(Outgoing("t", b"", 1, False))
    box.feed(_FakePaho())
    assert answers == [("bad/#", mqtt.MQTT_ERR_INVAL)] and list(box.paho) == [1]
