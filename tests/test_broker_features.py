"""Production broker features against a real Mosquitto: TLS (server and mutual), the clear error
when TLS and plain MQTT are mixed up, will/birth presence messages, and scale-out with share_group."""

from __future__ import annotations

import subprocess
import sys

import certs
import pytest
from harness import (
    Mosquitto,
    Subscriber,
    publish_all,
    publisher,
    records,
    start,
    wait_until,
    write_config,
)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return certs.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_broker(tmp_path, certificates):
    b = Mosquitto(tmp_path / "tls-broker", tls=certificates)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def mtls_broker(tmp_path, certificates):
    b = Mosquitto(tmp_path / "mtls-broker", tls=certificates, require_certificate=True)
    b.start()
    yield b
    b.stop()


def _handled_over(tmp_path, broker, runs, tls_toml: str, port: int) -> None:
    run, rec = start(runs, tmp_path, broker, topics={"secure/#": 1}, mqtt=tls_toml, port=port)
    publish_all(publisher(broker), [(f"secure/{i}", b"x") for i in range(20)])  # plain listener
    wait_until(lambda: len(records(rec)) >= 20, 20, "20 messages over TLS")
    assert f"connected to 127.0.0.1:{port}" in run.log()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_tls_with_our_ca(tmp_path, tls_broker, certificates, runs):
    _handled_over(tmp_path, tls_broker, runs, f'[mqtt.tls]\nca_certs = "{certificates.ca}"', tls_broker.tls_port)


@pytest.mark.timeout(60)
def test_mutual_tls_with_a_client_certificate(tmp_path, mtls_broker, certificates, runs):
    toml = (
        f'[mqtt.tls]\nca_certs = "{certificates.ca}"\ncertfile = "{certificates.client_cert}"\n'
        f'keyfile = "{certificates.client_key}"'
    )
    _handled_over(tmp_path, mtls_broker, runs, toml, mtls_broker.tls_port)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case", ["plain client, TLS port", "no client certificate", "TLS client, plain port", "unknown CA"]
)
def test_tls_mistakes_give_a_clear_error_not_silence(tmp_path, mtls_broker, certificates, runs, case):
    """paho gives neither CONNACK nor exception for some of these; procmqtt says what to check."""
    b = mtls_broker
    toml, port, expected = {
        "plain client, TLS port": ("connect_timeout = 1", b.tls_port, "before CONNACK (no TLS)"),
        "no client certificate": (
            f'connect_timeout = 1\n[mqtt.tls]\nca_certs = "{certificates.ca}"',
            b.tls_port,
            "(TLS on): is this an MQTT port",
        ),
        "TLS client, plain port": (
            f'connect_timeout = 1\n[mqtt.tls]\nca_certs = "{certificates.ca}"',
            b.port,
            "(TLS on): is this an MQTT port",
        ),
        "unknown CA": (
            "connect_timeout = 1\n[mqtt.tls]",
            b.tls_port,  # the system's CAs only
            "TLS handshake failed: CERTIFICATE_VERIFY_FAILED",
        ),
    }[case]
    run, _ = start(runs, tmp_path, b, topics={"x": 1}, mqtt=toml, port=port, wait_ready=False)
    run.wait_for_log(r"\[agent\] WARNING broker 127\.0\.0\.1:\d+: .*retrying in", timeout=15)
    warning = next(line for line in run.log().splitlines() if "retrying in" in line)
    assert expected in warning, warning
    assert "Traceback" not in run.log()
    assert run.stop() == 0


@pytest.mark.timeout(30)
def test_unreadable_ca_file_is_a_config_error(tmp_path, broker):
    cfg = write_config(
        tmp_path / "procmqtt.toml", broker, topics={"x": 1}, mqtt='[mqtt.tls]\nca_certs = "/nonexistent/ca.pem"'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "procmqtt", "run", "tests/apps.py:Recorder", "-c", cfg],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"procmqtt: error: {cfg}: [mqtt.tls] ca_certs: cannot read /nonexistent/ca.pem"


