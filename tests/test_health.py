"""``[health]``: /livez and /readyz decided in-process, then on a real run against a private Mosquitto
(the broker stopped and started, no worker ready, bad and idle connections), and bad config values."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    ROOT,
    Mosquitto,
    Procmqtt,
    free_port,
    publish_all,
    publisher,
    records,
    run_cli,
    wait_until,
    write_config,
)
from hostile_broker import HostileBroker

from procmqtt import config
from procmqtt.agent import health
from procmqtt.errors import ConfigError
from procmqtt.ipc.shared import SharedState

# --- the decision, in-process -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def probes(**fields: object) -> tuple[health.Probes, SharedState, Clock]:
    clock, shared = Clock(), SharedState(slots=1)
    shared.beat(clock.now)
    p = health.Probes(shared, clock)
    ready = {
        "at": clock.now,
        "state": "connected",
        "connected_since": 1_800_000_000.0,
        "subscribed": True,
        "workers_ready": 2,
        "workers_total": 2,
        "pending": 5,
    }
    p.readiness = health.Readiness(**{**ready, **fields})  # type: ignore[arg-type]
    return p, shared, clock


def answer(response: object) -> tuple[int, dict[str, object]]:
    assert response.headers[0] == ("Content-Type", "application/json")  # type: ignore[attr-defined]
    return response.status, json.loads(response.body)  # type: ignore[attr-defined]


@pytest.mark.unit
def test_ready_and_live_say_what_they_saw():
    p, _, _ = probes()
    assert answer(p.livez())[0] == 200
    status, body = answer(p.readyz())
    assert status == 200
    assert body == {
        "status": "ok",
        "state": "connected",
        "connected_since": "2027-01-15T08:00:00+00:00",
        "subscribed": True,
        "workers_ready": 2,
        "workers_total": 2,
        "pending": 5,
        "problems": [],
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"state": "disconnected", "connected_since": None, "subscribed": False}, "not connected to the broker"),
        ({"state": "connecting", "connected_since": None, "subscribed": False}, "not connected to the broker"),
        ({"subscribed": False}, "subscriptions not yet acknowledged"),
        ({"workers_ready": 0}, "no worker ready (0 of 2)"),
        ({"workers_ready": 0, "workers_total": 0}, "no worker ready (0 of 0)"),
        ({"state": "stopping"}, "stopping"),
    ],
)
def test_not_ready_but_alive(fields, problem):
    """Whatever the broker or the workers do, liveness holds: a restart would not help."""
    p, _, _ = probes(**fields)
    status, body = answer(p.readyz())
    assert status == 503 and body["status"] == "unavailable"
    assert any(problem in line for line in body["problems"]), body
    assert answer(p.livez())[0] == 200


@pytest.mark.unit
def test_a_stalled_supervisor_or_agent_loop_fails_both():
    p, shared, clock = probes()
    clock.now += health.STALE_AFTER  # exactly at the limit: still alive
    p.readiness = health.Readiness(**{**p.readiness.__dict__, "at": clock.now})
    assert answer(p.livez())[0] == 200
    clock.now += 1  # the supervisor has not beaten for STALE_AFTER + 1 s
    status, body = answer(p.livez())
    assert status == 503 and body["problems"] == [
        f"the supervisor's loop has not run for {health.STALE_AFTER + 1:.0f} s"
    ]
    assert answer(p.readyz())[0] == 503
    shared.beat(clock.now)
    assert answer(p.livez())[0] == 200
    clock.now += health.STALE_AFTER + 1  # now the agent's loop has published nothing either
    shared.beat(clock.now)
    status, body = answer(p.livez())
    assert status == 503 and body["problems"][0].startswith("the agent's loop has not run for")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"port": 0}, "[health] port: expected an integer from 1 to 65535, got 0"),
        ({"port": "8081"}, "[health] port: expected an integer from 1 to 65535, got '8081'"),
        ({"host": ""}, "[health] host: expected a non-empty string, got ''"),
        ({"prot": 1}, "[health] unknown key 'prot' (did you mean 'port'?)"),
    ],
)
def test_health_config_errors(table, expected):
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"health": table}, "p.toml")
    assert str(info.value) == f"p.toml: {expected}"


@pytest.mark.unit
def test_health_config_defaults_and_the_metrics_port():
    assert config.Config().health == config.HealthConfig(port=None, host="127.0.0.1")
    assert config.from_mapping({"health": {"port": 8081, "host": "0.0.0.0"}}).health.port == 8081
    with pytest.raises(ConfigError, match=r"^p.toml: \[health\] port \(9464\) must differ from \[metrics\] port"):
        config.from_mapping({"health": {"port": 9464}, "metrics": {"port": 9464}}, "p.toml")


# --- the command line: bad values exit 2 with one line ------------------------------------------------


@pytest.mark.timeout(40)
def test_run_with_a_bad_health_value_exits_2_with_one_line(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(f'[app]\nrecord_dir = "{tmp_path}"\n')
    result = run_cli("run", "tests/apps.py:Recorder", "-c", str(path), env={"PROCMQTT_HEALTH_PORT": "http"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "procmqtt: error: PROCMQTT_HEALTH_PORT: expected an integer from 1 to 65535, got 'http'"
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path.write_text(f'[health]\nport = {port}\n[app]\nrecord_dir = "{tmp_path}"\n')
        result = run_cli("run", "tests/apps.py:Recorder", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"procmqtt: error: {path}: [health] cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another process uses that port; pick another [health] port)"
    ]


# --- a real run ----------------------------------------------------------------------------------------


def probe(port: int, path: str, timeout: float = 3.0) -> tuple[int, dict[str, object]]:
    """GET ``path``: the status and the JSON body; (0, {}) when nothing answers (yet)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return 0, {}
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.startswith(b"{") else {"raw": body.decode()}


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def becomes(port: int, path: str, status: int, timeout: float, what: str) -> dict[str, object]:
    return wait_until(lambda: (a := probe(port, path))[0] == status and a[1], timeout, what)  # type: ignore[no-any-return]


