"""The agent's bulk reader of the broker's stream (procmqtt/agent/brokersocket.py).

Unit tests feed byte streams through a socket pair, split at every size, to a reader that behaves
like paho's (one packet with recv(1), recv(1)..., recv(n)); the integration tests run real paho and
a real Mosquitto through it.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import ssl
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from harness import publisher, records, start, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from procmqtt.agent.brokersocket import WRITE_LIMIT, BrokerSocket, wrap_socket


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(
    topic: bytes | str,
    payload: bytes,
    qos: int = 0,
    mid: int = 0,
    retain: bool = False,
    dup: bool = False,
    v5_properties: bytes | None = None,
) -> bytes:
    """A PUBLISH packet; ``v5_properties`` (MQTT 5) is the property block, b"" for none."""
    topic = topic.encode() if isinstance(topic, str) else topic
    props = b"" if v5_properties is None else _length(len(v5_properties)) + v5_properties
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + props + payload
    return bytes([0x30 | dup << 3 | qos << 1 | retain]) + _length(len(body)) + body


SUBACK = bytes([0x90, 3, 0, 1, 1])
PINGRESP = bytes([0xD0, 0])
PUBACK = bytes([0x40, 2, 0, 7])


def _read_like_paho(buf: BrokerSocket) -> bytes | None:
    """One packet the way paho reads it; None when recv would block before the packet starts.
    A packet started must finish: paho would otherwise hold half a packet the agent cannot see."""
    try:
        head = buf.recv(1)
    except BlockingIOError:
        return None
    if not head:
        return b""
    packet, length, shift = bytearray(head), 0, 0
    while True:
        byte = buf.recv(1)
        assert byte, "stream ended inside a released packet"
        packet += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    while length:
        data = buf.recv(length)
        packet += data
        length -= len(data)
    return bytes(packet)


def _drain(buf: BrokerSocket, out: list, *, fast: bool = True) -> bool:
    """What the agent's _read_broker does, with `out` in place of workers and paho; False at the end."""
    buf.fill(1024 * 1024)
    while True:
        if fast and (batch := buf.publishes(10_000)):
            out.extend(("publish", *m) for m in batch)
            continue
        if not buf.release():
            return True
        packet = _read_like_paho(buf)
        if packet == b"":
            return False
        assert packet is not None, "released but nothing to read"
        out.append(("paho", packet))