@pytest.mark.timeout(60)
def test_birth_on_connect_will_on_death_and_offline_on_graceful_stop(tmp_path, broker, runs):
    presence = Subscriber(broker, "presence/#")
    toml = (
        '[mqtt.birth]\ntopic = "presence/app"\npayload = "online"\nqos = 1\nretain = true\n'
        '[mqtt.will]\ntopic = "presence/app"\npayload = "offline"\nqos = 1\nretain = true'
    )
    run, _ = start(runs, tmp_path, broker, topics={"x": 1}, mqtt=toml)
    wait_until(lambda: presence.payloads()[-1:] == [b"online"], 10, "birth message")
    # The agent dies without a DISCONNECT: the broker sends the will; the new agent announces again.
    agent = run.pids("agent")[-1]
    subprocess.run(["kill", "-KILL", str(agent)], check=True)
    wait_until(lambda: b"offline" in presence.payloads(), 10, "will message after the agent died")
    wait_until(lambda: presence.payloads()[-1:] == [b"online"], 20, "birth again from the new agent")
    assert run.stop() == 0
    wait_until(lambda: presence.payloads()[-1:] == [b"offline"], 10, "offline on graceful stop")
    presence.close()
    retained = Subscriber(broker, "presence/#")  # a newcomer sees the retained state
    wait_until(lambda: retained.payloads() == [b"offline"], 10, "retained offline")
    retained.close()


@pytest.mark.timeout(60)
def test_a_port_that_never_answers_times_out_with_the_hint(tmp_path, broker, runs):
    """Silence (no CONNACK, no close): the case paho itself never reports."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    run, _ = start(
        runs,
        tmp_path,
        broker,
        topics={"x": 1},
        mqtt="connect_timeout = 1",
        port=server.getsockname()[1],
        wait_ready=False,
    )
    run.wait_for_log(r"no CONNACK within 1s \(no TLS\): is this an MQTT port", timeout=15)
    assert run.stop() == 0
    server.close()


def _instance(tmp_path, name, broker, runs, share_toml='share_group = "orders"'):
    (tmp_path / name).mkdir(exist_ok=True)
    return start(runs, tmp_path / name, broker, topics={"orders/#": 1}, mqtt=share_toml)


@pytest.mark.timeout(120)
def test_two_instances_share_one_stream_through_share_group(tmp_path, broker, runs):
    a, rec_a = _instance(tmp_path, "a", broker, runs)
    b, rec_b = _instance(tmp_path, "b", broker, runs)
    assert "subscribed to $share/orders/orders/# (qos 1)" in a.log()
    for run in (a, b):  # procmqtt checked that Mosquitto has shared subscriptions (agent/sharecheck.py)
        run.wait_for_log(r"share_group: the broker has shared subscriptions \(a message came back through")
    pub = publisher(broker)

    def handled() -> list[str]:
        return [bytes.fromhex(r["payload"]).decode() for r in records(rec_a) + records(rec_b)]

    publish_all(pub, [(f"orders/{i % 10}", str(i).encode()) for i in range(2500)])
    wait_until(lambda: len(handled()) >= 2500, 60, "first 2500 handled")
    share_a, share_b = len(records(rec_a)), len(records(rec_b))
    print(f"shares: a={share_a} b={share_b}")
    assert share_a > 500 and share_b > 500, (share_a, share_b)

    # B stops in the middle of the second half; A goes on taking new messages.
    publish_all(pub, [(f"orders/{i % 10}", str(i).encode()) for i in range(2500, 3000)])
    assert b.stop() == 0
    a_before = len(records(rec_a))
    publish_all(pub, [(f"orders/{i % 10}", str(i).encode()) for i in range(3000, 5000)])
    wait_until(lambda: len(records(rec_a)) >= a_before + 500, 60, "A takes new messages while B is away")
    # Mosquitto keeps queueing B's share for its persistent session: B back drains it.
    b_before = len(records(rec_b))
    b2, _ = _instance(tmp_path, "b", broker, runs)
    wait_until(lambda: len(set(handled())) >= 5000, 60, "all 5000 handled")
    print(
        f"while B was away A handled {len(records(rec_a)) - a_before} of 2000; "
        f"B drained {len(records(rec_b)) - b_before} on its return"
    )
    done = handled()
    assert set(done) == {str(i) for i in range(5000)}
    print(f"total handled {len(done)}, duplicates {len(done) - len(set(done))}")
    assert len(done) == len(set(done)), "a message was handled twice"
    assert a.stop() == 0 and b2.stop() == 0


@pytest.mark.timeout(60)
def test_websockets_transport(tmp_path, runs):
    b = Mosquitto(tmp_path / "ws-broker", websockets=True)
    b.start()
    try:
        run, rec = start(
            runs, tmp_path, b, topics={"ws/#": 1, "echo/#": 1}, mqtt='transport = "websockets"', port=b.ws_port
        )  # the websockets listener: plain MQTT there gets nowhere
        sub = Subscriber(b, "echoed/#")
        publish_all(publisher(b), [("ws/1", b"over websockets"), ("echo/x", b"back")])
        wait_until(lambda: len(records(rec)) >= 2, 20, "messages in over websockets")
        wait_until(lambda: sub.payloads() == [b"back"], 20, "a worker's publish out over websockets")
        assert run.stop() == 0
        sub.close()
    finally:
        b.stop()
