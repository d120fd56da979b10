"""The broker's socket as paho sees it in the agent: read in bulk, written once per loop pass.

paho reads a packet with three ``recv`` calls and spends about 20 µs of Python on each PUBLISH
(packet dicts, locks, an ``MQTTMessage``, callback lookup), and writes every packet (each PUBACK)
with its own ``send``; for a flood of small messages that is most of the agent's CPU, and one TCP
segment per acknowledgement for the broker. So the agent puts :class:`BrokerSocket` in place of
paho's socket:

- Reading: one ``recv_into`` takes whatever the kernel holds; the PUBLISH packets at the head of
  the buffer are decoded by :meth:`BrokerSocket.publishes` (a dozen lines), and every other packet
  (CONNACK, SUBACK, PUBACK, PINGRESP, QoS 2, an MQTT 5 PUBLISH with properties) is left to paho,
  one whole packet at a time: ``recv`` only hands out bytes up to the end of the packet the agent
  released with :meth:`BrokerSocket.release`, and reports "would block" past it. So paho's parser is always
  between packets when the agent decodes, and the two never interleave.
- Writing: paho's ``send`` appends to a buffer that :meth:`BrokerSocket.flush` writes in one call
  at the end of the agent's pass (and ``close`` before the socket goes). A QoS 1 acknowledgement
  goes straight into the buffer (:meth:`BrokerSocket.puback`, the four bytes paho would write, at
  a tenth of its cost); only when the buffer is full does it go through paho's queue. The
  buffer is bounded: past ``WRITE_LIMIT`` bytes ``send`` says "would block", so a broker that stops
  reading leaves paho's packets in paho's queue and the agent's publishes unconfirmed (``outbox``).
  ``written`` and ``sent`` count the bytes taken from paho and handed to the kernel, so the agent
  confirms a QoS 0 publish only once its bytes are in the kernel.
- The read buffer grows for a packet larger than it and shrinks back to ``BUFFER_SIZE`` once that
  packet is consumed, so one large message does not pin its size in the agent.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from typing import Any

from procmqtt.agent.deliveries import Inbound
from procmqtt.ipc import poller

READ_SIZE = 256 * 1024
"""Bytes asked of the kernel per ``recv``."""
BUFFER_SIZE = 4 * READ_SIZE
"""The read buffer's normal size, kept while packets fit in it."""
WRITE_LIMIT = 1024 * 1024
"""Bytes paho may leave unsent in the write buffer; past it ``send`` would block (plus the one
packet that crossed it, taken whole: paho copies the rest of a packet at every partial send)."""

PUBLISH = 0x30
_PUBACK = struct.Struct("!BBH")  # PUBACK, remaining length 2, packet id (MQTT 5 too: reason 0 omitted)


