"""A publish the agent had taken when it was SIGKILLed: its ``wait()`` ends with False once the new
agent starts (AgentStarted, Sync, SyncAck), and publishes the new agent took are still confirmed.

The first part plays the agent on real socket pairs; the rest runs ``procmqtt run`` against
Mosquitto and kills the agent while the broker is down, so nothing can be confirmed meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from harness import (
    Mosquitto,
    Procmqtt,
    publish_all,
    publisher,
    wait_until,
    write_config,
)

from procmqtt import Properties, RequestFailed
from procmqtt.config import from_mapping
from procmqtt.ipc import channel
from procmqtt.worker.link import AGENT_GONE, _AgentLink


def _sent(agent_up: socket.socket) -> list[channel.Record]:
    """Every record the link has sent the agent so far."""
    out: list[channel.Record] = []
    while True:
        try:
            records = channel.receive(agent_up)
        except BlockingIOError:
            return out
        out += records or []


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_the_sync_fails_only_what_the_dead_agent_took():
    agent_up, worker_up = channel.pair()
    agent_in, worker_in = channel.pair()
    agent_up.setblocking(False)
    worker_in.setblocking(False)
    link = _AgentLink(0, 5, worker_in, worker_up, from_mapping({}, "test"))
    with agent_up, worker_up, agent_in, worker_in:
        lost, held, confirmed = (link.publish(f"t/{i}", b"", 1, False) for i in range(3))
        asked = link.request("svc/x", b"?", 1, Properties(correlation_data=b"c"))
        (ask,) = [r for r in _sent(agent_up) if isinstance(r, channel.Publish) and r.request]
        # the new agent confirmed one publish before the worker's Sync reached it
        channel.send(agent_in, channel.Published(confirmed.request_id, 0))
        channel.send(agent_in, channel.AgentStarted())
        link.read_available()
        assert confirmed.wait(0)
        holding, sync = _sent(agent_up)
        assert holding == channel.Holding(0, 5) and sync == channel.Sync(0, 5, ask.request_id)
        after = link.publish("t/after", b"", 1, False)  # not covered by the Sync: untouched
        assert [r.request_id for r in _sent(agent_up)] == [after.request_id]  # type: ignore[union-attr]
        channel.send(agent_in, channel.SyncAck(sync.last_request_id, (held.request_id,)))
        link.read_available()
        assert not lost.wait(0) and lost.error == AGENT_GONE
        with pytest.raises(RequestFailed, match=r"the agent's side closed or restarted before an answer"):
            asked.result("svc/x", 5)
        assert held.error is None and after.error is None
        channel.send(agent_in, channel.Published(held.request_id, 0))
        channel.send(agent_in, channel.Published(after.request_id, 0))
        assert held.wait(1) and after.wait(1)
        assert not link._handles and not link._request_of
        channel.send(agent_in, channel.AgentStarted())  # nothing unconfirmed: nothing to ask
        link.read_available()
        assert _sent(agent_up) == [channel.Holding(0, 5)]


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_a_worker_tells_a_new_agent_what_it_still_holds_from_the_old_one():
    """``Holding`` lists the deliveries read and not reported done, running or queued; not one whose
    Done is already queued, nor one the new agent sent after its ``AgentStarted``."""
    agent_up, worker_up = channel.pair()
    agent_in, worker_in = channel.pair()
    agent_up.setblocking(False)
    worker_in.setblocking(False)
    link = _AgentLink(2, 9, worker_in, worker_up, from_mapping({}, "test"))
    with agent_up, worker_up, agent_in, worker_in:
        for delivery_id, topic in ((11, "k/done"), (12, "k/running"), (13, "k/queued")):
            channel.send(agent_in, channel.Deliver(delivery_id, topic, b"", 1, False, False))
        assert [link.next(0), link.next(0)] == [
            channel.Deliver(i, t, b"", 1, False, False) for i, t in ((11, "k/done"), (12, "k/running"))
        ]
        link.send_later(channel.Done(11))  # queued, not sent yet: it goes out first
        channel.send(agent_in, channel.AgentStarted())
        channel.send(agent_in, channel.Deliver(1, "k/new", b"", 1, False, False))  # from the new agent
        link.read_available()
        assert _sent(agent_up) == [channel.Done(11), channel.Holding(2, 9, ((12, "k/running"), (13, "k/queued")))]
        link.send_later(channel.Done(12))
        channel.send(agent_in, channel.AgentStarted())  # another restart: what is still in hand
        link.read_available()
        link.flush()
        assert _sent(agent_up) == [channel.Done(12), channel.Holding(2, 9, ((13, "k/queued"), (1, "k/new")))]


def _step(record_dir: Path, name: str) -> dict | None:
    path = record_dir / "steps.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return next((s for s in map(json.loads, lines) if s["step"] == name), None)


def _wait_across_agent_restart(tmp_path: Path, broker: Mosquitto, runs: list[Procmqtt], app: str) -> None:
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    config = write_config(
        tmp_path / "procmqtt.toml", broker, topics={"go": 0}, workers=1, app={"record_dir": str(record_dir)}
    )
    run = Procmqtt(tmp_path, f"tests/apps_agent_restart.py:{app}", config)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=1)
    pub = publisher(broker)
    publish_all(pub, [("go", b"")], qos=0)
    pub.loop_stop()
    pub.disconnect()
    wait_until(lambda: _step(record_dir, "received"), 10, "the handler to start")

    broker.stop()
    run.wait_for_log(r"connection lost")
    (record_dir / "broker-down").touch()
    taken = wait_until(lambda: _step(record_dir, "taken"), 10, "the agent to take the QoS 1 publish")
    assert taken["probe"] is False  # no connection: the agent holds the QoS 1 publish, unconfirmed

    killed = time.monotonic()
    os.kill(run.pids("agent")[-1], signal.SIGKILL)
    run.wait_for_log(r"started agent", count=2)
    first = wait_until(lambda: _step(record_dir, "first"), 5, "wait() on the lost publish to end")
    assert first["ok"] is False and first["error"] == AGENT_GONE
    print(f"wait() ended {first['time'] - killed:.2f}s after the agent was SIGKILLed")
    assert _step(record_dir, "second") is None  # the new agent holds it until the broker is back

    broker.start()
    second = wait_until(lambda: _step(record_dir, "second"), 40, "the new agent to confirm the later publish")
    assert second["ok"] is True and second["error"] == 0
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_wait_without_timeout_ends_when_the_agent_that_took_the_publish_is_killed(tmp_path, broker, runs):
    _wait_across_agent_restart(tmp_path, broker, runs, "WaitsAcrossAgentRestart")


@pytest.mark.timeout(90)
def test_await_publish_ends_when_the_agent_that_took_the_publish_is_killed(tmp_path, broker, runs):
    _wait_across_agent_restart(tmp_path, broker, runs, "AwaitsAcrossAgentRestart")


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_an_answer_for_a_worker_the_agent_does_not_know_yet_waits_for_its_worker_up():
    """A worker may publish (in on_start, say) before the supervisor's WorkerUp for it reaches the
    agent: the answer is kept for that worker, not dropped (its wait() would never end)."""
    from procmqtt.agent.outbox import EarlyAnswers

    early = EarlyAnswers({})  # the agent was forked with no worker known
    early.keep(0, 7, channel.Published(41, 0))  # slot 0, generation 7: not known yet
    early.keep(0, 6, channel.Published(40, 0))  # an older generation, gone before it was known
    assert early.worker_up(0, 7) == [channel.Published(41, 0)]
    assert not early
    early.keep(0, 5, channel.Published(39, 0))  # a generation older than one known: gone, not kept
    assert not early
