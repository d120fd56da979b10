"""The broker socket's buffers stay bounded (procmqtt/agent/brokersocket.py, procmqtt/agent/outbox.py), and its
packet framing survives any input (a hypothesis fuzz test, agreeing with paho's own decoder)."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import tracemalloc

import paho.mqtt.client as mqtt
import pytest
from harness import Mosquitto, publish_all, publisher, records, start, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_brokersocket import (
    PINGRESP,
    PUBACK,
    SUBACK,
    _Arrivals,
    _body_length,
    _length,
    publish_packet,
)

from procmqtt.agent.brokersocket import BUFFER_SIZE, WRITE_LIMIT, BrokerSocket
from procmqtt.agent.outbox import Outbox, Outgoing


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    thread = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


def _read_all(buf: BrokerSocket, count: int) -> list:
    got: list = []
    while len(got) < count:
        buf.fill(1 << 20)
        got += buf.publishes(100)
    return got


@pytest.mark.timeout(30)
@pytest.mark.unit
def test_the_read_buffer_shrinks_back_after_a_large_packet(pair):
    """Before: the buffer kept the size of the largest packet ever read (127 MB after 100 MB)."""
    a, buf = pair
    big = os.urandom(8 * 1024 * 1024)
    sender = _send_in_background(a, publish_packet("big", big, 1, 7) + publish_packet("small", b"s"))
    got = _read_all(buf, 2)
    sender.join(5)
    assert [g[0] for g in got] == ["big", "small"] and got[0][1] == big
    assert len(buf.buf) == BUFFER_SIZE


@pytest.mark.timeout(30)
@pytest.mark.unit
def test_growing_for_a_large_packet_allocates_it_once(pair):
    """Before: zeros were built and then copied in (bytes(n) + extend), about twice the packet at
    the peak, more while the unread bytes moved."""
    a, buf = pair
    size = 32 * 1024 * 1024
    packet = publish_packet("big", bytes(size), 0)
    sender = _send_in_background(a, packet)
    tracemalloc.start()
    try:
        while buf.end - buf.pos < len(packet):
            buf.fill(1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    sender.join(5)
    assert peak < 1.2 * size, f"peak {peak / size:.2f} x the packet"
    assert buf.publishes(1)[0][1] == bytes(size) and len(buf.buf) == BUFFER_SIZE


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_the_write_buffer_is_bounded_and_counts_what_the_kernel_took(pair):
    """Before: ``send`` took everything (589 MB with the broker stopped); now, past WRITE_LIMIT,
    paho is told "would block" and keeps the rest in its own queue."""
    a, buf = pair
    assert buf.send(b"x" * (WRITE_LIMIT - 1)) == WRITE_LIMIT - 1
    assert buf.send(PUBACK) == 4  # the packet that crosses the limit is taken whole
    with pytest.raises(BlockingIOError):
        buf.send(PUBACK)
    assert buf.written == WRITE_LIMIT + 3 and buf.sent == 0
    a.settimeout(5)
    got = 0
    while buf.out or got < buf.written:
        buf.flush()
        got += len(a.recv(1 << 20))
    assert buf.sent == buf.written == got and buf.send(PUBACK) == 4


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_qos0_is_answered_only_once_the_kernel_has_its_bytes(pair):
    """paho calls a QoS 0 publish sent when ``BrokerSocket.send`` took it; the outbox waits for
    ``flush`` to hand its last byte to the kernel."""
    a, buf = pair
    answers: list[tuple[str, int]] = []
    outbox = Outbox(
        lambda entry, error: answers.append((entry.topic, error)), logging.getLogger("test"), v5=False, inflight=10
    )
    size = 700 * 1024
    buf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # the kernel takes < size at once
    for mid, topic in ((1, "first"), (2, "second")):
        outbox.paho[mid] = Outgoing(topic, b"", 0, False)
        buf.send(os.urandom(size))  # what paho writes for that publish, then its on_publish
        outbox.confirmed(mid, 0, buf)
    buf.flush()
    outbox.sent(buf)
    assert answers == [] and len(outbox) == 2 and 0 < buf.sent < size
    a.settimeout(5)
    while buf.sent < size:
        a.recv(64 * 1024)
        buf.flush()
    assert buf.sent < 2 * size
    outbox.sent(buf)
    assert answers == [("first", 0)]
    outbox.fail_lost(None)  # a new connection: the old socket's unsent bytes are gone
    assert answers == [("first", 0), ("second", mqtt.MQTT_ERR_CONN_LOST)] and len(outbox) == 0


# --- fuzzing the framing -----------------------------------------------------------------------


def _drive(stream: bytes, cuts: list[int], *, v5: bool = False) -> list[tuple[str, object]]:
    """What the agent does with ``stream`` arriving in pieces cut at ``cuts``, in order: publishes
    decoded (``pub``), and what paho read (as paho reads: up to the release, until "would block",
    ``paho``, or the end of the stream, ``end``: all that is left). Checks that paho reads exactly
    the bytes consumed, that everything is consumed, and that no pass spins without consuming
    anything (a hot loop)."""
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[i:j] for i, j in zip([0, *points], [*points, len(stream)], strict=True)]
    sock = _Arrivals(chunks)
    buf = BrokerSocket(sock)
    arrived = 0
    events: list[tuple[str, object]] = []

    def consumed() -> int:
        return arrived - len(sock.ready) - (buf.end - buf.pos)

    for chunk in [*chunks, b""]:
        sock.arrive()
        arrived += len(chunk)
        buf.fill(1 << 20)
        for _ in range(10_000):  # every pass consumes a packet or stops: far fewer than this
            start = consumed()
            batch = buf.publishes(7, v5)
            if batch:
                events += [("pub", m) for m in batch]
                assert consumed() > start
                continue
            if not buf.release():
                break
            data, ended = bytearray(), False
            while True:
                try:
                    part = buf.recv(1 + len(data) % 5)
                except BlockingIOError:
                    break
                except OSError:  # the stored socket error, after the buffered bytes
                    ended = True
                    break
                if not part:
                    ended = True
                    break
                data += part
            assert data or ended, "released, yet paho could read nothing"
            assert bytes(data) == stream[start : consumed()]
            events.append(("end" if ended else "paho", bytes(data)))
            if ended:
                assert consumed() == len(stream)
                return events
        else:
            raise AssertionError("the framing loops without consuming anything")
    raise AssertionError("the end of the stream was never reported")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 10_000), max_size=8), v5=st.booleans())
@pytest.mark.unit
def test_random_bytes_never_break_the_framing(data, cuts, v5):
    """Anything a broker sends is consumed once, in order, without an exception or a hot loop."""
    _drive(data, cuts, v5=v5)


_topics = st.one_of(
    st.text(min_size=1, max_size=40).filter(lambda t: "\x00" not in t), st.binary(min_size=0, max_size=6)
)  # raw bytes: empty or invalid UTF-8 topics
_publish = st.builds(
    lambda topic, payload, qos, mid, retain, dup: publish_packet(topic, payload, qos, mid, retain, dup),
    _topics,
    st.binary(max_size=300),
    st.integers(0, 2),
    st.integers(1, 65535),
    st.booleans(),
    st.booleans(),
)
_malformed = st.sampled_from(
    [
        bytes([0x30, 1, 0]),  # too short to hold a topic length
        bytes([0x32, 4, 0, 9, 0x61, 0x62]),  # topic length past the end of the packet
        bytes([0x36, 5, 0, 1, 0x61, 0, 1]),  # QoS 3
        bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),  # a fifth length byte
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=st.lists(st.one_of(_publish, st.sampled_from([SUBACK, PUBACK, PINGRESP])), max_size=12),
    tail=st.one_of(st.just(b""), _malformed),
    cuts=st.lists(st.integers(0, 100_000), max_size=10),
)
@pytest.mark.unit
def test_packets_split_anywhere_agree_with_paho(packets, tail, cuts):
    """Valid packets in any split: every one exactly once and in order, decoded as paho decodes
    it, or handed to paho whole; a malformed one at the end goes to paho, which refuses it."""
    paho_packet = pytest.importorskip("paho.mqtt._packet")
    stream = b"".join(packets) + tail
    events = _drive(stream, cuts)
    left = [*packets, tail] if tail else list(packets)
    for kind, value in events:
        if kind == "end":  # the stream ended: paho reads all that is left
            assert value == b"".join(left)
            return
        assert left, f"{kind} {value!r} after the last packet"
        packet = left.pop(0)
        if kind == "paho":  # one whole packet the agent does not decode itself
            assert value == packet and (packet is tail or not _decodable(packet))
        else:
            ref = paho_packet.decode_publish(packet[0], packet[len(packet) - _body_length(packet) :], mqtt.MQTTv311)
            assert value == (ref.topic.decode(), ref.payload, ref.qos, ref.mid, ref.retain, ref.dup)
    raise AssertionError("no end of stream")


def _decodable(packet: bytes) -> bool:
    """A QoS 0/1 PUBLISH the agent decodes itself: a topic that is there and valid UTF-8."""
    if packet[0] & 0xF0 != 0x30 or packet[0] & 0x06 == 0x04:
        return False
    body = packet[len(packet) - _body_length(packet) :]
    topic = body[2 : 2 + (body[0] << 8 | body[1])]
    try:
        topic.decode()
    except UnicodeDecodeError:
        return False
    return bool(topic)


@pytest.mark.unit
def test_the_length_helper_matches_the_spec():
    assert _length(127) == b"\x7f" and _length(128) == b"\x80\x01" and _length(268_435_455) == b"\xff\xff\xff\x7f"


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_tcp_sockets_send_without_nagle():
    """The agent writes once per pass already; with Nagle a publish waited for the broker's delayed
    ACK of the previous write (a handler echoing 300 messages one by one took 14.5 s, now 2 s:
    tests/test_policies.py::test_handlers_waiting_on_publishes_are_not_stalled_by_backpressure)."""
    with socket.socket() as sock:
        BrokerSocket(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.timeout(60)
def test_the_agent_gives_back_the_memory_of_a_large_message(tmp_path, runs):
    """Before: 127 MB kept after one 100 MB message (the read buffer never shrank)."""
    broker = Mosquitto(tmp_path / "broker", extra=("message_size_limit 0",))
    broker.start()
    try:
        run, rec = start(runs, tmp_path, broker, topics={"big/#": 1}, workers=1)
        agent = run.pids("agent")[-1]
        before = _rss_mb(agent)
        publish_all(publisher(broker), [("big/1", b"x" * 40_000_000)])
        wait_until(lambda: records(rec), 30, "the large message handled")
        wait_until(lambda: _rss_mb(agent) < before + 15, 5, "the agent's memory back near where it was")
        assert run.stop() == 0
    finally:
        broker.stop()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1]) / 1024
