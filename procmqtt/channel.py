"""Record channels between the supervisor, the agent and the workers.

Every channel is an ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair. The kernel queues each ``sendmsg``
as one whole datagram or not at all, and hands each one out whole to one ``recvmsg``. So a process
killed at any instant, mid-send or mid-receive, can neither leave a torn record behind nor hold a
lock that others wait on: the failure that wedges ``multiprocessing.Queue`` cannot happen here.

A datagram carries one or more length-prefixed records, so a burst costs one system call.
A datagram too large to travel inline (``INLINE_MAX``) is written to an anonymous memory file
whose descriptor rides in the datagram (``SCM_RIGHTS``). The datagram with its descriptor is still one
atomic unit, so large payloads need no chunking and no reassembly state that a dead writer could
leave half-filled. The same descriptor passing carries a new worker's socket to the agent.

Record layouts are ``struct`` formats, not pickles; the first byte is the kind.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Union

from .message import Outcome

INLINE_MAX = 128 * 1024
"""Largest datagram sent inline; a larger record goes through a memory file."""

SOCKET_BUFFER = 1024 * 1024
"""Requested send buffer per socket (the kernel caps it at net.core.wmem_max)."""

_MAX_FDS = 4
_ANCDATA_SIZE = socket.CMSG_SPACE(_MAX_FDS * struct.calcsize("i"))

# Kinds: downstream (agent -> worker)
DELIVER = 1
PUBLISHED = 2
STOP = 3
# Kinds: upstream (workers and supervisor -> agent)
DONE = 10
PUBLISH = 11
SUBSCRIBE = 12
UNSUBSCRIBE = 13
RETIRE = 14
READY = 16
WORKER_UP = 20
STOP_AGENT = 21
RESTARTS = 22
# A record stored in the attached memory file.
BLOB = 255

_DELIVER = struct.Struct("!BQBBBH")  # kind, delivery id, qos, retain, redelivered, topic length
_PUBLISHED = struct.Struct("!BQB")  # kind, request id, error code (0 = ok)
_DONE = struct.Struct("!BQBf")  # kind, delivery id, outcome, seconds spent in the handler
_PUBLISH = struct.Struct("!BHIQBBH")  # kind, slot, generation, request id, qos, retain, topic length
_SUBSCRIBE = struct.Struct("!BB")  # kind, qos; the filter follows
_FRAME = struct.Struct("!I")  # length of one record inside a datagram
_SLOT = struct.Struct("!BHI")  # kind, slot, generation (worker-up: the worker's socket is attached)
_RESTARTS = struct.Struct("!BQ")  # kind, running total; the cause follows


@dataclass(frozen=True, slots=True)
class Deliver:
    delivery_id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    redelivered: bool


@dataclass(frozen=True, slots=True)
class Published:
    request_id: int
    error: int


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Done:
    delivery_id: int
    outcome: Outcome = Outcome.OK
    seconds: float = 0.0  # time in the handler, for the processing-time metric

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAILED


@dataclass(frozen=True, slots=True)
class Publish:
    slot: int
    generation: int
    request_id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic_filter: str
    qos: int


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic_filter: str


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker finished on_start: the agent may give it messages."""

    slot: int
    generation: int


@dataclass(frozen=True, slots=True)
class Retire:
    """The worker wants to be replaced (recycling): send it nothing more, then a stop."""

    slot: int
    generation: int


@dataclass(frozen=True, slots=True)
class WorkerUp:
    slot: int
    generation: int
    sock: socket.socket


@dataclass(frozen=True, slots=True)
class StopAgent:
    pass


@dataclass(frozen=True, slots=True)
class Restarts:
    """The supervisor's running total of worker restarts for one cause, for the metrics.

    A total, not an increment: a new agent is sent every total, and one that also reads a record
    queued for its dead predecessor counts nothing twice.
    """

    cause: str
    total: int


Record = Union[Deliver, Published, Stop, Done, Publish, Subscribe, Unsubscribe, Ready, Retire,
               WorkerUp, StopAgent, Restarts]


class ChannelError(Exception):
    """A record that cannot be decoded: a bug, never a dead peer."""


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected channel; created in the supervisor before fork."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except OSError:  # pragma: no cover - the kernel keeps its default
            pass
    return a, b


def encode(record: Record) -> bytes:
    """Serialize a record (all kinds but ``WorkerUp``, whose payload is a descriptor)."""
    if isinstance(record, Deliver):
        topic = record.topic.encode()
        head = _DELIVER.pack(DELIVER, record.delivery_id, record.qos, record.retain,
                             record.redelivered, len(topic))
        return b"".join((head, topic, record.payload))
    if isinstance(record, Published):
        return _PUBLISHED.pack(PUBLISHED, record.request_id, record.error)
    if isinstance(record, Done):
        return _DONE.pack(DONE, record.delivery_id, record.outcome, record.seconds)
    if isinstance(record, Publish):
        topic = record.topic.encode()
        head = _PUBLISH.pack(PUBLISH, record.slot, record.generation, record.request_id,
                             record.qos, record.retain, len(topic))
        return b"".join((head, topic, record.payload))
    if isinstance(record, Subscribe):
        return _SUBSCRIBE.pack(SUBSCRIBE, record.qos) + record.topic_filter.encode()
    if isinstance(record, Unsubscribe):
        return bytes((UNSUBSCRIBE,)) + record.topic_filter.encode()
    if isinstance(record, Ready):
        return _SLOT.pack(READY, record.slot, record.generation)
    if isinstance(record, Retire):
        return _SLOT.pack(RETIRE, record.slot, record.generation)
    if isinstance(record, Stop):
        return bytes((STOP,))
    if isinstance(record, StopAgent):
        return bytes((STOP_AGENT,))
    if isinstance(record, Restarts):
        return _RESTARTS.pack(RESTARTS, record.total) + record.cause.encode()
    raise TypeError(f"cannot encode {record!r}")


