"""The records' byte layouts: ``encode`` and ``decode`` (``procmqtt.ipc.channel`` carries the bytes).

Record layouts are ``struct`` formats, not pickles; the first byte is the kind. MQTT 5 properties
ride in deliveries, replies and publishes as an optional block after the topic, announced by one byte,
so an MQTT 3.1.1 record carries one zero byte more and nothing else.

Pure functions of bytes: encoding and decoding run in whichever process sends or receives (the
supervisor, the agent, a worker), on either side of the fork alike.
"""

from __future__ import annotations

import socket
import struct

from procmqtt.ipc.records import (
    AGENT_STARTED,
    DELIVER,
    DELIVER_AT,
    DONE,
    HOLDING,
    PUBLISH,
    PUBLISHED,
    READY,
    REPLY,
    RESTARTS,
    RETIRE,
    RING_FILE,
    STOP,
    STOP_AGENT,
    SUBSCRIBE,
    SYNC,
    SYNC_ACK,
    UNSUBSCRIBE,
    WORKER_EXITED,
    WORKER_UP,
    AgentStarted,
    Deliver,
    DeliverAt,
    Done,
    Holding,
    Publish,
    Published,
    Ready,
    Record,
    Reply,
    Restarts,
    Retire,
    RingFile,
    Stop,
    StopAgent,
    Subscribe,
    Sync,
    SyncAck,
    Unsubscribe,
    WorkerExited,
    WorkerUp,
)
from procmqtt.message import EMPTY, Outcome, Properties

_DELIVER = struct.Struct("!BQBBBHB")  # kind, delivery id, qos, retain, redelivered, topic length, properties
_DELIVER_AT = struct.Struct("!BQBBBHBII")  # a deliver's fields, then the payload's offset and length in the ring
_REPLY = struct.Struct("!BBBHB")  # kind, qos, retain, topic length, properties
_PUBLISHED = struct.Struct("!BQB")  # kind, request id, error code (0 = ok)
_DONE = struct.Struct("!BQBfd")  # kind, delivery id, outcome, seconds in the handler, retry delay
_PUBLISH = struct.Struct("!BHIQBBHB")  # kind, slot, generation, request id, qos, retain, topic length, flags
_SUBSCRIBE = struct.Struct("!BB")  # kind, qos; the filter follows
_SLOT = struct.Struct("!BHI")  # kind, slot, generation (worker-up: the worker's socket is attached)
_RESTARTS = struct.Struct("!BQ")  # kind, running total; the cause follows
_SYNC = struct.Struct("!BHIQ")  # kind, slot, generation, last request id
_SYNC_ACK = struct.Struct("!BQ")  # kind, last request id; the request ids still in flight follow
_REQUEST_ID = struct.Struct("!Q")
_HELD = struct.Struct("!QH")  # holding: per delivery, its id and topic length; the topic follows
# The properties byte: none (MQTT 3.1.1), a block after the topic, or MQTT 5 with none set.
_NO_PROPERTIES, _PROPERTIES, _EMPTY_PROPERTIES = 0, 1, 2
_REQUEST = 4  # in a publish's flags: the agent sets the response topic to the worker's reply topic
# The block: which fields are set, payload format, expiry, lengths of content type, response topic
# and correlation data, number of user properties; then those bytes, then each user property as
# (name length, value length, name, value).
_PROPS = struct.Struct("!BBIHHHI")
_PAIR = struct.Struct("!HH")
_HAS_FORMAT, _HAS_EXPIRY, _HAS_TYPE, _HAS_RESPONSE, _HAS_CORRELATION = 1, 2, 4, 8, 16


_OUTCOMES = {int(o): o for o in Outcome}  # a dict lookup: ``Outcome(n)`` costs a µs per Done


class ChannelError(Exception):
    """A record that cannot be decoded: a bug, never a dead peer."""


GATHER_MIN = 4096
"""A payload at least this large stays its own buffer in an encoded record (``encode_parts``)."""

Encoded = bytes | tuple[bytes, bytes]
"""An encoded record: its bytes, or its head and its payload for ``sendmsg`` to gather."""