class _Arrivals:
    """A socket whose data arrives in the given chunks, one per ``arrive()``, then end of file."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(reversed(chunks))
        self.ready = b""

    def arrive(self) -> None:
        self.ready += self.chunks.pop() if self.chunks else b""

    def recv(self, size: int) -> bytes:
        if not self.ready:
            if self.chunks:
                raise BlockingIOError
            return b""
        data, self.ready = self.ready[:size], self.ready[size:]
        return data


def _stream_through(chunks: list[bytes], *, fast: bool = True) -> list:
    sock = _Arrivals(chunks)
    buf = BrokerSocket(sock)
    out: list = []
    for _ in range(len(chunks) + 1):
        sock.arrive()
        if not _drain(buf, out, fast=fast):
            return out
    raise AssertionError("the end of the stream was not reported")


MIXED = [
    publish_packet("a/b", b"q0"),
    publish_packet("a/é", b"q1 \x00\xff", qos=1, mid=1, retain=True),
    SUBACK,
    publish_packet("q2", b"x", qos=2, mid=2),  # QoS 2 is paho's
    PINGRESP,
    publish_packet("big", os.urandom(300_000), qos=1, mid=3),  # larger than one recv
    publish_packet("empty", b"", qos=1, mid=65535, dup=True),
    PUBACK,
    publish_packet(b"bad\xff", b"invalid UTF-8 topic: paho's"),
    publish_packet("last", b"z"),
]


def _expected(packets: list[bytes]) -> list:
    out = []
    for packet in packets:
        if packet in (SUBACK, PINGRESP, PUBACK) or packet[0] & 0x06 == 0x04 or b"bad\xff" in packet:
            out.append(("paho", packet))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1000, 70_000, None])
@pytest.mark.unit
def test_any_split_of_the_stream_gives_every_packet_once_in_order(size):
    stream = b"".join(MIXED)
    if size is None:
        rng = random.Random(4)
        cuts = sorted(rng.sample(range(1, len(stream)), 40))
        chunks = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    else:
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    out = _stream_through(chunks)
    kinds = [o[0] for o in out]
    assert kinds == ["publish", "publish", "paho", "paho", "paho", "publish", "publish", "paho", "paho", "publish"]
    published = [o[1:] for o in out if o[0] == "publish"]
    assert published[0] == ("a/b", b"q0", 0, 0, False, False)
    assert published[1] == ("a/é", b"q1 \x00\xff", 1, 1, True, False)
    assert published[2][0] == "big" and published[2][1] == MIXED[5][-300_000:] and published[2][2:4] == (1, 3)
    assert published[3] == ("empty", b"", 1, 65535, False, True)
    assert published[4] == ("last", b"z", 0, 0, False, False)
    assert [o for o in out if o[0] == "paho"] == _expected(MIXED)


@pytest.mark.timeout(30)
@pytest.mark.unit
def test_without_decoding_paho_gets_the_whole_stream_packet_by_packet():
    """MQTT 5 connections decode nothing here: paho reads every packet, none of them split."""
    out = _stream_through([b"".join(MIXED)[i : i + 7] for i in range(0, len(b"".join(MIXED)), 7)], fast=False)
    assert out == [("paho", p) for p in MIXED]


@pytest.mark.timeout(30)
@pytest.mark.unit
def test_decoded_packets_match_paho_own_decoder():
    paho_packet = pytest.importorskip("paho.mqtt._packet")
    rng = random.Random(7)
    for _ in range(300):
        qos = rng.choice([0, 1])
        topic = "/".join(rng.choice(["a", "ü", "x" * rng.randint(1, 300), "+x"]) for _ in range(rng.randint(1, 4)))
        payload = os.urandom(rng.choice([0, 1, 127, 128, 16_383, 16_384, 2_097_152 // 8]))
        packet = publish_packet(
            topic, payload, qos, rng.randint(1, 65535) if qos else 0, rng.random() < 0.5, rng.random() < 0.5
        )
        sock = _Arrivals([packet[:3], packet[3:]])
        buf = BrokerSocket(sock)
        sock.arrive()
        sock.arrive()
        buf.fill(1)  # smaller than the packet: fill still reads all of it
        (got,) = buf.publishes(10)
        ref = paho_packet.decode_publish(packet[0], packet[len(packet) - _body_length(packet) :], mqtt.MQTTv311)
        assert got == (ref.topic.decode(), ref.payload, ref.qos, ref.mid, ref.retain, ref.dup)


@pytest.mark.timeout(30)
@pytest.mark.unit
def test_mqtt5_packets_without_properties_are_decoded_the_rest_left_to_paho():
    paho_packet = pytest.importorskip("paho.mqtt._packet")
    plain = publish_packet("v5/plain", b"p", 1, 9, v5_properties=b"")
    content_type = b"\x03" + len(b"text/plain").to_bytes(2, "big") + b"text/plain"
    with_props = publish_packet("v5/props", b"q", 1, 10, v5_properties=content_type)
    alias = publish_packet("", b"r", 0, v5_properties=b"\x23\x00\x01")  # a topic alias, no topic
    sock = _Arrivals([plain + plain + with_props + alias])
    buf = BrokerSocket(sock)
    sock.arrive()
    buf.fill(1 << 20)
    got = buf.publishes(10, v5=True)
    ref = paho_packet.decode_publish(plain[0], plain[2:], mqtt.MQTTv5)
    assert got == [(ref.topic.decode(), ref.payload, ref.qos, ref.mid, ref.retain, ref.dup)] * 2
    assert buf.release() and _read_like_paho(buf) == with_props
    assert buf.publishes(10, v5=True) == []
    assert buf.release() and _read_like_paho(buf) == alias


def _body_length(packet: bytes) -> int:
    length, shift, i = 0, 0, 1
    while True:
        length |= (packet[i] & 0x7F) << shift
        shift += 7
        i += 1
        if not packet[i - 1] & 0x80:
            return length


@pytest.mark.timeout(30)
@pytest.mark.unit
def test_end_of_stream_inside_a_packet_reaches_paho_as_connection_lost():
    a, b = socket.socketpair()
    a.sendall(publish_packet("t", b"whole") + publish_packet("t", b"cut short")[:5])
    a.close()
    b.setblocking(False)
    buf = BrokerSocket(b)
    buf.fill(1024)
    assert buf.publishes(10) == [("t", b"whole", 0, 0, False, False)]
    buf.fill(1024)  # select reports the end of file as readable; the agent reads again
    assert buf.waiting(), "the end of the stream must keep the agent reading"
    assert buf.release()
    assert buf.recv(100) == publish_packet("t", b"cut short")[:5]
    assert buf.recv(1) == b""
    b.close()


@pytest.mark.timeout(30)
@pytest.mark.unit
def test_a_socket_error_is_raised_to_paho_after_the_buffered_packets():
    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def recv(self, size: int) -> bytes:
            self.calls += 1
            if self.calls == 1:
                return PINGRESP
            raise ConnectionResetError("reset by peer")

    buf = BrokerSocket(Failing())
    buf.fill(1024)
    assert buf.release() and buf.recv(2) == PINGRESP
    assert buf.release()
    with pytest.raises(ConnectionResetError):
        buf.recv(1)


@pytest.mark.timeout(30)
@pytest.mark.unit
def test_nothing_is_released_before_a_packet_is_whole():
    a, b = socket.socketpair()
    b.setblocking(False)
    buf = BrokerSocket(b)
    packet = publish_packet("t", b"x" * 1000, qos=2, mid=9)
    a.sendall(packet[:500])
    buf.fill(1024)
    assert not buf.release() and not buf.waiting()
    with pytest.raises(BlockingIOError):
        buf.recv(1)
    a.sendall(packet[500:])
    buf.fill(1024)
    assert buf.waiting() and buf.release()
    assert _read_like_paho(buf) == packet
    a.close()
    b.close()


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_what_paho_writes_goes_out_in_one_send_and_before_close(pair):
    a, buf = pair
    assert buf.send(PUBACK) == 4 and buf.send(PINGRESP) == 2  # paho's sends: buffered, never blocking
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        a.recv(100)
    assert buf.flush() and a.recv(100) == PUBACK + PINGRESP
    buf.send(SUBACK)
    buf.close()  # paho closes right after DISCONNECT: what it wrote still goes
    assert a.recv(100) == SUBACK


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_an_acknowledgement_goes_straight_into_the_write_buffer_while_it_has_room(pair):
    """``puback`` writes the bytes paho's ``ack`` would, counted like paho's (``written``), and
    declines when the buffer is full or the connection failed, so paho's queue takes it then."""
    a, buf = pair
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, manual_ack=True)
    paho._sock = buf  # paho's ack through the same buffer, for its bytes
    paho.on_socket_register_write = lambda *args: None
    paho.ack(0x1234, 1)
    paho.loop_write()
    by_paho = bytes(buf.out)
    buf.out.clear()
    assert buf.puback(0x1234) and bytes(buf.out) == by_paho == b"\x40\x02\x12\x34"
    assert buf.written == 8
    buf.send(os.urandom(WRITE_LIMIT))
    assert not buf.puback(1) and buf.written == 8 + WRITE_LIMIT  # full: left to paho
    buf.out.clear()
    a.close()
    assert buf.puback(2) and buf.flush()  # the peer is gone: the write fails
    assert buf.error is not None and not buf.puback(1)  # the connection failed: paho hears of it


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_a_failed_write_reaches_paho_as_connection_lost(pair):
    a, buf = pair
    a.close()
    buf.send(PUBACK)
    assert buf.flush()  # nothing left to send: the peer is gone
    with pytest.raises(OSError):
        buf.send(PUBACK)
    assert buf.release()
    with pytest.raises(OSError):
        buf.recv(1)


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_a_full_socket_keeps_the_rest_for_the_next_flush(pair):
    a, buf = pair
    big = os.urandom(8 * 1024 * 1024)
    buf.send(big)
    assert not buf.flush() and 0 < len(buf.out) < len(big)
    got = bytearray()
    a.settimeout(5)
    while len(got) < len(big):
        got += a.recv(1 << 20)
        buf.flush()
    assert bytes(got) == big and not buf.out