def decode(data: bytes | memoryview, fds: list[int]) -> Record:
    """Turn one received record back into a record object; a worker-up takes a descriptor."""
    kind = data[0]
    if kind == DELIVER:
        _, did, qos, retain, redelivered, tlen = _DELIVER.unpack_from(data)
        start = _DELIVER.size
        topic = str(data[start:start + tlen], "utf-8")
        return Deliver(did, topic, bytes(data[start + tlen:]), qos, bool(retain), bool(redelivered))
    if kind == PUBLISHED:
        _, rid, error = _PUBLISHED.unpack(data)
        return Published(rid, error)
    if kind == DONE:
        _, did, outcome, seconds = _DONE.unpack(data)
        return Done(did, Outcome(outcome), seconds)
    if kind == PUBLISH:
        _, slot, gen, rid, qos, retain, tlen = _PUBLISH.unpack_from(data)
        start = _PUBLISH.size
        topic = str(data[start:start + tlen], "utf-8")
        return Publish(slot, gen, rid, topic, bytes(data[start + tlen:]), qos, bool(retain))
    if kind == SUBSCRIBE:
        return Subscribe(str(data[_SUBSCRIBE.size:], "utf-8"), data[1])
    if kind == UNSUBSCRIBE:
        return Unsubscribe(str(data[1:], "utf-8"))
    if kind == READY:
        return Ready(*_SLOT.unpack(data)[1:])
    if kind == RETIRE:
        return Retire(*_SLOT.unpack(data)[1:])
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
        return Restarts(str(data[_RESTARTS.size:], "utf-8"), total)
    raise ChannelError(f"unknown record kind {kind}")


def _memory_file(data: bytes) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("procmqtt-record", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux
        fd = os.dup(tempfile.TemporaryFile().fileno())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def _read_memory_file(fd: int) -> bytes:
    try:
        size = os.fstat(fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _send_datagram(sock: socket.socket, body: bytes, fds: list[int], block: bool) -> bool:
    flags = 0 if block else socket.MSG_DONTWAIT
    fd_to_close = None
    if len(body) > INLINE_MAX:
        fd_to_close = _memory_file(body)
        body, fds = bytes((BLOB,)), [*fds, fd_to_close]
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        sock.sendmsg([body], ancillary, flags)
        return True
    except BlockingIOError:
        return False
    finally:
        if fd_to_close is not None:
            os.close(fd_to_close)


def send(sock: socket.socket, record: Record, *, block: bool = True) -> bool:
    """Send one record. Returns False only when ``block`` is False and the channel is full.

    Raises ``OSError`` (EPIPE, ECONNRESET) when the peer is gone for good.
    """
    if isinstance(record, WorkerUp):
        data = _SLOT.pack(WORKER_UP, record.slot, record.generation)
        return _send_datagram(sock, _FRAME.pack(len(data)) + data, [record.sock.fileno()], block)
    return send_many(sock, deque([encode(record)]), block=block)


def send_many(sock: socket.socket, queue: deque[bytes], *, block: bool = True) -> bool:
    """Send encoded records from the left of ``queue``, as few datagrams as fit, popping what went.

    Batching is what makes the hot path cheap: one system call carries many records. Returns
    False when ``block`` is False and the channel filled up before the queue was empty.
    """
    while queue:
        frames: list[bytes] = []
        size = 0
        for data in queue:
            if frames and size + _FRAME.size + len(data) > INLINE_MAX:
                break
            frames += (_FRAME.pack(len(data)), data)
            size += _FRAME.size + len(data)
        if not _send_datagram(sock, b"".join(frames), [], block):
            return False
        for _ in range(len(frames) // 2):
            queue.popleft()
    return True


_buffer = bytearray(INLINE_MAX + 64)  # one reader per process at a time (the worker holds a lock)
_view = memoryview(_buffer)


def receive(sock: socket.socket) -> list[Record] | None:
    """The records of one datagram; None at end of file (every peer closed its end).

    Raises ``BlockingIOError`` on a non-blocking socket with nothing queued.
    """
    nbytes, ancdata, msg_flags, _ = sock.recvmsg_into([_view], _ANCDATA_SIZE)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % struct.calcsize("i")
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or nbytes == 0:
        for fd in fds:
            os.close(fd)
        if nbytes == 0:
            return None
        raise ChannelError("truncated record")
    body: bytes | memoryview = _view[:nbytes]
    if nbytes == 1 and body[0] == BLOB:
        if not fds:
            raise ChannelError("blob record without its memory file")
        body = _read_memory_file(fds.pop())
    records = []
    pos = 0
    while pos < len(body):
        (length,) = _FRAME.unpack_from(body, pos)
        pos += _FRAME.size
        records.append(decode(body[pos:pos + length], fds))
        pos += length
    return records


def is_gone(exc: OSError) -> bool:
    """True when a send failed because the peer closed its end."""
    return exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