def encode_parts(record: Record) -> Encoded:
    """A record's bytes, except that a large payload stays out of the join: the channel hands it
    to the kernel as its own buffer, so it is not copied twice (into the record, then the
    datagram). The hot records (Done, a 3.1.1 Deliver, Publish) are laid out here directly."""
    if type(record) is Done:
        return _DONE.pack(DONE, record.delivery_id, record.outcome, record.seconds, record.retry_after)
    if isinstance(record, Deliver) and record.properties is None:  # MQTT 3.1.1
        topic = record.topic.encode()
        head = _DELIVER.pack(
            DELIVER, record.delivery_id, record.qos, record.retain, record.redelivered, len(topic), _NO_PROPERTIES
        )
        if len(record.payload) < GATHER_MIN:
            return b"".join((head, topic, record.payload))
        return head + topic, record.payload
    if type(record) is DeliverAt:
        return _encode_deliver_at(record)
    if isinstance(record, Publish):
        topic = record.topic.encode()
        flag, block = _encode_properties(record.properties)
        head = _PUBLISH.pack(
            PUBLISH,
            record.slot,
            record.generation,
            record.request_id,
            record.qos,
            record.retain,
            len(topic),
            flag | (_REQUEST if record.request else 0),
        )
        if len(record.payload) < GATHER_MIN:
            return b"".join((head, topic, *block, record.payload))
        return b"".join((head, topic, *block)), record.payload
    if isinstance(record, (Deliver, Reply)):
        parts = _head(record)
        if len(record.payload) < GATHER_MIN:
            return b"".join((*parts, record.payload))
        return b"".join(parts), record.payload
    return encode(record)


def _encode_deliver_at(record: DeliverAt) -> bytes:
    topic = record.topic.encode()
    flag, block = _encode_properties(record.properties)
    head = _DELIVER_AT.pack(
        DELIVER_AT,
        record.delivery_id,
        record.qos,
        record.retain,
        record.redelivered,
        len(topic),
        flag,
        record.offset,
        record.length,
    )
    return b"".join((head, topic, *block))


def _head(record: Deliver | Reply) -> tuple[bytes, ...]:
    """A Deliver with properties or a Reply: its bytes before the payload, which comes last."""
    topic = record.topic.encode()
    flag, block = _encode_properties(record.properties)
    if isinstance(record, Deliver):
        head = _DELIVER.pack(
            DELIVER, record.delivery_id, record.qos, record.retain, record.redelivered, len(topic), flag
        )
    else:
        head = _REPLY.pack(REPLY, record.qos, record.retain, len(topic), flag)
    return (head, topic, *block)


def encode(record: Record) -> bytes:
    """Serialize a record (all kinds but ``WorkerUp``, whose payload is a descriptor)."""
    if isinstance(record, (Done, Deliver, DeliverAt, Publish, Reply)):
        data = encode_parts(record)
        return data if isinstance(data, bytes) else b"".join(data)
    if isinstance(record, Published):
        return _PUBLISHED.pack(PUBLISHED, record.request_id, record.error)
    if isinstance(record, Subscribe):
        return _SUBSCRIBE.pack(SUBSCRIBE, record.qos) + record.topic_filter.encode()
    if isinstance(record, Unsubscribe):
        return bytes((UNSUBSCRIBE,)) + record.topic_filter.encode()
    if isinstance(record, Ready):
        return _SLOT.pack(READY, record.slot, record.generation)
    if isinstance(record, Retire):
        return _SLOT.pack(RETIRE, record.slot, record.generation)
    if isinstance(record, WorkerExited):
        return _SLOT.pack(WORKER_EXITED, record.slot, record.generation)
    if isinstance(record, Stop):
        return bytes((STOP,))
    if isinstance(record, StopAgent):
        return bytes((STOP_AGENT,))
    if isinstance(record, Restarts):
        return _RESTARTS.pack(RESTARTS, record.total) + record.cause.encode()
    if isinstance(record, AgentStarted):
        return bytes((AGENT_STARTED,))
    if isinstance(record, RingFile):  # its descriptor travels beside it (``channel.send``)
        return bytes((RING_FILE,))
    if isinstance(record, Sync):
        return _SYNC.pack(SYNC, record.slot, record.generation, record.last_request_id)
    if isinstance(record, SyncAck):
        return b"".join((_SYNC_ACK.pack(SYNC_ACK, record.last_request_id), *map(_REQUEST_ID.pack, record.in_flight)))
    if isinstance(record, Holding):
        parts = [_SLOT.pack(HOLDING, record.slot, record.generation)]
        for delivery_id, held_topic in record.deliveries:
            raw = held_topic.encode()
            parts += (_HELD.pack(delivery_id, len(raw)), raw)
        return b"".join(parts)
    raise TypeError(f"cannot encode {record!r}")


