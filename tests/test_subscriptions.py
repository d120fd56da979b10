"""Runtime subscriptions that paho or the broker would refuse never reach the state file, and a bad
entry already in it never crashes the agent that loads it (every new agent would crash again)."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
from harness import Procmqtt, publish_all, publisher, records, wait_until, write_config

from procmqtt.config import MqttConfig, Subscription

# Valid alone, 7 bytes too long inside "$share/g/" (9 bytes): MQTT strings are at most 65,535 bytes.
TOO_LONG_SHARED = "a" * 65533


def _start(tmp_path, broker, runs, app: str) -> tuple[Procmqtt, object]:
    rec = tmp_path / "records"
    rec.mkdir()
    cfg = write_config(
        tmp_path / "procmqtt.toml",
        broker,
        topics={"ctl/#": 1, "extra/#": 1},
        app={"record_dir": str(rec)},
        mqtt='share_group = "g"',
    )
    run = Procmqtt(tmp_path, app, cfg)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=2)
    return run, rec


def _agent_survives_a_restart(run: Procmqtt, pub, rec) -> None:
    """The next agent loads the state file: it must come up and deliver."""
    (agent,) = run.pids("agent").values()
    run.wait_for_log(r"subscribed to \$share/g/later/#")
    os.kill(agent, signal.SIGKILL)
    run.wait_for_log(r"\[agent\] INFO subscribed to", count=3)
    wait_until(lambda: run.pids("agent") and agent not in run.pids("agent").values(), 10, "a new agent")
    publish_all(pub, [("later/1", b"after the restart")])
    wait_until(lambda: [r for r in records(rec) if r["topic"] == "later/1"], 15, "a message on the runtime filter")
    assert "started agent" in run.log() and run.log().count("started agent") == 2, run.log()


@pytest.mark.timeout(60)
def test_worker_subscribe_checks_the_filter_inside_share_group(tmp_path, broker, runs):
    run, rec = _start(tmp_path, broker, runs, "tests/apps.py:Recorder")
    pub = publisher(broker)
    publish_all(pub, [("ctl/subscribe", TOO_LONG_SHARED.encode()), ("ctl/subscribe", b"later/#")])
    run.wait_for_log(
        r"ValueError: subscribe: a topic filter must be at most 65535 bytes as subscribed, "
        r"inside \$share/g/ \(\[mqtt\] share_group\), got 'aaa"
    )
    _agent_survives_a_restart(run, pub, rec)
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_agent_drops_a_bad_runtime_subscription_instead_of_saving_it(tmp_path, broker, runs):
    run, rec = _start(tmp_path, broker, runs, "tests/apps_hostile.py:RawSubscriber")
    pub = publisher(broker)
    publish_all(
        pub,
        [
            ("ctl/raw-subscribe", TOO_LONG_SHARED.encode()),
            ("ctl/raw-subscribe", b"bad/#/x"),
            ("ctl/subscribe", b"later/#"),
        ],
    )
    run.wait_for_log(
        r"ERROR runtime subscription to 'aaa.*dropped, not saved: a topic filter must be at most "
        r"65535 bytes as subscribed"
    )
    run.wait_for_log(r"ERROR runtime subscription to 'bad/#/x' dropped, not saved: '#' must be a whole level")
    _agent_survives_a_restart(run, pub, rec)
    assert run.stop() == 0


@pytest.mark.unit
def test_load_drops_invalid_saved_entries_with_a_log_line(tmp_path, caplog):
    from procmqtt.agent import subscriptions  # here, so the integration tests above run on a tree without it

    m = MqttConfig(share_group="g", topics=(Subscription("conf/#", 1),))
    path = tmp_path / "subscriptions.json"
    path.write_text(
        json.dumps({"ok/#": 1, TOO_LONG_SHARED: 1, "x/#/y": 0, "q/+": 7, "b/+": True, "s": "1", "\ud800": 1})
    )
    log = logging.getLogger("test-subscriptions")
    with caplog.at_level(logging.ERROR):
        assert subscriptions.load(str(path), m, log) == {"ok/#": 1}
    assert len(caplog.records) == 6, caplog.text
    assert "dropping the saved subscription 'aaaa" in caplog.text and "65535 bytes as subscribed" in caplog.text
    caplog.clear()
    for broken in ["{not json", "[1, 2]", "\xff\xfe"]:
        path.write_bytes(broken.encode("latin-1"))
        assert subscriptions.load(str(path), m, log) == {"conf/#": 1}
    assert len(caplog.records) == 3 and "using [mqtt.topics]" in caplog.text
    assert subscriptions.load(str(tmp_path / "missing.json"), m, log) == {"conf/#": 1}