# --- with real paho and a real Mosquitto -------------------------------------------------------


@pytest.mark.timeout(30)
def test_paho_reads_through_the_wrapped_socket(broker):
    """The one paho internal procmqtt relies on: its socket attribute, read only through recv."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="inbound-test", manual_ack=True)
    got: list[mqtt.MQTTMessage] = []
    client.on_message = lambda c, u, m: got.append(m)
    client.connect("127.0.0.1", broker.port)
    buf = wrap_socket(client)
    assert buf is not None and client.socket() is buf, "paho's socket could not be wrapped"
    subscribed: list = []
    client.on_subscribe = lambda *args: subscribed.append(args)
    client.subscribe("w/#", 2)
    assert buf.out, "paho's SUBSCRIBE waits in the buffer"
    buf.flush()
    deadline = time.monotonic() + 10
    while not subscribed and time.monotonic() < deadline:  # the SUBACK: paho's, through release()
        buf.fill(1 << 20)
        if buf.release():
            client.loop_read()
        time.sleep(0.01)
    pub = publisher(broker)
    pub.publish("w/2", b"through paho", qos=2).wait_for_publish(5)
    pub.publish("w/1", b"decoded here", qos=1).wait_for_publish(5)
    decoded: list = []
    deadline = time.monotonic() + 10
    while not (got and decoded) and time.monotonic() < deadline:
        buf.fill(1 << 20)
        decoded += buf.publishes(10)
        if buf.release():
            client.loop_read()
        client.loop_write()
        buf.flush()
        client.loop_misc()
        time.sleep(0.01)
    assert [(m.topic, m.payload, m.qos) for m in got] == [("w/2", b"through paho", 2)]
    assert [d[:3] for d in decoded] == [("w/1", b"decoded here", 1)]
    client.disconnect()
    pub.disconnect()


@pytest.mark.timeout(90)
def test_every_kind_of_message_arrives_intact_through_the_agent(tmp_path, broker, runs):
    """QoS 0/1/2, retained, empty, unicode topics and a payload larger than the agent's read-ahead,
    interleaved: each handled once, byte-exact, with its QoS and retain flag."""
    topics = {"mix/#": 2}
    run, rec = start(runs, tmp_path, broker, topics=topics, workers=2)
    pub = publisher(broker)
    rng = random.Random(11)
    sent = []
    for i in range(600):
        qos = i % 3
        size = rng.choice([0, 1, 100, 5000]) if i != 300 else 3 * 1024 * 1024
        payload = os.urandom(size)
        topic = f"mix/{i}/{'é' if i % 5 == 0 else 'x'}"
        sent.append((topic, hashlib.sha1(payload).hexdigest(), qos))
        pub.publish(topic, payload, qos=qos)
    pub.publish("mix/retained", b"kept", qos=1, retain=True).wait_for_publish(10)
    wait_until(lambda: len(records(rec)) >= 601, 45, "601 messages handled")
    done = records(rec)
    by_topic = Counter(r["topic"] for r in done)
    assert max(by_topic.values()) == 1, "a message was handled twice"
    got = {r["topic"]: (r["sha"], r["qos"]) for r in done}
    assert all(got[t] == (sha, qos) for t, sha, qos in sent)
    assert [r["retain"] for r in done if r["topic"] == "mix/retained"] == [False]  # live, not from the store
    pub.disconnect()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_retained_message_keeps_its_flag(tmp_path, broker, runs):
    pub = publisher(broker)
    pub.publish("ret/a", b"stored", qos=1, retain=True).wait_for_publish(10)
    run, rec = start(runs, tmp_path, broker, topics={"ret/#": 1})
    wait_until(lambda: records(rec), 20, "the retained message")
    assert [(r["topic"], r["retain"]) for r in records(rec)] == [("ret/a", True)]
    pub.disconnect()
    assert run.stop() == 0


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_tls_sockets_are_read_until_they_would_block():
    """A TLS socket returns one record per recv; fill keeps reading (the plain-socket shortcut is off).
    TLS end to end: tests/test_broker_features.py."""
    with (
        socket.socket() as plain,
        ssl.create_default_context().wrap_socket(
            socket.socket(), do_handshake_on_connect=False, server_hostname="localhost"
        ) as tls,
    ):
        assert BrokerSocket(plain).plain
        assert not BrokerSocket(tls).plain


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_a_fifth_length_byte_goes_to_paho_to_refuse():
    """Remaining length takes at most four bytes: paho reads the fifth and reports a protocol error."""
    sock = _Arrivals([bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]) + b"rest", b"not yet"])
    buf = BrokerSocket(sock)
    sock.arrive()
    buf.fill(1024)
    assert buf.publishes(10) == []
    assert buf.release() and buf.limit == 6