def encode_worker_up(record: WorkerUp) -> bytes:
    """A worker-up record's bytes; its socket travels beside them as a descriptor (``channel.send``)."""
    return _SLOT.pack(WORKER_UP, record.slot, record.generation)


def decode(data: bytes | memoryview, fds: list[int]) -> Record:
    """Turn one received record back into a record object; a worker-up takes a descriptor."""
    kind = data[0]
    if kind == DELIVER:
        _, did, qos, retain, redelivered, tlen, flag = _DELIVER.unpack_from(data)
        end = _DELIVER.size + tlen
        topic = str(data[_DELIVER.size : end], "utf-8")
        properties = None
        if flag:
            properties, end = _decode_properties(data, end, flag)
        return Deliver(did, topic, bytes(data[end:]), qos, bool(retain), bool(redelivered), properties)
    if kind == DELIVER_AT:
        _, did, qos, retain, redelivered, tlen, flag, offset, length = _DELIVER_AT.unpack_from(data)
        end = _DELIVER_AT.size + tlen
        topic = str(data[_DELIVER_AT.size : end], "utf-8")
        properties = _decode_properties(data, end, flag)[0] if flag else None
        return DeliverAt(did, topic, offset, length, qos, bool(retain), bool(redelivered), properties)
    if kind == RING_FILE:
        if not fds:
            raise ChannelError("ring record without its memory file")
        return RingFile(fds.pop(0))
    if kind == PUBLISHED:
        _, rid, error = _PUBLISHED.unpack(data)
        return Published(rid, error)
    if kind == DONE:
        _, did, outcome, seconds, retry_after = _DONE.unpack(data)
        return Done(did, _OUTCOMES[outcome] if outcome in _OUTCOMES else Outcome(outcome), seconds, retry_after)
    if kind == PUBLISH:
        _, slot, gen, rid, qos, retain, tlen, flags = _PUBLISH.unpack_from(data)
        end = _PUBLISH.size + tlen
        topic = str(data[_PUBLISH.size : end], "utf-8")
        properties = None
        if flags & 3:
            properties, end = _decode_properties(data, end, flags & 3)
        return Publish(slot, gen, rid, topic, bytes(data[end:]), qos, bool(retain), properties, bool(flags & _REQUEST))
    if kind == REPLY:
        _, qos, retain, tlen, flag = _REPLY.unpack_from(data)
        end = _REPLY.size + tlen
        topic = str(data[_REPLY.size : end], "utf-8")
        properties, end = _decode_properties(data, end, flag)
        return Reply(topic, bytes(data[end:]), qos, bool(retain), properties)
    if kind == SUBSCRIBE:
        return Subscribe(str(data[_SUBSCRIBE.size :], "utf-8"), data[1])
    if kind == UNSUBSCRIBE:
        return Unsubscribe(str(data[1:], "utf-8"))
    if kind == READY:
        return Ready(*_SLOT.unpack(data)[1:])
    if kind == RETIRE:
        return Retire(*_SLOT.unpack(data)[1:])
    if kind == WORKER_EXITED:
        return WorkerExited(*_SLOT.unpack(data)[1:])
    if kind == WORKER_UP:
        _, slot, gen = _SLOT.unpack(data)
        if not fds:
            raise ChannelError("worker-up record without its socket")
        sock = socket.socket(fileno=fds.pop(0))
        sock.setblocking(False)
        return WorkerUp(slot, gen, sock)
    if kind == STOP:
        return Stop()
    if kind == STOP_AGENT:
        return StopAgent()
    if kind == RESTARTS:
        (_, total) = _RESTARTS.unpack_from(data)
        return Restarts(str(data[_RESTARTS.size :], "utf-8"), total)
    if kind == AGENT_STARTED:
        return AgentStarted()
    if kind == SYNC:
        return Sync(*_SYNC.unpack(data)[1:])
    if kind == SYNC_ACK:
        (_, last) = _SYNC_ACK.unpack_from(data)
        return SyncAck(last, tuple(rid for (rid,) in _REQUEST_ID.iter_unpack(data[_SYNC_ACK.size :])))
    if kind == HOLDING:
        return _decode_holding(data)
    raise ChannelError(f"unknown record kind {kind}")


