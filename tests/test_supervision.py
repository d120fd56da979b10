"""The supervisor's decisions on real process trees: a worker that dies before reporting its Done
is charged the attempt."""

from __future__ import annotations

import pytest

from harness import Procmqtt, publish_all, publisher, records, write_config


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", ["DiesBeforeDone", "AsyncDiesBeforeDone"])
def test_a_worker_that_dies_before_reporting_done_is_charged_the_attempt(tmp_path, broker, runs, app):
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cfg = write_config(tmp_path / "p.toml", broker, topics={"poison": 1}, workers=2,
                       app={"record_dir": str(record_dir)}, workers_toml="max_attempts = 3")
    run = Procmqtt(tmp_path, f"tests/apps_supervision.py:{app}", cfg)
    runs.append(run)
    run.ready()
    publish_all(publisher(broker), [("poison", b"x")])
    run.wait_for_log(r"dropping the message on 'poison': worker \d died while handling it \(3 attempts\)")
    assert len(records(record_dir, "received")) == 3
    assert run.stop() == 0
    assert len(records(record_dir, "received")) == 3
