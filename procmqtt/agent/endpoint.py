"""A small HTTP/1.0 responder in one thread of the agent: ``[metrics]`` today, health checks later.

Why not ``http.server``. ``ThreadingHTTPServer`` spends a thread per connection, with no timeout
and no cap: 10,000 idle connections from any local user made 8,700 threads in the agent, kept its
loop from running (no message processed for ~135 s) and brought it near its descriptor limit.
Here everything a client can make the agent spend is bounded:

- one thread and one selector over non-blocking sockets: no client can block it;
- at most ``MAX_CONNECTIONS`` connections at once. While all are taken the thread stops accepting,
  so further clients wait in the kernel's accept queue (the ``listen`` backlog, then SYN retries)
  and cost the agent nothing, neither a descriptor nor a thread nor a byte;
- ``DEADLINE`` seconds per connection for the whole exchange, request and answer; then it is
  closed, so a slot frees at the latest ``DEADLINE`` after it was taken;
- a request head of at most ``MAX_REQUEST`` bytes (431 beyond it); a body is never read;
- handlers run at most ``HANDLER_SHARE`` of the time: after one that took t seconds the next
  waits t * (1 / share - 1), so clients asking in a loop cannot keep the GIL from the agent's loop.

What a client can still do is delay other clients' answers, by holding every slot; the agent's
loop, its descriptors and its delivery are out of its reach.

Routing is a table, path -> handler(Request) -> Response; GET only (405 otherwise), 404 for any
other path, ``Connection: close`` always. Handlers run in this thread, so they may read only what
is safe to read from another thread (``metrics.Counters`` says why its numbers are).
"""

from __future__ import annotations

import errno
import logging
import re
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from procmqtt.errors import ConfigError

MAX_CONNECTIONS = 32
"""Connections open at once; while all are taken, new ones wait in the kernel's accept queue."""
DEADLINE = 5.0
"""Seconds a connection may take in all, from accept to the last byte of the answer."""
MAX_REQUEST = 8192
"""Bytes of request line and headers; a longer head gets 431."""
MAX_DRAIN = 65536
"""Bytes read and dropped after the answer, before closing (``Endpoint._finish``)."""
HANDLER_SHARE = 0.2
"""At most this share of the time goes to handlers (e.g. rendering the metrics)."""
ACCEPT_PAUSE = 1.0
"""Seconds without accepting after ``accept`` fails (e.g. EMFILE), so the failure cannot spin."""
_POLL = 0.5  # the longest select(), so stop() is noticed
_HEAD_END = re.compile(rb"\r?\n\r?\n")

log = logging.getLogger("procmqtt.endpoint")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # names in lower case


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Response]


def parse(data: bytes) -> Request | Response | None:
    """The request whose head starts ``data``, None while the head is incomplete, or an error answer."""
    end = _HEAD_END.search(data, 0, MAX_REQUEST + 4)
    if end is None:
        return _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) if len(data) > MAX_REQUEST else None
    first, *lines = data[: end.start()].decode("latin-1").splitlines() or [""]
    parts = first.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _error(HTTPStatus.BAD_REQUEST)
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            return _error(HTTPStatus.BAD_REQUEST)
        headers[name.strip().lower()] = value.strip()
    try:
        target = urlsplit(parts[1])
        query = parse_qs(target.query)
    except ValueError:  # e.g. "//[x": an invalid IPv6 host
        return _error(HTTPStatus.BAD_REQUEST)
    return Request(parts[0], target.path, query, headers)


def _error(status: HTTPStatus, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, f"{status.value} {status.phrase}\n".encode(), (("Content-Type", "text/plain"), *headers))


