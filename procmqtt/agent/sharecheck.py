"""Whether the broker really has shared subscriptions, when ``[mqtt] share_group`` asks for them.

Runs in the agent process, driven by the session. Some brokers grant ``$share/<group>/<filter>``
as an ordinary filter whose first level is ``$share`` (NATS 2.9, RabbitMQ 3.x: docs/brokers.md):
the app then receives nothing, with no error anywhere. So the agent checks, once per process:

- MQTT 5: the CONNACK's "Shared Subscription Available" property (absent means available);
- a refused SUBACK for one of the app's ``$share/`` filters (0x80 on MQTT 3.1.1, where it may also
  be an ACL; on MQTT 5 only 0x9E "Shared Subscriptions not supported", not "Not authorized");
- MQTT 3.1.1, which has no such property: a round trip. The agent subscribes (QoS 0)
  ``$share/<group>/procmqtt/share-check/<client id>/shared`` and, as a witness, the plain
  ``procmqtt/share-check/<client id>/plain``; once both are granted it publishes one empty QoS 0
  message to each topic. A broker with shared subscriptions brings the first back; one that took
  the filter literally brings back only the witness. Judged ``GRACE`` (or twice the witness's
  round trip) after the witness arrives, so a broker without them is found in about a second;
  if neither comes back within ``CHECK_TIMEOUT`` (an ACL, a broker dropping them) nothing is known
  and the check is skipped with a warning, never a false alarm.

Any of them failing is a configuration mistake the broker reveals: the agent stops with one line
naming ``share_group`` and exit code 2 (``ExitCode.USAGE``), and the supervisor stops with it.
If the broker refuses the check's own subscription (an ACL, say), the check is skipped with a warning.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from procmqtt import mqtt5
from procmqtt.config import MqttConfig

CHECK_TIMEOUT = 10.0
"""Seconds the check waits for either message before it gives up, knowing nothing."""
GRACE = 1.0
"""Seconds the shared message may trail the witness (at least; twice the witness's round trip if
longer): a broker routes both publishes within milliseconds of each other."""
CHECK_TOPIC = "procmqtt/share-check/"
NOT_SUPPORTED_V5 = 0x9E  # SUBACK "Shared Subscriptions not supported"
REFUSED_V311 = 0x80  # MQTT 3.1.1's one SUBACK failure code


class ShareCheck:
    """One agent's check; ``waiting`` while its message is out (the intake then looks for it)."""

    def __init__(self, m: MqttConfig, client_id: str, log: logging.Logger) -> None:
        self.m = m
        self.log = log
        self.base = CHECK_TOPIC + mqtt5.topic_level(client_id) + "/"
        self.topic, self.witness = f"{self.base}shared", f"{self.base}plain"
        self.filter = f"$share/{m.share_group}/{self.topic}"
        self.needed = bool(m.share_group)  # until it passes once: later connections are not checked
        self.no_shared = NOT_SUPPORTED_V5 if m.protocol == "5" else REFUSED_V311  # the SUBACK code that says so
        self.mid: int | None = None  # of the check's SUBSCRIBE, until its SUBACK
        self.waiting = False  # both published; neither judged yet
        self.sent = self.deadline = 0.0
        self.witnessed = False
        self.quiet_after = 0.0  # a late check message may still come until then

    def _refused(self, how: str) -> str:
        m = self.m
        return (
            f"[mqtt] share_group = {m.share_group!r}: the broker at {m.host}:{m.port} {how}, so "
            "instances would not share the stream; remove share_group (every instance then gets "
            "every message) or use a broker with shared subscriptions (docs/brokers.md)"
        )

    def connected(self, client: mqtt.Client, properties: Any, v5: bool) -> str | None:
        """A new connection: the MQTT 5 answer, or the 3.1.1 round trip begins. Returns the error."""
        self.mid, self.waiting = None, False
        if not self.needed:
            return None
        if v5:
            if getattr(properties, "SharedSubscriptionAvailable", 1) == 0:
                return self._refused(
                    'says in its CONNACK that it has no shared subscriptions ("Shared Subscription Available" = 0)'
                )
            self.needed = False
            return None
        rc, mid = client.subscribe([(self.filter, 0), (self.witness, 0)])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.mid = mid
        return None

    def granted(
        self, mid: int, reasons: list[Any], refused: list[tuple[str, int]], client: mqtt.Client, now: float
    ) -> str | None:
        """A SUBACK: the app's ``$share/`` filters refused, or the check's subscription answered.
        MQTT 5 names the cause (0x9E); another code there is the broker's ACL, logged as before."""
        shared = [(f, code) for f, code in refused if f.startswith("$share/") and code == self.no_shared]
        if shared and self.m.share_group:
            f, code = shared[0]
            return self._refused(f"refused the shared subscription {f} (SUBACK reason code 0x{code:02X})")
        if mid != self.mid:
            return None
        self.mid = None
        if len(reasons) != 2 or reasons[1].is_failure or (reasons[0].is_failure and reasons[0].value != self.no_shared):
            self.needed = False
            self.log.warning("cannot check that the broker has shared subscriptions: it refused the check's filters")
            client.unsubscribe([self.filter, self.witness])
            return None
        if reasons[0].is_failure:
            return self._refused(
                f"refused the shared subscription {self.filter} (SUBACK reason code 0x{reasons[0].value:02X})"
            )
        client.publish(self.topic, b"", 0)
        client.publish(self.witness, b"", 0)
        self.waiting, self.witnessed = True, False
        self.sent, self.deadline = now, now + CHECK_TIMEOUT
        return None

    def listening(self) -> bool:
        """Whether the intake must look for the check's messages (they are never the app's)."""
        return self.waiting or self.mid is not None or time.monotonic() < self.quiet_after

    def arrived(self, topic: str, client: mqtt.Client) -> bool:
        """The intake's question while ``listening``: is this a check message? (Then it is consumed.)"""
        if not topic.startswith(self.base):
            return False
        if topic == self.witness and self.waiting:
            now = time.monotonic()
            self.witnessed, self.deadline = True, now + max(GRACE, 2 * (now - self.sent))
        if topic != self.topic or not self.waiting:
            return True
        self.waiting = self.needed = False
        self.quiet_after = time.monotonic() + CHECK_TIMEOUT
        self.log.info("share_group: the broker has shared subscriptions (a message came back through %s)", self.filter)
        client.unsubscribe([self.filter, self.witness])
        return True

    def due(self, now: float, client: mqtt.Client) -> str | None:
        """Once a second: the shared message that never came, or neither (nothing known)."""
        if not self.waiting or now < self.deadline:
            return None
        self.waiting, self.quiet_after = False, now + CHECK_TIMEOUT
        if not self.witnessed:
            client.unsubscribe([self.filter, self.witness])
            self.needed = False
            self.log.warning(
                "cannot check that the broker has shared subscriptions: neither check message came back "
                "within %gs (published to %s and %s)",
                CHECK_TIMEOUT,
                self.topic,
                self.witness,
            )
            return None
        return self._refused(
            f"took {self.filter} as a plain filter: a message published to {self.topic} never came "
            "through it (its plain witness did)"
        )
