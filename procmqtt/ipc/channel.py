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

This module is the transport; the records live in ``procmqtt.ipc.records``, their byte layouts in ``procmqtt.ipc.codec``
and are re-exported here, so users write ``channel.Deliver``, ``channel.send`` alike. Sockets are
made in the supervisor before fork (``pair``); sending and receiving run in every process.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import tempfile
import threading
from collections import deque

from procmqtt.ipc.codec import GATHER_MIN, ChannelError, Encoded, decode, encode, encode_parts, encode_worker_up
from procmqtt.ipc.records import (  # re-exported: channel.<Record> is how the package names them
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

INLINE_MAX = 128 * 1024
"""Largest datagram sent inline; a larger record goes through a memory file."""

SOCKET_BUFFER = 1024 * 1024
"""Requested send buffer per socket (the kernel caps it at net.core.wmem_max)."""

_MAX_FDS = 4
_ANCDATA_SIZE = socket.CMSG_SPACE(_MAX_FDS * struct.calcsize("i"))

_FRAME = struct.Struct("!I")  # length of one record inside a datagram
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)  # a plain int: flag enums' & and | are Python calls
BLOB = 255
"""The kind byte of a datagram whose records are in the attached memory file."""

__all__ = [
    "AGENT_STARTED",
    "BLOB",
    "DELIVER",
    "DELIVER_AT",
    "DONE",
    "GATHER_MIN",
    "HOLDING",
    "INLINE_MAX",
    "PUBLISH",
    "PUBLISHED",
    "READY",
    "REPLY",
    "RESTARTS",
    "RETIRE",
    "RING_FILE",
    "SOCKET_BUFFER",
    "STOP",
    "STOP_AGENT",
    "SUBSCRIBE",
    "SYNC",
    "SYNC_ACK",
    "UNSUBSCRIBE",
    "WORKER_EXITED",
    "WORKER_UP",
    "AgentStarted",
    "ChannelError",
    "Deliver",
    "DeliverAt",
    "Done",
    "Encoded",
    "Holding",
    "Publish",
    "Published",
    "Ready",
    "Record",
    "Reply",
    "Restarts",
    "Retire",
    "RingFile",
    "Stop",
    "StopAgent",
    "Subscribe",
    "Sync",
    "SyncAck",
    "Unsubscribe",
    "WorkerExited",
    "WorkerUp",
    "decode",
    "encode",
    "encode_parts",
    "encode_worker_up",
    "is_gone",
    "pair",
    "receive",
    "send",
    "send_many",
]


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected channel; created in the supervisor before fork."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except OSError:  # pragma: no cover - the kernel keeps its default
            pass
    return a, b


def _memory_file(parts: list[bytes]) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("procmqtt-record", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]
    return fd


def _map_memory_file(fd: int) -> mmap.mmap | bytes:
    """The memory file's bytes, mapped rather than read: ``decode`` copies each payload out of the
    mapping once, where reading it first would copy it twice. The descriptor is closed here; the
    mapping stays valid until the caller closes it."""
    try:
        size = os.fstat(fd).st_size
        if not size:
            return b""
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def _send_datagram(sock: socket.socket, parts: list[bytes], size: int, fds: list[int], block: bool) -> bool:
    """One datagram of ``size`` bytes gathered from ``parts`` by the kernel (still one atomic
    ``sendmsg``), or a memory file of them if it is too large to go inline."""
    flags = 0 if block else socket.MSG_DONTWAIT
    fd_to_close = None
    if size > INLINE_MAX:
        fd_to_close = _memory_file(parts)
        parts, fds = [bytes((BLOB,))], [*fds, fd_to_close]
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        sock.sendmsg(parts, ancillary, flags)
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
        data = encode_worker_up(record)
        body = _FRAME.pack(len(data)) + data
        return _send_datagram(sock, [body], len(body), [record.sock.fileno()], block)
    if isinstance(record, RingFile):
        body = _FRAME.pack(1) + encode(record)
        return _send_datagram(sock, [body], len(body), [record.fd], block)
    return send_many(sock, deque([encode_parts(record)]), block=block)


