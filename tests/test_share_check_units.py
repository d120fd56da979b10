"""The share_group check's decisions without a broker (procmqtt/agent/sharecheck.py): the paths
the integration tests (tests/test_share_check.py) cannot reach on a real broker, above all that a
check whose messages never come back is skipped with a warning, never a false alarm."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from procmqtt.agent import sharecheck
from procmqtt.agent.sharecheck import ShareCheck
from procmqtt.config.values import MqttConfig

pytestmark = pytest.mark.unit


class Client:
    """What the check asks of paho, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def subscribe(self, subs: Any) -> tuple[MQTTErrorCode, int]:
        self.calls.append(("subscribe", subs))
        return MQTTErrorCode.MQTT_ERR_SUCCESS, 7

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self.calls.append(("publish", topic))

    def unsubscribe(self, filters: Any) -> None:
        self.calls.append(("unsubscribe", filters))


GRANTED, REFUSED = ReasonCode(PacketTypes.SUBACK, identifier=0), ReasonCode(PacketTypes.SUBACK, identifier=0x80)


def _check(caplog: pytest.LogCaptureFixture) -> tuple[ShareCheck, Client]:
    check = ShareCheck(replace(MqttConfig(), share_group="g"), "app-1", logging.getLogger("test"))
    client = Client()
    assert check.connected(client, None, v5=False) is None  # type: ignore[arg-type]
    assert client.calls == [("subscribe", [(check.filter, 0), (check.witness, 0)])]
    return check, client


def test_the_shared_message_back_passes_and_unsubscribes(caplog):
    check, client = _check(caplog)
    assert check.granted(7, [GRANTED, GRANTED], [], client, 100.0) is None  # type: ignore[arg-type]
    assert check.listening() and check.waiting
    assert check.arrived(check.witness, client)  # type: ignore[arg-type]
    assert check.arrived(check.topic, client)  # type: ignore[arg-type]
    assert not check.needed and ("unsubscribe", [check.filter, check.witness]) in client.calls
    assert check.arrived(check.witness, client), "a late check message is still not the app's"  # type: ignore[arg-type]
    assert not check.arrived("orders/1", client)  # type: ignore[arg-type]


def test_neither_message_back_is_a_warning_not_an_error(caplog):
    check, client = _check(caplog)
    check.granted(7, [GRANTED, GRANTED], [], client, 100.0)  # type: ignore[arg-type]
    assert check.due(100.0 + sharecheck.CHECK_TIMEOUT - 0.1, client) is None  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        assert check.due(100.0 + sharecheck.CHECK_TIMEOUT, client) is None  # type: ignore[arg-type]
    assert "neither check message came back" in caplog.text
    assert not check.needed


def test_a_refused_witness_skips_the_check(caplog):
    check, client = _check(caplog)
    with caplog.at_level(logging.WARNING):
        assert check.granted(7, [GRANTED, REFUSED], [], client, 100.0) is None  # type: ignore[arg-type]
    assert "cannot check" in caplog.text and not check.needed and not check.waiting


def test_only_the_witness_back_is_the_error_naming_share_group(caplog):
    check, client = _check(caplog)
    check.granted(7, [GRANTED, GRANTED], [], client, 100.0)  # type: ignore[arg-type]
    check.arrived(check.witness, client)  # type: ignore[arg-type]  # the grace starts: deadline moves
    assert check.due(check.deadline - 0.01, client) is None  # type: ignore[arg-type]
    error = check.due(check.deadline, client)  # type: ignore[arg-type]
    assert error is not None and error.startswith("[mqtt] share_group = 'g': the broker at ")


def test_mqtt5_without_the_property_is_trusted_and_checks_nothing(caplog):
    check = ShareCheck(replace(MqttConfig(), share_group="g"), "app-1", logging.getLogger("test"))
    client = Client()
    assert check.connected(client, object(), v5=True) is None  # type: ignore[arg-type]
    assert client.calls == [] and not check.needed


def test_no_share_group_checks_nothing(caplog):
    check = ShareCheck(MqttConfig(), "app-1", logging.getLogger("test"))
    client = Client()
    assert check.connected(client, None, v5=False) is None  # type: ignore[arg-type]
    assert client.calls == [] and not check.listening()


def test_mqtt5_not_authorized_is_the_acl_not_a_missing_feature(caplog):
    """Only 0x9E says "no shared subscriptions" on MQTT 5; 0x87 is an ACL, logged as any refusal."""
    check = ShareCheck(replace(MqttConfig(), share_group="g", protocol="5"), "app-1", logging.getLogger("test"))
    client = Client()
    assert check.granted(3, [], [("$share/g/secret/#", 0x87)], client, 0.0) is None  # type: ignore[arg-type]
    error = check.granted(3, [], [("$share/g/orders/#", 0x9E)], client, 0.0)  # type: ignore[arg-type]
    assert error is not None and "refused the shared subscription $share/g/orders/# (SUBACK reason code 0x9E)" in error
