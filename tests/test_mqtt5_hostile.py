"""MQTT 5 request/reply against a real Mosquitto 2 when other clients misbehave: anyone may publish
under an instance's reply topics, and a client id may hold characters that are wildcards in a
topic filter."""

from __future__ import annotations

import re

import pytest
from harness import Procmqtt, records, wait_until, write_config
from test_mqtt5 import V5, publish_v5, run_app, v5_client

ODD_ID = "odd#id+/x"


@pytest.mark.timeout(90)
def test_hostile_reply_topics_and_a_wildcard_client_id(tmp_path, broker, runs):
    """'²'.isdigit() is True and int() of 5,000 digits raises: either one, published by any client
    under the reply topics, crashed the agent (again after each restart: the session keeps the
    subscription). A client id with '#' made the graceful stop's UNSUBSCRIBE invalid."""
    run_app(runs, tmp_path / "responder", broker, "tests/apps_mqtt5.py:Props", topics={"service/#": 1})
    directory = tmp_path / "asker"
    directory.mkdir()
    rec = directory / "records"
    rec.mkdir()
    cfg = write_config(
        directory / "procmqtt.toml",
        broker,
        topics={"ask/#": 1},
        workers=1,
        app={"record_dir": str(rec), "service": "service/echo"},
        mqtt=V5,
    )
    text = re.sub(r'client_id = ".*"', f'client_id = "{ODD_ID}"', (directory / "procmqtt.toml").read_text())
    (directory / "procmqtt.toml").write_text(text)
    asker = Procmqtt(directory, "tests/apps_mqtt5.py:Props", cfg)
    runs.append(asker)
    asker.ready()
    pub = v5_client(broker, "pub5")
    publish_v5(pub, "ask/1", b"first")
    wait_until(lambda: records(rec, "reply"), 15, "the first reply")
    reply_topic = records(rec, "reply")[0]["reply_topic"]
    prefix = reply_topic.rsplit("/", 1)[0] + "/"
    assert prefix.startswith("procmqtt/reply/") and prefix.count("/") == 3, prefix
    agent = asker.pids("agent")
    for slot in ["\u00b2", "9" * 5000, "0" * 5 + "1", "-1", "x"]:
        publish_v5(pub, prefix + slot, b"hostile")
    publish_v5(pub, prefix + "77", b"no such worker")
    publish_v5(pub, "ask/2", b"second")
    wait_until(lambda: len(records(rec, "reply")) >= 2, 15, "the second reply")
    assert asker.pids("agent") == agent, "the agent was restarted"
    log = asker.log()
    assert len(re.findall(r"WARNING .*names no worker slot; acknowledged and dropped", log)) == 1, log
    assert not records(rec, "received")[2:], "a hostile reply reached on_message"
    assert asker.stop() == 0
    log = asker.log()
    assert "disconnected from the broker" in log, log  # the sync UNSUBSCRIBE was accepted
    assert "5 bad reply topic(s) ignored" in log, log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_graceful_stop_syncs_with_a_wildcard_client_id(tmp_path, broker, runs, protocol):
    """The stop's UNSUBSCRIBE of procmqtt/sync/<id> is an invalid filter for an id with '#' or '+':
    the broker dropped the connection instead of confirming the last acknowledgements."""
    rec = tmp_path / "records"
    rec.mkdir()
    path = tmp_path / "procmqtt.toml"
    write_config(path, broker, topics={"t/#": 1}, app={"record_dir": str(rec)}, mqtt=f'protocol = "{protocol}"')
    path.write_text(re.sub(r'client_id = ".*"', 'client_id = "a+b#"', path.read_text()))
    run = Procmqtt(tmp_path, "tests/apps.py:Recorder", str(path))
    runs.append(run)
    run.ready()
    publish_v5(v5_client(broker, "pub5"), "t/1", b"x")
    wait_until(lambda: records(rec), 15, "the message handled")
    assert run.stop() == 0
    assert "INFO disconnected from the broker" in run.log(), run.log()
