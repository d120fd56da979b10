"""Typed payloads and middleware on a real broker: an invalid body is dead-lettered at once, never
retried, while valid ones flow; a middleware named in [workers] middleware runs in the worker process."""

from __future__ import annotations

import json

import pytest
from harness import Procmqtt, Subscriber, publish_all, publisher, records, wait_until, write_config


@pytest.mark.timeout(60)
def test_an_invalid_body_is_dead_lettered_at_once_while_valid_ones_flow(tmp_path, broker, runs):
    dlq = Subscriber(broker, "dead/#")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = write_config(
        tmp_path / "typed.toml",
        broker,
        topics={},
        workers=2,
        app={"record_dir": str(record_dir)},
        workers_toml='on_error = "retry"\nmax_attempts = 5\ndead_letter_topic = "dead"\n'
        'middleware = ["apps_routes:Outcomes"]',
    )
    run = Procmqtt(tmp_path, "tests/apps_routes.py:Typed", cfg)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=2)
    bad = json.dumps({"celsius": "hot", "seq": 0}).encode()
    good = [(f"typed/d{i % 3}", json.dumps({"celsius": 20 + i, "seq": i}).encode()) for i in range(1, 21)]
    publish_all(publisher(broker), [("typed/d0", bad), *good])
    wait_until(lambda: len(records(record_dir)) == 20 and dlq.payloads() == [bad], 20, "20 done, 1 dead letter")
    assert sorted(r["seq"] for r in records(record_dir)) == list(range(1, 21))
    seen = records(record_dir, "middleware")
    invalid = [r for r in seen if r["ended"] == "invalid"]
    assert [(r["topic"], r["field"], r["redelivered"]) for r in invalid] == [("typed/d0", "reading.celsius", False)]
    assert len(seen) == 21 and not any(r["redelivered"] for r in seen), "the invalid body was handed out once"
    log = run.log()
    assert log.count("invalid body on topic 'typed/d0'") == 1
    assert "reading.celsius: expected a number, got 'hot'; dead-lettered to 'dead', not retried" in log
    assert "dead-lettering the message" not in log  # the worker's line is the one line
    dlq.close()
    assert run.stop() == 0
    assert "21 received, 21 processed (0 unrouted), 1 failed (1 invalid)" in run.log()
