"""The HTTP responder behind ``[metrics]``: its routing and bounds in-process, then under attack in a real run."""

from __future__ import annotations

import gzip
import os
import socket
import time
from collections.abc import Iterator

import pytest
from harness import free_port, publish_all, publisher, records, start, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metrics import busy_counters, scrape, with_metrics

from procmqtt.agent import endpoint, metrics


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield sock
    sock.close()


def served(listener: socket.socket, routes: dict[str, endpoint.Handler], **bounds: float) -> endpoint.Endpoint:
    return endpoint.serve(listener, routes, name="test-endpoint", **bounds)  # type: ignore[arg-type]


def ask(port: int, request: bytes, timeout: float = 3) -> bytes:
    """Send ``request`` raw and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def hello(request: endpoint.Request) -> endpoint.Response:
    body = f"hello {request.query.get('n', ['?'])[0]}\n".encode()
    return endpoint.Response(200, body, (("Content-Type", "text/plain"),))


# --- in-process -----------------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_routes_and_errors(listener):
    port = listener.getsockname()[1]
    server = served(listener, {"/hello": hello})
    try:
        answer = ask(port, b"GET /hello?n=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello 3\n")
        assert b"Content-Length: 8\r\n" in answer and b"Connection: close\r\n" in answer
        assert ask(port, b"GET /hello HTTP/1.0\n\n").endswith(b"hello ?\n")  # bare newlines too
        assert ask(port, b"GET /other HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 Not Found\r\n")
        not_get = ask(port, b"POST /hello HTTP/1.0\r\nContent-Length: 2\r\n\r\nab")
        assert not_get.startswith(b"HTTP/1.0 405 Method Not Allowed\r\n") and b"Allow: GET\r\n" in not_get
        assert ask(port, b"hello\r\n\r\n").startswith(b"HTTP/1.0 400 Bad Request\r\n")
        assert ask(port, b"\r\n\r\n").startswith(b"HTTP/1.0 400 Bad Request\r\n")
        assert ask(port, b"GET //[x HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 400 Bad Request\r\n")
        assert ask(port, b"\xff\xfe /\x00 HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 ")
        assert ask(port, b"GET /hello HTTP/1.0\r\nno colon\r\n\r\n").startswith(b"HTTP/1.0 400 ")
        huge = b"GET /hello HTTP/1.0\r\nX: " + b"a" * endpoint.MAX_REQUEST + b"\r\n\r\n"
        assert ask(port, huge).startswith(b"HTTP/1.0 431 Request Header Fields Too Large\r\n")
    finally:
        server.stop()


@pytest.mark.timeout(30)
@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300)
    | st.builds(lambda a, b: a + b"\r\n\r\n" + b, st.binary(max_size=200), st.binary(max_size=20))
)
@pytest.mark.unit
def test_parse_never_raises(data):
    """Whatever a client sends, parse() answers: a request, an error to send, or 'not whole yet'."""
    found = endpoint.parse(data)
    assert found is None or isinstance(found, (endpoint.Request, endpoint.Response))
    if b"\r\n\r\n" in data:
        assert found is not None


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_a_failing_handler_is_a_500_and_the_server_goes_on(listener, caplog):
    port = listener.getsockname()[1]

    def broken(request: endpoint.Request) -> endpoint.Response:
        raise RuntimeError("bug")

    server = served(listener, {"/broken": broken, "/hello": hello})
    try:
        assert ask(port, b"GET /broken HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 500 Internal Server Error\r\n")
        assert ask(port, b"GET /hello HTTP/1.0\r\n\r\n").endswith(b"hello ?\n")
    finally:
        server.stop()
    assert "answering GET /broken failed" in caplog.text and "RuntimeError: bug" in caplog.text


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_an_idle_or_slow_client_is_closed_at_the_deadline(listener):
    port = listener.getsockname()[1]
    server = served(listener, {"/hello": hello}, deadline=0.5)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as idle,
            socket.create_connection(("127.0.0.1", port), timeout=5) as slow,
        ):
            began = time.monotonic()
            slow.sendall(b"GET /hello HTTP/1.0\r\n")  # never finishes its head
            assert idle.recv(100) == b"" and slow.recv(100) == b""  # closed, no answer
            assert 0.4 < time.monotonic() - began < 3
        wait_until(lambda: not server.connections, 2, "both connections forgotten")
    finally:
        server.stop()


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_when_every_slot_is_taken_new_clients_wait_in_the_accept_queue(listener):
    port = listener.getsockname()[1]
    server = served(listener, {"/hello": hello}, max_connections=2, deadline=1.0)
    try:
        holders = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        wait_until(lambda: len(server.connections) == 2, 2, "both slots taken")
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as waiting:  # the kernel completes it
            waiting.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
            time.sleep(0.3)
            assert len(server.connections) == 2  # not accepted: it costs the agent nothing yet
            assert read_all(waiting).endswith(b"hello ?\n")  # once the deadline freed a slot
        assert 0.8 < time.monotonic() - began < 3
        holders.pop().close()  # a client that leaves frees its slot at once
        began = time.monotonic()
        assert ask(port, b"GET /hello HTTP/1.0\r\n\r\n").endswith(b"hello ?\n")
        assert time.monotonic() - began < 0.5
        holders.pop().close()
    finally:
        server.stop()


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_handlers_get_a_bounded_share_of_the_time(listener):
    """A client asking in a loop cannot keep the thread, and so the agent's GIL, busy."""
    port = listener.getsockname()[1]

    def slow(request: endpoint.Request) -> endpoint.Response:
        time.sleep(0.05)
        return endpoint.Response(200)

    server = served(listener, {"/slow": slow})
    try:
        began = time.monotonic()
        for _ in range(3):
            ask(port, b"GET /slow HTTP/1.0\r\n\r\n")
        pause = 0.05 * (1 / endpoint.HANDLER_SHARE - 1)
        assert time.monotonic() - began >= 3 * 0.05 + 2 * pause
    finally:
        server.stop()


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_metrics_answer_as_prometheus_client_does(listener):
    """Same bytes as ``exposition`` (what prometheus_client's handler served), OpenMetrics and gzip on request."""
    port = listener.getsockname()[1]
    counters = busy_counters()
    server = metrics.serve(listener, counters)
    try:
        plain = ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = plain.split(b"\r\n\r\n", 1)
        assert body == metrics.exposition(counters.snapshot())
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        zipped = ask(port, b"GET /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n").split(b"\r\n\r\n", 1)
        assert b"Content-Encoding: gzip" in zipped[0] and gzip.decompress(zipped[1]) == body
        om = ask(port, b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n")
        assert b"Content-Type: application/openmetrics-text" in om and om.endswith(b"# EOF\n")
        assert ask(port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 ")
    finally:
        server.stop()


# --- a real run under attack -----------------------------------------------------------------------

IDLE = 300


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(120)
def test_idle_connections_cannot_stall_the_agent(tmp_path, broker, runs):
    """300 idle connections to the metrics port: messages keep flowing, the agent's threads and
    descriptors stay bounded, a scrape works once they are gone, and a graceful stop is prompt."""
    port = free_port()
    run, rec = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=2, workers_toml=with_metrics(port))
    agent = run.pids("agent")[-1]
    scrape(port)
    base_threads, base_fds = threads(agent), fds(agent)
    pub = publisher(broker)
    idle = attack(port, IDLE)
    try:
        time.sleep(0.5)  # let the agent take what it will take
        for sock in idle[:100:2]:  # half of the first ones start a request and never finish it
            try:
                sock.send(b"GET /metrics HTTP/1.1\r\n")
            except OSError:
                pass
        peak = [0, 0]

        def sample() -> None:
            peak[0], peak[1] = max(peak[0], threads(agent)), max(peak[1], fds(agent))

        began = time.monotonic()
        for batch in range(10):  # a steady stream: 200 messages over about 2 s
            publish_all(pub, [(f"load/{batch}/{i}", b"x") for i in range(20)])
            sample()
            time.sleep(0.2)
        wait_until(lambda: sample() or len(records(rec)) >= 200, 10, "the stream handled during the attack")
        handled_in = time.monotonic() - began
        print(
            f"\n{IDLE} idle connections: 200 messages handled in {handled_in:.2f} s; agent threads "
            f"{base_threads} -> peak {peak[0]}, fds {base_fds} -> peak {peak[1]}"
        )
        assert peak[0] <= base_threads + 1, "the agent's threads grow with the clients"
        assert peak[1] <= base_fds + endpoint.MAX_CONNECTIONS + 4, "the agent's descriptors grow with the clients"
        assert handled_in < 6
        # the deadline closes what the agent accepted, answered or not
        first = idle[0]
        first.setblocking(True)
        first.settimeout(endpoint.DEADLINE + 3)
        assert first.recv(100) == b""
    finally:
        for sock in idle:
            sock.close()
    text = wait_until(lambda: _try_scrape(port), 15, "a scrape once the idle clients are gone")
    assert "procmqtt_messages_received_total 200.0" in text
    idle = attack(port, IDLE)  # again, and stop while it lasts
    try:
        time.sleep(0.5)
        began = time.monotonic()
        assert run.stop() == 0
        stopped_in = time.monotonic() - began
    finally:
        for sock in idle:
            sock.close()
    print(f"graceful stop under attack took {stopped_in:.2f} s")
    assert stopped_in < 5


def attack(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that send nothing; non-blocking, as past the accept queue the kernel
    keeps retrying their SYNs."""
    idle = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        idle.append(sock)
    return idle


def _try_scrape(port: int) -> str | None:
    try:
        return scrape(port)
    except OSError:
        return None