class BrokerSocket:
    """Stands in for paho's socket: ``recv`` from the read buffer, ``send`` into the write buffer,
    everything else passed through.

    ``buf`` is allocated once and filled with ``recv_into``: no per-read allocation, no copy to
    append. Bytes between ``pos`` and ``end`` are unread; they move to the front only when the
    free space at the back runs short.
    """

    __slots__ = ("buf", "end", "error", "limit", "out", "plain", "pos", "sent", "sock", "written")

    def __init__(self, sock: Any) -> None:
        self.sock = sock  # a socket, an SSL socket, or paho's websocket wrapper
        self.buf = bytearray(BUFFER_SIZE)
        self.pos = 0  # first byte not yet consumed
        self.end = 0  # end of the bytes read
        self.limit = 0  # paho may read up to here: the end of the packet released to it
        self.error: OSError | EOFError | None = None  # end of stream or a socket error, after the buffer
        self.out = bytearray()  # what paho wrote, not yet sent
        self.written = 0  # bytes paho has written into ``out``, ever
        self.sent = 0  # bytes of those the kernel has taken
        # A plain socket's short read means the kernel had no more; TLS and websockets hand out one
        # record or frame per call, so for them only "would block" says so.
        self.plain = isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Writes are already batched, one per pass: Nagle would only hold a publish behind the
            # broker's delayed ACK of the previous write (40 ms per confirmed publish on Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __getattr__(self, name: str) -> Any:  # fileno, setblocking, pending, ...
        return getattr(self.sock, name)

    # --- paho's side ---------------------------------------------------------------------------

    def recv(self, size: int) -> bytes:
        if self.pos < self.limit:
            end = min(self.limit, self.pos + size)
            with memoryview(self.buf) as view, view[self.pos : end] as part:
                data = bytes(part)
            self.pos = end
            if end == self.limit:
                self._shrink()
            return data
        if self.error is not None and self.pos >= self.end:
            if isinstance(self.error, EOFError):
                return b""  # paho's "connection lost"
            raise self.error
        raise BlockingIOError  # paho's "nothing more for now"

    def send(self, data: bytes | bytearray) -> int:
        if isinstance(self.error, OSError):
            raise self.error  # paho's "connection lost"
        if self.full():
            raise BlockingIOError  # paho keeps the packet queued and tries again next pass
        self.out += data
        self.written += len(data)
        return len(data)

    def puback(self, mid: int) -> bool:
        """Acknowledge a QoS 1 PUBLISH: its PUBACK into the write buffer, as paho's ``send`` would
        take it; False when the buffer is full or the connection failed (paho's ``ack`` then queues
        it or hears of the failure)."""
        if self.error is not None or len(self.out) >= WRITE_LIMIT:  # full()
            return False
        self.out += _PUBACK.pack(0x40, 2, mid)
        self.written += _PUBACK.size
        return True

    def close(self) -> None:
        """paho closes right after writing DISCONNECT: what it wrote goes first (for up to 2 s)."""
        deadline = time.monotonic() + 2.0
        while not self.flush() and time.monotonic() < deadline:
            try:
                poller.wait([], [self.sock], 0.1)
            except poller.ClosedUnderUs:
                break
        self.sock.close()

    # --- the agent's side ----------------------------------------------------------------------

    def flush(self) -> bool:
        """Send what paho wrote, without blocking; True when nothing is left."""
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            except OSError as exc:  # paho hears of it at its next read or write
                self.out.clear()
                if self.error is None:
                    self.error = exc
                return True
            del self.out[:sent]
            self.sent += sent
        return True

    def full(self) -> bool:
        """paho's next ``send`` would block: the broker is not reading fast enough."""
        return len(self.out) >= WRITE_LIMIT

    def fill(self, max_bytes: int) -> None:
        """Read what the socket holds, up to ``max_bytes`` unread (more if the packet at the head
        is larger); never blocks."""
        if self.pos == self.end:
            self.pos = self.end = self.limit = 0
            self._shrink()
        while self.error is None and self.end - self.pos < max(max_bytes, self._head()[0] - self.pos):
            if len(self.buf) - self.end < READ_SIZE:
                self._make_room()
            try:
                with memoryview(self.buf) as view, view[self.end :] as space:  # released before any resize
                    count = self.sock.recv_into(space) if self.plain else self._recv_into(space)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                self.error = exc
                return
            if not count:
                self.error = EOFError()
                return
            self.end += count
            if self.plain and self.end < len(self.buf):
                return  # a short read: the kernel had no more

    def _recv_into(self, space: memoryview) -> int:
        data = self.sock.recv(len(space))  # paho's websocket wrapper has no recv_into
        space[: len(data)] = data
        return len(data)

    def _make_room(self) -> None:
        """Move the unread bytes to the front; grow for a packet larger than the buffer."""
        need = max(self._head()[0] - self.pos, self.end - self.pos) + READ_SIZE
        if need > len(self.buf):
            self._move(need)
        elif self.pos:
            self._move(len(self.buf))

    def _shrink(self) -> None:
        """Back to ``BUFFER_SIZE`` once the large packet that grew the buffer is consumed."""
        if len(self.buf) > BUFFER_SIZE and max(self._head()[0], self.end) - self.pos + READ_SIZE <= BUFFER_SIZE:
            self._move(BUFFER_SIZE)

    def _move(self, size: int) -> None:
        """The unread bytes to the front of a buffer of ``size`` bytes: one copy of them only. A new
        buffer's untouched pages take no memory, so growing never copies or zeroes more."""
        unread = self.end - self.pos
        if size == len(self.buf):
            self.buf[:unread] = self.buf[self.pos : self.end]
        else:
            buf = bytearray(size)
            with memoryview(self.buf) as view:
                buf[:unread] = view[self.pos : self.end]
            self.buf = buf
        self.limit = max(0, self.limit - self.pos)
        self.pos, self.end = 0, unread

    def waiting(self) -> bool:
        """Something to act on that ``select`` on the socket would not announce: a whole packet in
        the buffer, the end of the stream, or bytes inside the TLS layer."""
        if self._head()[1] or self.error is not None:
            return True
        pending = getattr(self.sock, "pending", None)
        return bool(pending is not None and pending())

    def _head(self) -> tuple[int, bool]:
        """End offset of the packet at the head of the buffer (0 while its length is unknown), and
        whether all of it is here."""
        end = self._frame(self.pos)[1]
        return end, 0 < end <= self.end

    def _frame(self, pos: int) -> tuple[int, int]:
        """Where the packet starting at ``pos`` has its body and where it ends, from its remaining
        length; the end is 0 while the length is not all here."""
        buf, n = self.buf, self.end
        length, shift, i = 0, 0, pos + 1
        while i < n:
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                return i, i + length
            shift += 7
            if shift > 21:  # a fifth length byte: paho reads it and reports the protocol error
                return i + 1, i + 1
        return i, 0

    def release(self) -> bool:
        """Let paho read the packet at the head; after the end of the stream, all that is left and
        then the error. False if there is nothing whole to give it yet."""
        if self.error is not None:
            self.limit = self.end
            return True
        end, whole = self._head()
        if whole:
            self.limit = end
        return whole

    def publishes(self, max_count: int, v5: bool = False) -> list[Inbound]:
        """Decode the QoS 0/1 PUBLISH packets at the head of the buffer, up to ``max_count``; stop at
        anything else, for paho to read. With ``v5`` (an MQTT 5 connection) only packets without
        properties are decoded here: a property block goes to paho, which knows them all."""
        buf, pos, n = self.buf, self.pos, self.end
        out: list[Inbound] = []
        new = tuple.__new__  # Inbound(...) without its Python __new__: half the cost, per message
        with memoryview(buf) as view:  # payloads: one copy each, straight from the buffer
            while len(out) < max_count and pos + 1 < n:
                header = buf[pos]
                if header & 0xF0 != PUBLISH or header & 0x06 > 0x02:  # not PUBLISH, or QoS 2 (or invalid)
                    break
                i, end = self._frame(pos)
                if not end or end > n:
                    break  # incomplete
                if end - i < 3:
                    break  # too short to hold a topic (or a malformed length): paho's error
                topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
                qos = (header >> 1) & 3
                start = topic_end + 2 if qos else topic_end
                if start > end or topic_end == i + 2:
                    break  # malformed, or an empty topic (or a topic alias): paho's
                if v5:
                    if start >= end or buf[start]:
                        break  # properties (their length is not 0): paho's
                    start += 1
                mid = buf[topic_end] << 8 | buf[topic_end + 1] if qos else 0
                try:
                    topic = buf[i + 2 : topic_end].decode()
                except UnicodeDecodeError:
                    break  # paho's way with invalid UTF-8
                out.append(new(Inbound, (topic, bytes(view[start:end]), qos, mid, bool(header & 1), bool(header & 8))))
                pos = end
        self.pos = self.limit = pos
        if out:
            self._shrink()
        return out


def wrap_socket(client: Any) -> BrokerSocket | None:
    """Put an :class:`BrokerSocket` in place of a paho client's freshly connected socket.

    The one place procmqtt reaches into paho: its ``_sock`` attribute, which paho reads only through
    ``recv``. A paho without it keeps reading for itself (slower, same behaviour);
    tests/test_inbound.py checks the attribute so an upgrade that drops it is noticed.
    """
    sock = client.socket()
    if sock is None or getattr(client, "_sock", None) is not sock:
        return None
    wrapped = BrokerSocket(sock)
    client._sock = wrapped
    return wrapped
