"""The broker's byte stream, read in bulk, with MQTT 3.1.1 PUBLISH packets decoded here.

paho reads a packet with three ``recv`` calls and spends about 20 µs of Python on each PUBLISH
(packet dicts, locks, an ``MQTTMessage``, callback lookup); for a flood of small messages that is
most of the agent's CPU. So the agent puts :class:`InboundBuffer` in place of paho's socket: one
``recv`` takes whatever the kernel holds, the PUBLISH packets at the head of the buffer are decoded
by :meth:`InboundBuffer.publishes` (a dozen lines of ``struct``), and every other packet (CONNACK,
SUBACK, PUBACK, PINGRESP, QoS 2, MQTT 5) is left to paho, one whole packet at a time.

paho never sees a partial packet: ``recv`` only hands out bytes up to the end of the packet the
agent released with :meth:`InboundBuffer.release`, and reports "would block" past it. So paho's
parser state is always "between packets" when the agent decodes, and the two never interleave.
Acknowledgements still go through paho (``client.ack``), so its outgoing queue stays the only writer.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

READ_SIZE = 256 * 1024
"""Bytes asked of the kernel per ``recv``."""

PUBLISH = 0x30

Inbound = tuple[str, bytes, int, int, bool, bool]
"""A decoded PUBLISH: topic, payload, qos, packet id, retain, dup."""


class InboundBuffer:
    """Stands in for paho's socket (``recv`` from the buffer, everything else passed through)."""

    __slots__ = ("buf", "error", "limit", "plain", "pos", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock  # a socket, an SSL socket, or paho's websocket wrapper
        self.buf = bytearray()
        self.pos = 0  # first byte not yet consumed
        self.limit = 0  # paho may read up to here: the end of the packet released to it
        self.error: OSError | EOFError | None = None  # end of stream or a socket error, after the buffer
        # A plain socket's short read means the kernel had no more; TLS and websockets hand out one
        # record or frame per call, so for them only "would block" says so.
        self.plain = isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)

    def __getattr__(self, name: str) -> Any:  # fileno, send, close, setblocking, pending, ...
        return getattr(self.sock, name)

    # --- paho's side ---------------------------------------------------------------------------

    def recv(self, size: int) -> bytes:
        if self.pos < self.limit:
            end = min(self.limit, self.pos + size)
            data = bytes(self.buf[self.pos:end])
            self.pos = end
            return data
        if self.error is not None and self.pos >= len(self.buf):
            if isinstance(self.error, EOFError):
                return b""  # paho's "connection lost"
            raise self.error
        raise BlockingIOError  # paho's "nothing more for now"

    # --- the agent's side ----------------------------------------------------------------------

    def fill(self, max_bytes: int) -> None:
        """Read what the socket holds, up to ``max_bytes`` buffered (more if the packet at the head
        is larger); never blocks."""
        if self.pos:
            del self.buf[:self.pos]
            self.limit -= self.pos
            self.pos = 0
        while self.error is None and len(self.buf) < max(max_bytes, self._head()[0]):
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                self.error = exc
                return
            if not data:
                self.error = EOFError()
                return
            self.buf += data
            if self.plain and len(data) < READ_SIZE:
                return

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
        buf, n = self.buf, len(self.buf)
        length, shift, i = 0, 0, self.pos + 1
        while i < n:
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                return i + length, i + length <= n
            shift += 7
            if shift > 21:  # a fifth length byte: paho reads it and reports the protocol error
                return i + 1, i < n
        return 0, False

    def release(self) -> bool:
        """Let paho read the packet at the head; after the end of the stream, all that is left and
        then the error. False if there is nothing whole to give it yet."""
        if self.error is not None:
            self.limit = len(self.buf)
            return True
        end, whole = self._head()
        if whole:
            self.limit = end
        return whole

    def publishes(self, max_count: int) -> list[Inbound]:
        """Decode the MQTT 3.1.1 QoS 0/1 PUBLISH packets at the head of the buffer, up to
        ``max_count``; stop at anything else, for paho to read."""
        buf, pos = self.buf, self.pos
        n = len(buf)
        out: list[Inbound] = []
        while len(out) < max_count and pos + 1 < n:
            header = buf[pos]
            if header & 0xF0 != PUBLISH or header & 0x06 > 0x02:  # not PUBLISH, or QoS 2 (or invalid)
                break
            length, shift, i = 0, 0, pos + 1
            while True:
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80 or i >= n or shift >= 21:
                    break
                shift += 7
            end = i + length
            if byte & 0x80 or end > n:
                break  # incomplete (or malformed: paho will say so)
            if length < 3:
                break  # too short to hold a topic: paho's error
            topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
            qos = (header >> 1) & 3
            start = topic_end + 2 if qos else topic_end
            if start > end or topic_end == i + 2:
                break  # malformed, or an empty topic: paho's error
            mid = buf[topic_end] << 8 | buf[topic_end + 1] if qos else 0
            try:
                topic = buf[i + 2:topic_end].decode()
            except UnicodeDecodeError:
                break  # paho's way with invalid UTF-8
            out.append((topic, bytes(buf[start:end]), qos, mid, bool(header & 1), bool(header & 8)))
            pos = end
        self.pos = self.limit = pos
        return out


def wrap_socket(client: Any) -> InboundBuffer | None:
    """Put an :class:`InboundBuffer` in place of a paho client's freshly connected socket.

    The one place procmqtt reaches into paho: its ``_sock`` attribute, which paho reads only through
    ``recv``. A paho without it keeps reading for itself (slower, same behaviour);
    tests/test_inbound.py checks the attribute so an upgrade that drops it is noticed.
    """
    sock = client.socket()
    if sock is None or getattr(client, "_sock", None) is not sock:
        return None
    wrapped = InboundBuffer(sock)
    client._sock = wrapped
    return wrapped
