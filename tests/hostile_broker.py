"""A tiny MQTT peer that sends what no real broker sends: a PUBLISH whose topic is not valid UTF-8,
a second CONNACK. A plain TCP server in a thread speaking just enough MQTT 3.1.1 and 5 (CONNACK,
SUBACK, UNSUBACK, PINGRESP, PUBREL for QoS 2) for the agent; everything the client sends is
recorded. Used by tests/test_hostile_broker.py: a protocol peer, not a mock of paho."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _length(len(body)) + body


def publish(topic: bytes, payload: bytes, qos: int, mid: int, v5: bool, properties: bytes = b"") -> bytes:
    """A PUBLISH with ``topic`` as raw bytes (valid UTF-8 or not); ``properties`` encoded (MQTT 5)."""
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    if v5:
        body += _length(len(properties)) + properties
    return packet(PUBLISH << 4 | qos << 1, body + payload)


class Connection:
    """One client connection: ``send`` raw bytes; the peer thread answers the rest."""

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock = sock
        self.index = index  # 0 for the first connection

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class HostileBroker:
    """Listens on a free loopback port. ``after_subscribe(conn)`` runs once per connection, after
    its first SUBACK is sent: the test's packets go there. ``received`` holds (connection index,
    packet type, packet id or None) for each packet the client sent."""

    def __init__(
        self,
        *,
        v5: bool,
        after_subscribe: Callable[[Connection], None],
        after_connack: Callable[[Connection], None] | None = None,
        drop_first_subscribe: bool = False,
        connack_properties: bytes = b"",
        refuse_shared: bool = False,
    ) -> None:
        """``drop_first_subscribe``: the first connection's first SUBSCRIBE gets no SUBACK; the
        connection is closed instead (a broker that went away mid-request). ``connack_properties``:
        MQTT 5 properties, encoded, for the CONNACK. ``refuse_shared``: every ``$share/`` filter
        gets a failure in the SUBACK (0x80; MQTT 5: 0x9E, "Shared Subscriptions not supported")."""
        self.v5 = v5
        self.drop_first_subscribe = drop_first_subscribe
        self.connack_properties = connack_properties
        self.refuse_shared = refuse_shared
        self.after_subscribe = after_subscribe
        self.after_connack = after_connack
        self.received: list[tuple[int, int, int | None]] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def acks(self, kind: int) -> list[int | None]:
        with self.lock:
            return [mid for _, t, mid in self.received if t == kind]

    def close(self) -> None:
        self.closed = True
        self.server.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            conn = Connection(sock, self.connections)
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read(self, sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _serve(self, conn: Connection) -> None:
        props = b"\x00" if self.v5 else b""
        subscribed = False
        try:
            with conn.sock:
                while True:
                    first = self._read(conn.sock, 1)[0]
                    length, shift = 0, 0
                    while True:
                        byte = self._read(conn.sock, 1)[0]
                        length |= (byte & 0x7F) << shift
                        shift += 7
                        if not byte & 0x80:
                            break
                    body = self._read(conn.sock, length)
                    kind = first >> 4
                    mid = (
                        struct.unpack("!H", body[:2])[0]
                        if kind in (PUBACK, PUBREC, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE)
                        else None
                    )
                    with self.lock:
                        self.received.append((conn.index, kind, mid))
                    if kind == CONNECT:
                        connack_props = _length(len(self.connack_properties)) + self.connack_properties
                        conn.send(packet(CONNACK << 4, b"\x00\x00" + (connack_props if self.v5 else b"")))
                        if self.after_connack is not None:
                            self.after_connack(conn)
                    elif kind == SUBSCRIBE and self.drop_first_subscribe and conn.index == 0:
                        return
                    elif kind == SUBSCRIBE:
                        filters = body[2:]
                        if self.v5:  # skip the property block
                            filters = filters[1 + filters[0] :] if filters[0] < 0x80 else filters
                        codes = b""
                        while filters:
                            n = struct.unpack("!H", filters[:2])[0]
                            refused = self.refuse_shared and filters[2 : 2 + n].startswith(b"$share/")
                            codes += (b"\x9e" if self.v5 else b"\x80") if refused else b"\x01"
                            filters = filters[3 + n :]
                        conn.send(packet(SUBACK << 4, body[:2] + props + codes))
                        if not subscribed:
                            subscribed = True
                            self.after_subscribe(conn)
                    elif kind == UNSUBSCRIBE:
                        conn.send(packet(UNSUBACK << 4, body[:2] + (props + b"\x00" if self.v5 else b"")))
                    elif kind == PUBREC:
                        conn.send(packet(PUBREL << 4 | 2, body[:2]))
                    elif kind == PINGREQ:
                        conn.send(packet(PINGRESP << 4, b""))
                    elif kind == DISCONNECT:
                        return
        except (EOFError, OSError):
            return


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