def _decode_holding(data: bytes | memoryview) -> Holding:
    _, slot, generation = _SLOT.unpack_from(data)
    pos, held = _SLOT.size, []
    while pos < len(data):
        delivery_id, length = _HELD.unpack_from(data, pos)
        pos += _HELD.size + length
        held.append((delivery_id, str(data[pos - length : pos], "utf-8")))
    return Holding(slot, generation, tuple(held))


def _encode_properties(properties: Properties | None) -> tuple[int, tuple[bytes, ...]]:
    """The properties byte and the block that follows the topic."""
    if properties is None:
        return _NO_PROPERTIES, ()
    if properties == EMPTY:
        return _EMPTY_PROPERTIES, ()
    p = properties
    bits = (
        (p.payload_format_indicator is not None and _HAS_FORMAT)
        | (p.message_expiry is not None and _HAS_EXPIRY)
        | (p.content_type is not None and _HAS_TYPE)
        | (p.response_topic is not None and _HAS_RESPONSE)
        | (p.correlation_data is not None and _HAS_CORRELATION)
    )
    content_type = p.content_type.encode() if p.content_type else b""
    response_topic = p.response_topic.encode() if p.response_topic else b""
    correlation = p.correlation_data or b""
    parts = [
        _PROPS.pack(
            bits,
            p.payload_format_indicator or 0,
            p.message_expiry or 0,
            len(content_type),
            len(response_topic),
            len(correlation),
            len(p.user_properties),
        ),
        content_type,
        response_topic,
        correlation,
    ]
    for name, value in p.user_properties:
        name_bytes, value_bytes = name.encode(), value.encode()
        parts += (_PAIR.pack(len(name_bytes), len(value_bytes)), name_bytes, value_bytes)
    return _PROPERTIES, tuple(parts)


def _decode_properties(data: bytes | memoryview, pos: int, flag: int) -> tuple[Properties, int]:
    """The properties announced by ``flag`` at ``pos``, and where the payload starts."""
    if flag == _EMPTY_PROPERTIES:
        return EMPTY, pos
    if flag != _PROPERTIES:
        raise ChannelError(f"unknown properties flag {flag}")
    bits, fmt, expiry, type_len, response_len, correlation_len, count = _PROPS.unpack_from(data, pos)
    pos += _PROPS.size
    content_type = str(data[pos : pos + type_len], "utf-8") if bits & _HAS_TYPE else None
    pos += type_len
    response_topic = str(data[pos : pos + response_len], "utf-8") if bits & _HAS_RESPONSE else None
    pos += response_len
    correlation = bytes(data[pos : pos + correlation_len]) if bits & _HAS_CORRELATION else None
    pos += correlation_len
    pairs = []
    for _ in range(count):
        name_len, value_len = _PAIR.unpack_from(data, pos)
        pos += _PAIR.size
        name = str(data[pos : pos + name_len], "utf-8")
        pos += name_len
        pairs.append((name, str(data[pos : pos + value_len], "utf-8")))
        pos += value_len
    return Properties(
        tuple(pairs),
        content_type,
        response_topic,
        correlation,
        expiry if bits & _HAS_EXPIRY else None,
        fmt if bits & _HAS_FORMAT else None,
    ), pos