def _encode(response: Response) -> bytes:
    status = HTTPStatus(response.status)
    lines = [
        f"HTTP/1.0 {status.value} {status.phrase}",
        *(f"{k}: {v}" for k, v in response.headers),
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + response.body


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    deadline: float  # time.monotonic() by which it is closed, answered or not
    received: bytearray = field(default_factory=bytearray)
    request: Request | None = None  # parsed, waiting for its handler's turn
    out: memoryview | None = None  # the answer's bytes not sent yet
    drain: int = 0  # answered: bytes still read and dropped before closing (see _finish)


class Endpoint:
    """Serves ``routes`` on a listening socket from one daemon thread; see the module docstring.

    The listening socket is not closed here: in procmqtt it belongs to the supervisor.
    """

    def __init__(
        self,
        listener: socket.socket,
        routes: Mapping[str, Handler],
        *,
        name: str,
        max_connections: int = MAX_CONNECTIONS,
        deadline: float = DEADLINE,
    ) -> None:
        self.listener = listener
        self.routes = dict(routes)
        self.max_connections = max_connections
        self.deadline = deadline
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, _Connection] = {}  # by fd
        self.waiting: deque[_Connection] = deque()  # parsed requests for a handler, oldest first
        self.next_handler = 0.0  # monotonic time before which no handler runs (HANDLER_SHARE)
        self.accept_again = 0.0  # monotonic time before which nothing is accepted (ACCEPT_PAUSE)
        self.accepting = False
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Endpoint:
        self.listener.setblocking(False)
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and end the thread (tests; the agent just exits)."""
        self._stop.set()
        self.thread.join(timeout)

    # --- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._listen(len(self.connections) < self.max_connections and time.monotonic() >= self.accept_again)
                self._step(self.selector.select(self._timeout()))
        except Exception:  # a bug here must not take the agent down: log it, answer no more
            log.exception("the %s endpoint stopped answering until the agent restarts", self.thread.name)
        finally:
            for conn in list(self.connections.values()):
                self._close(conn)
            self.selector.close()

    def _timeout(self) -> float:
        now = time.monotonic()
        wake = [now + _POLL, *(c.deadline for c in self.connections.values())]
        if self.waiting:
            wake.append(self.next_handler)
        if not self.accepting and len(self.connections) < self.max_connections:
            wake.append(self.accept_again)
        return max(0.0, min(wake) - now)

    def _listen(self, on: bool) -> None:
        if on != self.accepting:
            if on:
                self.selector.register(self.listener, selectors.EVENT_READ, None)
            else:
                self.selector.unregister(self.listener)
            self.accepting = on

    def _step(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in events:
            if key.data is None:
                self._accept()
                continue
            try:
                if mask & selectors.EVENT_READ:
                    self._read(key.data)
                elif mask & selectors.EVENT_WRITE:
                    self._write(key.data)
            except Exception:  # a bug one client triggers: that client's connection ends, not the thread
                log.exception("%s: a connection failed; closing it", self.thread.name)
                self._close(key.data)
        while self.waiting and time.monotonic() >= self.next_handler:
            self._handle(self.waiting.popleft())
        now = time.monotonic()
        for conn in [c for c in self.connections.values() if c.deadline <= now]:
            log.debug("closing a connection after %.1f s without a whole exchange", self.deadline)
            self._close(conn)

    def _accept(self) -> None:
        while len(self.connections) < self.max_connections:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                log.warning(
                    "%s: cannot accept a connection (%s); trying again in %.0f s",
                    self.thread.name,
                    exc.strerror or exc,
                    ACCEPT_PAUSE,
                )
                self.accept_again = time.monotonic() + ACCEPT_PAUSE
                self._listen(False)
                return
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + self.deadline)
            self.connections[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Connection) -> None:
        answered = conn.out is not None
        try:
            data = conn.sock.recv(conn.drain if answered else MAX_REQUEST + 1 - len(conn.received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client is gone (or reset)
            self._close(conn)
            return
        if answered:  # dropping what the client still sends
            conn.drain -= len(data)
            if conn.drain <= 0:
                self._close(conn)
            return
        conn.received += data
        found = parse(bytes(conn.received))
        if found is None:
            return
        self.selector.unregister(conn.sock)  # nothing more is read from it
        if isinstance(found, Response):
            self._send(conn, found)
        elif found.path not in self.routes:
            self._send(conn, _error(HTTPStatus.NOT_FOUND))
        elif found.method != "GET":
            self._send(conn, _error(HTTPStatus.METHOD_NOT_ALLOWED, (("Allow", "GET"),)))
        else:
            conn.request = found
            self.waiting.append(conn)

    def _handle(self, conn: _Connection) -> None:
        assert conn.request is not None
        began = time.monotonic()
        try:
            response = self.routes[conn.request.path](conn.request)
        except Exception:
            log.exception("%s: answering GET %s failed", self.thread.name, conn.request.path)
            response = _error(HTTPStatus.INTERNAL_SERVER_ERROR)
        spent = time.monotonic() - began
        self.next_handler = began + spent / HANDLER_SHARE
        self._send(conn, response)

    def _send(self, conn: _Connection, response: Response) -> None:
        conn.out = memoryview(_encode(response))
        self.selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)  # most answers fit the socket buffer: done at once

    def _write(self, conn: _Connection) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(conn.out)  # the client is gone: nothing more to send
        conn.out = conn.out[sent:]
        if not conn.out:
            self._finish(conn)

    def _finish(self, conn: _Connection) -> None:
        """Answered: close gently. Closing with request bytes still unread makes the kernel send a
        reset, which can destroy the answer before the client reads it (a 431, a body after the
        head). So the sending side is shut, and what the client still sends is read and dropped,
        up to ``MAX_DRAIN`` bytes and within the deadline, until it closes too."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.drain = MAX_DRAIN
        self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _close(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self.connections.pop(fd, None) is None:
            return
        if conn.request is not None and conn.out is None:
            self.waiting.remove(conn)
        try:
            self.selector.unregister(conn.sock)
        except KeyError:  # waiting for its handler: not registered
            pass
        conn.sock.close()


def listen(host: str, port: int, where: str) -> socket.socket:
    """In the supervisor, before any fork: a listening socket on ``host``:``port``, left open while
    agents come and go. ``where`` names the setting in errors, e.g. "procmqtt.toml: [metrics]".

    Raises ``ConfigError`` (exit 2) when the address is unusable or the port taken.
    """
    prefix = f"{where} cannot listen on {host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"{prefix}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        section = where.rsplit(" ", 1)[-1]
        taken = exc.errno == errno.EADDRINUSE
        hint = f" (another process uses that port; pick another {section} port)" if taken else ""
        raise ConfigError(f"{prefix}: {exc.strerror or exc}{hint}") from None
    return sock


def serve(
    listener: socket.socket,
    routes: Mapping[str, Handler],
    *,
    name: str,
    max_connections: int = MAX_CONNECTIONS,
    deadline: float = DEADLINE,
) -> Endpoint:
    """Answer ``routes`` on ``listener`` (bound and listening) from a new daemon thread."""
    return Endpoint(listener, routes, name=name, max_connections=max_connections, deadline=deadline).start()