def send_many(sock: socket.socket, queue: deque[Encoded], *, block: bool = True) -> bool:
    """Send encoded records from the left of ``queue``, as few datagrams as fit, popping what went.

    Batching is what makes the hot path cheap: one system call carries many records. Small records
    are joined; a large payload (``encode_parts``) is its own buffer for ``sendmsg`` to gather, so
    it is copied once, by the kernel. Returns False when ``block`` is False and the channel filled
    up before the queue was empty.
    """
    while queue:
        parts: list[bytes] = []  # runs of joined bytes and large payloads, in order
        run: list[bytes] = []
        size = count = 0
        for data in queue:
            if isinstance(data, bytes):
                length = len(data)
                if count and size + _FRAME.size + length > INLINE_MAX:
                    break
                run += (_FRAME.pack(length), data)
            else:
                head, payload = data
                length = len(head) + len(payload)
                if count and size + _FRAME.size + length > INLINE_MAX:
                    break
                run += (_FRAME.pack(length), head)
                parts += (b"".join(run), payload)
                run = []
            size += _FRAME.size + length
            count += 1
        if run:
            parts.append(b"".join(run))
        if not _send_datagram(sock, parts, size, [], block):
            return False
        for _ in range(count):
            queue.popleft()
    return True


_local = threading.local()  # one receive buffer per thread: records are parsed from it in place

HEAP_KEPT = 4 * 1024 * 1024
"""Freed heap the C allocator may keep rather than give back (glibc: up to twice this)."""


def _keep_freed_heap() -> None:
    """Payloads of 64 KiB or so are allocated and freed once per message (the agent's copy out of
    the broker's stream, ``decode``'s in the worker). glibc gives the top of its heap back to the
    kernel as soon as 128 KiB of it are free, so the next payload faults its pages in again: 2-5
    page faults per 64 KiB message. Freeing one block larger than glibc's mmap threshold raises
    that threshold to the block's size and the trim threshold to twice it (mallopt(3), "dynamic
    mmap threshold"): then up to ``2 x HEAP_KEPT`` of freed heap stays with the process for the
    next payloads. 4 MiB because the agent holds a broker window of payloads and its read-ahead at
    once, 1-4 MiB of 64 KiB messages, which rises and falls with every pass; at 1 MiB (trim at 2)
    it still faulted 1-2 pages per message. Other allocators ignore this. The block is ``bytes``:
    calloc on a fresh mapping does not write it, so this costs one mmap and munmap, no page."""
    block = bytes(HEAP_KEPT + 1)  # above the default threshold (128 KiB): mapped, and unmapped here
    del block


def _receive_view() -> memoryview:
    view = getattr(_local, "view", None)
    if view is None:
        _keep_freed_heap()
        view = _local.view = memoryview(bytearray(INLINE_MAX + 64))
    return view


def receive(sock: socket.socket) -> list[Record] | None:
    """The records of one datagram; None at end of file (every peer closed its end).

    Raises ``BlockingIOError`` on a non-blocking socket with nothing queued.
    """
    view = _receive_view()
    nbytes, ancdata, msg_flags, _ = sock.recvmsg_into([view], _ANCDATA_SIZE)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % struct.calcsize("i")
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    if msg_flags & _TRUNCATED or nbytes == 0:
        for fd in fds:
            os.close(fd)
        if nbytes == 0:
            return None
        raise ChannelError("truncated record")
    if nbytes == 1 and view[0] == BLOB:
        if not fds:
            raise ChannelError("blob record without its memory file")
        mapped = _map_memory_file(fds.pop())
        try:
            with memoryview(mapped) as body:  # released before the mapping closes
                return _records(body, fds)
        finally:
            if isinstance(mapped, mmap.mmap):
                try:
                    mapped.close()
                except BufferError:  # a decode error's traceback still holds a view: unmapped when freed
                    pass
    return _records(view[:nbytes], fds)


def _records(body: memoryview, fds: list[int]) -> list[Record]:
    """The length-prefixed records of one datagram; each decoded into values of its own."""
    records = []
    pos = 0
    while pos < len(body):
        (length,) = _FRAME.unpack_from(body, pos)
        pos += _FRAME.size
        records.append(decode(body[pos : pos + length], fds))
        pos += length
    return records


def is_gone(exc: OSError) -> bool:
    """True when a send failed because the peer closed its end."""
    return exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