@pytest.fixture
def health_port() -> Iterator[int]:
    yield free_port()


@pytest.mark.timeout(90)
def test_probes_follow_the_broker_and_the_workers(tmp_path, broker: Mosquitto, runs, health_port):
    hold, record_dir = tmp_path / "hold", tmp_path / "records"
    record_dir.mkdir()
    cfg = tmp_path / "procmqtt.toml"
    write_config(cfg, broker, topics={"h/#": 1}, workers=1, app={"record_dir": str(record_dir), "hold_file": str(hold)})
    cfg.write_text(cfg.read_text() + f"\n[health]\nport = {health_port}\n")
    run = Procmqtt(tmp_path, "tests/apps.py:Recorder", str(cfg))
    runs.append(run)

    body = becomes(health_port, "/readyz", 200, 20, "ready after start")
    assert body["workers_ready"] == 1 and body["subscribed"] is True and body["state"] == "connected"
    assert probe(health_port, "/livez")[0] == 200

    # bad requests get their error, and idle connections beyond the cap hold nothing up for long
    assert raw(health_port, b"POST /readyz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 405")
    assert raw(health_port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw(health_port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
    idle = [socket.create_connection(("127.0.0.1", health_port)) for _ in range(40)]
    try:
        began = time.monotonic()
        assert probe(health_port, "/livez", timeout=health.DEADLINE + 3)[0] == 200
        assert time.monotonic() - began < health.DEADLINE + 2
        publish_all(publisher(broker), [("h/1", b"flows")])
        wait_until(lambda: records(record_dir), 10, "a message handled while the probe port is flooded")
    finally:
        for sock in idle:
            sock.close()

    broker.stop()
    body = becomes(health_port, "/readyz", 503, 10, "not ready with the broker gone")
    assert body["state"] in ("disconnected", "connecting") and body["connected_since"] is None
    for _ in range(3):  # alive all along: restarting the pod would not bring the broker back
        assert probe(health_port, "/livez")[0] == 200
        time.sleep(0.3)
    broker.start()
    becomes(health_port, "/readyz", 200, 30, "ready again after the broker restarts")

    # no worker ready: the only one is killed and its replacement holds in on_start
    hold.touch()
    (worker,) = run.pids("worker").values()
    os.kill(worker, signal.SIGKILL)
    body = becomes(health_port, "/readyz", 503, 10, "not ready without a ready worker")
    assert body["workers_ready"] == 0
    assert probe(health_port, "/livez")[0] == 200
    hold.unlink()
    becomes(health_port, "/readyz", 200, 20, "ready once the new worker booted")

    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0
    assert probe(health_port, "/livez", timeout=1)[0] == 0  # the socket closed with procmqtt


@pytest.mark.timeout(40)
def test_ready_again_when_the_lost_connection_had_a_subscribe_unanswered(tmp_path, runs, health_port):
    """A SUBSCRIBE the broker never answered (the connection was lost first) is forgotten on the next
    connection: paho does not send it again, so waiting for its SUBACK would hold /readyz at 503."""
    peer = HostileBroker(v5=False, after_subscribe=lambda conn: None, drop_first_subscribe=True)
    try:
        cfg = tmp_path / "procmqtt.toml"
        write_config(cfg, None, topics={"h/#": 1}, workers=1, app={"record_dir": str(tmp_path)}, port=peer.port)  # type: ignore[arg-type]
        cfg.write_text(cfg.read_text() + f"\n[health]\nport = {health_port}\n")
        run = Procmqtt(tmp_path, "tests/apps.py:Recorder", str(cfg))
        runs.append(run)
        becomes(health_port, "/readyz", 200, 20, "ready on the second connection")
        assert peer.connections == 2
    finally:
        peer.close()


@pytest.mark.timeout(30)
def test_healthcheck_script_reads_the_endpoint(tmp_path, health_port):
    """examples/deploy/healthcheck.py --url: exit 0 on 200, 1 with one line otherwise (no broker needed)."""
    script = ROOT / "examples" / "deploy" / "healthcheck.py"

    def check(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), "--url", url], capture_output=True, text=True, timeout=20, check=False
        )

    p, _, _ = probes(state="disconnected", subscribed=False)
    listener = health.listen(config.from_mapping({"health": {"port": health_port}}))
    assert listener is not None
    served = health.serve(listener, p)
    try:
        p.shared.beat(time.monotonic())
        p.clock = time.monotonic
        p.readiness = health.Readiness(**{**p.readiness.__dict__, "at": time.monotonic()})
        ok = check(f"http://127.0.0.1:{health_port}/livez")
        assert (ok.returncode, ok.stderr) == (0, "")
        bad = check(f"http://127.0.0.1:{health_port}/readyz")
        assert bad.returncode == 1
        assert bad.stderr.strip().splitlines() == [
            f"unhealthy: http://127.0.0.1:{health_port}/readyz answered 503: not connected to the broker (disconnected)"
        ]
    finally:
        served.stop()
        listener.close()
    gone = check(f"http://127.0.0.1:{health_port}/livez")
    assert gone.returncode == 1 and gone.stderr.startswith("unhealthy: ")
    assert Path(script).exists()
