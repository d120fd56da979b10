"""Metrics: the counters and their exposition in-process, then ``[metrics]`` on a real run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from harness import ROOT, free_port, publish_all, publisher, records, run_cli, start, wait_until

from procmqtt import config
from procmqtt.agent import metrics
from procmqtt.cli import status
from procmqtt.errors import ConfigError
from procmqtt.message import Outcome

CONTRACT = {  # docs/metrics.md and /work plan: names and types other tools rely on
    "procmqtt_messages_received_total": "counter",
    "procmqtt_messages_dispatched_total": "counter",
    "procmqtt_messages_processed_total": "counter",
    "procmqtt_messages_failed_total": "counter",
    "procmqtt_messages_unrouted_total": "counter",
    "procmqtt_messages_redelivered_total": "counter",
    "procmqtt_messages_dead_lettered_total": "counter",
    "procmqtt_messages_dropped_total": "counter",
    "procmqtt_messages_invalid_total": "counter",
    "procmqtt_publishes_sent_total": "counter",
    "procmqtt_publishes_failed_total": "counter",
    "procmqtt_in_flight": "gauge",
    "procmqtt_window": "gauge",
    "procmqtt_messages_waiting_on_key": "gauge",
    "procmqtt_keys_active": "gauge",
    "procmqtt_reconnects_total": "counter",
    "procmqtt_worker_restarts_total": "counter",
    "procmqtt_processing_seconds": "histogram",
}


def busy_counters() -> metrics.Counters:
    c = metrics.Counters(3)
    c.received = 10
    c.dispatched[:] = [4, 3, 3]
    for slot, outcome, seconds in [
        (0, Outcome.OK, 0.0001),
        (0, Outcome.FAILED, 0.00011),
        (1, Outcome.OK, 0.2),
        (1, Outcome.UNROUTED, 0.0),
        (2, Outcome.OK, 100.0),
    ]:
        c.done(slot, outcome, seconds)
    c.redelivered, c.dead_lettered, c.dropped, c.reconnects, c.invalid = 2, 1, 1, 3, 1
    c.published(0)
    c.published(0)
    c.published(7)
    c.sample({0: 3, 2: 1}, 32, 5, 2)
    c.set_restarts("SIGKILL", 2)
    c.set_restarts("recycled", 1)
    return c


# --- in-process: counters, exposition, parsing, rendering ----------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_exposition_has_exactly_the_contract_names():
    text = metrics.exposition(busy_counters().snapshot()).decode()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    assert types == CONTRACT


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_snapshot_survives_exposition_and_parsing():
    snap = busy_counters().snapshot()
    back = status.parse(metrics.exposition(snap).decode())
    assert back == snap
    assert back.workers[0] == metrics.WorkerStats(dispatched=4, processed=2, failed=1, unrouted=0, in_flight=3)
    assert back.workers[1].unrouted == 1 and back.workers[2].in_flight == 1
    assert (back.publishes_sent, back.publishes_failed, back.window) == (2, 1, 32)
    assert (back.waiting_on_key, back.keys_active) == (5, 2)
    assert back.restarts == {"SIGKILL": 2, "recycled": 1}


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_histogram_buckets_count_and_sum():
    snap = busy_counters().snapshot()
    buckets = dict(snap.buckets)
    assert buckets[0.0001] == 2  # 0.0 and exactly 0.0001 (le is inclusive)
    assert buckets[0.00025] == 3  # + 0.00011
    assert buckets[0.25] == 4  # + 0.2
    assert buckets[60.0] == 4 and buckets[float("inf")] == 5  # 100 s only in +Inf
    assert snap.processing_count == snap.processed == 5
    assert snap.seconds_sum == pytest.approx(100.20021)
    text = metrics.exposition(snap).decode()
    assert 'procmqtt_processing_seconds_bucket{le="+Inf"} 5.0' in text
    assert "procmqtt_processing_seconds_count 5.0" in text


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_restart_totals_only_grow():
    """A total queued for a dead agent may reach its successor after a newer one: keep the larger."""
    c = metrics.Counters(1)
    c.set_restarts("SIGKILL", 3)
    c.set_restarts("SIGKILL", 2)
    assert c.snapshot().restarts == {"SIGKILL": 3}


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_render_rows_rates_and_totals():
    before = busy_counters().snapshot(taken=100.0)
    c = busy_counters()
    for _ in range(20):
        c.done(0, Outcome.OK, 0.001)
    after = c.snapshot(taken=102.0)
    table = status.render(after, before)
    lines = table.splitlines()
    assert lines[0].split() == ["worker", "processed", "msg/s", "in-flight", "failed"]
    assert lines[1].split() == ["0", "22", "10.0", "3", "1"]
    assert lines[2].split() == ["1", "2", "0.0", "0", "0"]
    assert lines[4].split() == ["total", "25", "10.0", "4", "1"]
    assert "publishes 2 sent, 1 failed" in table and "restarts 3 (SIGKILL 2, recycled 1)" in table
    assert "dead-lettered 1, dropped 1, invalid 1;" in table
    assert status.render(after, None).splitlines()[1].split()[2] == "-"  # no earlier read: no rate


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_served_over_http_from_a_thread(tmp_path):
    counters = busy_counters()
    port = free_port()
    cfg = config.from_mapping({"metrics": {"port": port}}, "m.toml")
    sock = metrics.listen(cfg)
    assert sock is not None
    metrics.serve(sock, counters)
    assert status.fetch("127.0.0.1", port) == counters.snapshot()
    counters.received += 5  # the next scrape sees the agent's later numbers
    assert status.fetch("127.0.0.1", port).received == 15


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_port_in_use_is_one_line_config_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config.from_mapping({"metrics": {"port": port}}, "m.toml")
        with pytest.raises(
            ConfigError,
            match=rf"^m.toml: \[metrics\] cannot listen on 127.0.0.1:{port}: "
            r"Address already in use",
        ):
            metrics.listen(cfg)


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_missing_prometheus_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    cfg = config.from_mapping({"metrics": {"port": free_port()}}, "m.toml")
    with pytest.raises(ConfigError) as info:
        metrics.listen(cfg)
    assert str(info.value) == (
        "m.toml: [metrics] port is set, but prometheus_client is not installed: pip install 'procmqtt[metrics]'"
    )
    assert metrics.listen(config.Config()) is None  # metrics off: no need for it


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_nothing_listening_is_unreachable():
    port = free_port()
    with pytest.raises(status.Unreachable, match=f"nothing answers on http://127.0.0.1:{port}/metrics"):
        status.fetch("127.0.0.1", port, timeout=1)


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_metrics_config_defaults_and_values():
    assert config.Config().metrics == config.MetricsConfig(port=None, host="127.0.0.1")
    cfg = config.from_mapping({"metrics": {"port": 9464, "host": "0.0.0.0"}})
    assert (cfg.metrics.port, cfg.metrics.host) == (9464, "0.0.0.0")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "table, expected",
    [
        ({"port": 0}, "[metrics] port: expected an integer from 1 to 65535, got 0"),
        ({"port": 70000}, "[metrics] port: expected an integer from 1 to 65535, got 70000"),
        ({"port": "9464"}, "[metrics] port: expected an integer from 1 to 65535, got '9464'"),
        ({"host": ""}, "[metrics] host: expected a non-empty string, got ''"),
        ({"prot": 1}, "[metrics] unknown key 'prot' (did you mean 'port'?)"),
    ],
)
@pytest.mark.unit
def test_metrics_config_errors(table, expected):
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"metrics": table}, "p.toml")
    assert str(info.value) == f"p.toml: {expected}"


# --- the command line, without a broker ----------------------------------------------------------


@pytest.mark.timeout(30)
def test_status_without_metrics_is_a_config_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[workers]\ncount = 2\n")
    result = run_cli("status", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            f"procmqtt: error: {path}: [metrics] port is not set, so procmqtt serves no metrics; set it "
            "(e.g. port = 9464) and restart procmqtt"
        )
    ]


@pytest.mark.timeout(30)
def test_status_with_nothing_listening_exits_1(tmp_path):
    port = free_port()
    path = tmp_path / "p.toml"
    path.write_text(f"[metrics]\nport = {port}\n")
    result = run_cli("status", "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"procmqtt: error: nothing answers on http://127.0.0.1:{port}/")


@pytest.mark.timeout(30)
def test_run_with_metrics_port_in_use_exits_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "p.toml"
        path.write_text(f'[metrics]\nport = {port}\n[app]\nrecord_dir = "{tmp_path}"\n')
        result = run_cli("run", "tests/apps.py:Recorder", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            f"procmqtt: error: {path}: [metrics] cannot listen on 127.0.0.1:{port}: Address already in use "
            "(another process uses that port; pick another [metrics] port)"
        )
    ]


# --- a real run ----------------------------------------------------------------------------------


def with_metrics(port: int, workers_toml: str = "") -> str:
    """``start()`` has no parameter for other sections: a [metrics] table after the [workers] keys."""
    return f"{workers_toml}\n\n[metrics]\nport = {port}\n"


def scrape(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def snap(port: int) -> metrics.Snapshot:
    return status.fetch("127.0.0.1", port, timeout=5)


@pytest.mark.timeout(90)
def test_counts_messages_publishes_and_reconnects(tmp_path, broker, runs):
    port = free_port()
    n, echoes = 300, 20
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"load/#": 1, "echo/#": 1},
        workers=2,
        mqtt='username = "svc"\npassword = "s3cret-pw-xyz"',
        workers_toml=with_metrics(port),
    )
    pub = publisher(broker)
    publish_all(pub, [(f"load/{i % 5}", str(i).encode()) for i in range(n)])
    publish_all(pub, [(f"echo/{i}", b"e") for i in range(echoes)])
    wait_until(lambda: len(records(rec)) >= n + echoes, 30, "all messages handled")
    # gauges are sampled once a second: wait for a sample taken after the work
    s = wait_until(
        lambda: (x := snap(port)).processed == n + echoes and x.in_flight == 0 and x.window == 2 * 16 and x,
        10,
        "the agent's counts to catch up",
    )
    assert s.received == n + echoes
    assert set(s.workers) == {0, 1} and all(w.processed > 0 for w in s.workers.values())
    assert sum(w.dispatched for w in s.workers.values()) == n + echoes
    assert s.processing_count == n + echoes and s.failed == 0 and s.redelivered == 0
    assert (s.publishes_sent, s.publishes_failed) == (echoes, 0)
    assert s.window == 2 * 16
    text = scrape(port)
    assert 'procmqtt_messages_processed_total{worker="0"}' in text
    assert "s3cret" not in text and "svc" not in text  # no configuration, let alone a secret
    broker.stop()  # same port when it comes back
    broker.start()
    wait_until(lambda: snap(port).reconnects == 1, 30, "one reconnect counted")
    assert run.stop() == 0
    assert "s3cret" not in run.log()


@pytest.mark.timeout(90)
def test_worker_restarts_by_cause_and_redeliveries(tmp_path, broker, runs):
    port = free_port()
    run, rec = start(
        runs,
        tmp_path,
        broker,
        topics={"load/#": 1, "hang": 1},
        workers=2,
        app={"delay": 0.1},
        workers_toml=with_metrics(port, "timeout = 1\nmax_attempts = 1"),
    )
    pub = publisher(broker)
    publish_all(pub, [(f"load/{i}", str(i).encode()) for i in range(40)])
    first = wait_until(lambda: records(rec, "received"), 10, "a message in progress")[0]
    victim = run.pids("worker")[first["worker"]]
    assert first["pid"] == victim
    os.kill(victim, signal.SIGKILL)  # it holds several messages (0.1 s each, prefetch 16)
    run.wait_for_log(r"started worker", count=3)
    s = wait_until(lambda: (x := snap(port)).restarts.get("SIGKILL") == 1 and x, 10, "a SIGKILL restart")
    assert s.redelivered >= 1
    # max_attempts = 1: the message it died on is dropped, the others it held go to the other worker
    wait_until(lambda: (x := snap(port)).processed + x.dropped == 40, 30, "the stream finished")
    publish_all(pub, [("hang", b"")])
    wait_until(lambda: snap(port).restarts.get("hung") == 1, 15, "a hung worker restart")
    # a new agent starts its counters from zero, but restart totals are the supervisor's
    os.kill(run.pids("agent")[-1], signal.SIGKILL)
    run.wait_for_log(r"started agent", count=2)
    run.wait_for_log(r"\[agent\] INFO subscribed to", count=2)
    s = wait_until(
        lambda: (x := snap(port)).restarts == {"SIGKILL": 1, "hung": 1} and x,
        10,
        "restart totals after an agent restart",
    )
    assert s.received == 0 and s.processed == 0
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_recycled_workers_are_counted(tmp_path, broker, runs):
    port = free_port()
    run, _ = start(
        runs,
        tmp_path,
        broker,
        topics={"load/#": 1},
        workers=1,
        workers_toml=with_metrics(port, "max_messages = 5\nprefetch = 1"),
    )
    publish_all(publisher(broker), [(f"load/{i}", b"x") for i in range(12)])
    wait_until(lambda: snap(port).restarts.get("recycled", 0) >= 2, 20, "two recycles")
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_status_command_prints_the_table(tmp_path, broker, runs):
    port = free_port()
    run, _ = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=2, workers_toml=with_metrics(port))
    publish_all(publisher(broker), [(f"load/{i}", b"x") for i in range(50)])
    wait_until(lambda: snap(port).processed == 50, 20, "50 processed")
    cfg = str(tmp_path / "procmqtt.toml")
    result = run_cli("status", "-c", cfg)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["worker", "processed", "msg/s", "in-flight", "failed"]
    assert [r[0] for r in rows[1:4]] == ["0", "1", "total"]
    assert int(rows[1][1]) + int(rows[2][1]) == 50 and rows[3][1] == "50"
    watch = subprocess.Popen(
        [sys.executable, "-m", "procmqtt", "status", "-c", cfg, "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        seen: list[str] = []
        wait_until(
            lambda: seen.append(watch.stdout.readline()) or sum("total" in x for x in seen) >= 2,
            10,
            "two tables from --watch",
        )
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    finally:
        watch.kill()
    assert run.stop() == 0
