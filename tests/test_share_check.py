"""``[mqtt] share_group`` on a broker without shared subscriptions stops procmqtt with exit code 2
and one line naming ``share_group`` (procmqtt/agent/sharecheck.py), however the broker says so:
an MQTT 5 CONNACK, a refused SUBACK (tests/hostile_broker.py), or, like NATS and RabbitMQ 3.x,
by granting ``$share/...`` as a plain filter (the round trip with a witness). Mosquitto, which
has them, passes the check: tests/test_broker_features.py.

Each of these failed before the check: procmqtt ran on, subscribed, with nothing ever handled."""

from __future__ import annotations

import pytest
from harness import Procmqtt, records, start, write_config
from hostile_broker import HostileBroker


def _stops_with_exit_2(run: Procmqtt, *expected: str) -> str:
    assert run.wait(20) == 2, run.log()
    errors = [line for line in run.log().splitlines() if " ERROR [mqtt] share_group = 'g': the broker at " in line]
    assert errors, run.log()
    for text in expected:
        assert text in errors[0], errors[0]
    assert "stopping with exit code 2" in run.log()
    assert "Traceback" not in run.log()
    return errors[0]


@pytest.mark.timeout(60)
def test_a_broker_that_grants_share_as_a_plain_filter(tmp_path, runs, nats_broker):
    run, rec = start(runs, tmp_path, nats_broker, topics={"sh/#": 1}, mqtt='share_group = "g"', wait_ready=False)
    line = _stops_with_exit_2(
        run, "took $share/g/procmqtt/share-check/", "as a plain filter: a message published to procmqtt/share-check/"
    )
    print(line)
    assert not records(rec)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "v5, how",
    [
        (True, '"Shared Subscription Available" = 0'),
        (False, "refused the shared subscription $share/g/sh/# (SUBACK reason code 0x80)"),
    ],
    ids=["5-connack", "3.1.1-suback"],
)
def test_a_broker_that_says_it_has_none(tmp_path, runs, v5, how):
    broker = HostileBroker(
        v5=v5,
        after_subscribe=lambda conn: None,
        connack_properties=b"\x2a\x00" if v5 else b"",  # Shared Subscription Available = 0
        refuse_shared=not v5,
    )
    try:
        mqtt = 'share_group = "g"' + ('\nprotocol = "5"' if v5 else "")
        cfg = write_config(
            tmp_path / "procmqtt.toml",
            None,  # type: ignore[arg-type]
            topics={"sh/#": 1},
            app={"record_dir": str(tmp_path)},
            mqtt=mqtt,
            port=broker.port,
        )
        run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg)
        runs.append(run)
        print(_stops_with_exit_2(run, how))
    finally:
        broker.close()
