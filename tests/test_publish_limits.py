"""The agent's publish path at its limits, on a real broker: more workers than paho's message ids
once allowed, QoS 0 with a broker that stops reading, publishes the agent cannot send, and the
worker's own size checks (procmqtt/outbox.py, procmqtt/brokersocket.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections import defaultdict
from collections.abc import Iterator

import pytest

from harness import Procmqtt, Subscriber, publish_all, publisher, records, start, wait_until, write_config
from procmqtt import topics
from procmqtt.testing import WorkerHarness

APP = "tests/apps_publish.py:Publishers"


def _run(runs: list, tmp_path, broker, *args: str, env: dict | None = None, **kwargs) -> Procmqtt:
    cfg = write_config(tmp_path / "p.toml", broker, **kwargs)
    run = Procmqtt(tmp_path, APP, cfg, *args, env=env)
    runs.append(run)
    run.ready()
    return run


def _in_order(sub: Subscriber) -> dict[str, list[int]]:
    got: dict[str, list[int]] = defaultdict(list)
    with sub.lock:
        for m in sub.messages:
            got[m.topic].append(int(m.payload))
    return got


@pytest.mark.timeout(90)
def test_64_workers_start_and_deliver_with_the_default_config(tmp_path, broker, runs):
    """-w 64 was refused: publish_buffer (1,000) x 64 is over the 60,000 paho message ids."""
    out = Subscriber(broker, "echoed/#")
    run, rec = start(runs, tmp_path, broker, topics={"echo/#": 1}, workers=1, args=("-w", "64"),
                     wait_ready=False)
    run.ready(60)
    run.wait_for_log(r"started worker 63 ", 60)
    publish_all(publisher(broker), [(f"echo/{i}", str(i).encode()) for i in range(200)])
    wait_until(lambda: len(out.messages) >= 200, 60, "200 echoes")
    assert sorted(int(p) for p in out.payloads()) == list(range(200))
    assert len({r["worker"] for r in records(rec)}) > 10  # spread over the 64 workers
    out.close()
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_publishes_past_what_paho_holds_wait_in_the_agent_and_go_out_in_order(tmp_path, broker, runs):
    """paho gets 3 at a time here (TEST_PAHO_WINDOW): 2 x 600 publishes queue in the agent."""
    out = Subscriber(broker, "out/#")
    run = _run(runs, tmp_path, broker, env={"TEST_PAHO_WINDOW": "3"}, topics={"flood/#": 0}, workers=2,
               workers_toml='dispatch = "round_robin"')
    publish_all(publisher(broker), [("flood/600", b""), ("flood/600", b"")], qos=0)
    run.wait_for_log(r"flood: 600 of 600 confirmed", 40, count=2)
    wait_until(lambda: len(out.messages) >= 1200, 20, "the 1,200 publishes")
    assert _in_order(out) == {"out/0": list(range(600)), "out/1": list(range(600))}
    out.close()
    assert run.stop() == 0


@pytest.mark.timeout(90)
def test_more_publishes_outstanding_than_paho_has_message_ids(tmp_path, broker, runs):
    """70,000 QoS 1 publishes unconfirmed at once (the broker is frozen), then all delivered in order."""
    out = Subscriber(broker, "out/#")
    run = _run(runs, tmp_path, broker, topics={"flood/#": 0}, workers=2, app={"delay": 1.0},
               mqtt="publish_buffer = 35000", workers_toml='dispatch = "round_robin"')
    publish_all(publisher(broker), [("flood/35000", b""), ("flood/35000", b"")], qos=0)
    run.wait_for_log(r"handling flood/35000", 10, count=2)
    with frozen(broker):  # within the handlers' 1 s delay: nothing they publish is confirmed before...
        run.wait_for_log(r"flood: published 35000", 60, count=2)
    run.wait_for_log(r"flood: 35000 of 35000 confirmed", 60, count=2)  # ... the broker thaws
    wait_until(lambda: len(out.messages) >= 70_000, 60, "the 70,000 publishes")
    assert _in_order(out) == {"out/0": list(range(35_000)), "out/1": list(range(35_000))}
    out.close()
    assert run.stop() == 0


@contextlib.contextmanager
def frozen(broker) -> Iterator[None]:
    """The broker stopped (SIGSTOP): connections stay open, nothing is read or acknowledged."""
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        broker.proc.send_signal(signal.SIGCONT)
