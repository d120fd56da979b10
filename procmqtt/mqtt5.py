"""MQTT 5 glue for the agent: paho's properties to and from ``Properties``, and the reply topics.

paho's ``Properties`` is a heavy object per packet; the workers get the small frozen
``procmqtt.Properties`` instead, built once here and packed into the channel record only when the
message carries properties. Runs in the agent process.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from procmqtt.message import EMPTY, Properties

REPLY_ROOT = "procmqtt/reply"
"""Replies to ``Worker.request`` come back on ``procmqtt/reply/<client id>/<worker slot>``."""


MAX_SLOT_DIGITS = 4
"""A reply topic's last level is a worker slot: at most this many ASCII digits (slots are < 1024)."""
_MAX_LEVEL = 64


def topic_level(client_id: str) -> str:
    """``client_id`` as one topic level that is valid in a filter, whatever the id holds.

    ``%``, ``+``, ``#``, ``/`` and NUL are percent-escaped, so two ids never share a level (and
    so never a reply topic); a long id (or one with control characters or lone surrogates) is
    replaced by ``%h`` and a hash (an escape never has ``h`` after ``%``), so no id can make a
    topic too long or invalid.
    """
    level = _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", client_id)
    if len(level.encode("utf-8", "surrogatepass")) > _MAX_LEVEL or not level.isprintable():
        level = "%h" + hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return level


def reply_prefix(client_id: str) -> str:
    """The reply topic without the worker slot."""
    return f"{REPLY_ROOT}/{topic_level(client_id)}/"


def reply_slot(topic: str, prefix: str) -> int | None:
    """The worker slot a reply topic under ``prefix`` names, or None: anyone may publish there, so
    only a short run of ASCII digits counts (``str.isdigit`` also accepts '²', and ``int`` of
    thousands of digits raises)."""
    slot = topic[len(prefix) :]
    if 0 < len(slot) <= MAX_SLOT_DIGITS and slot.isascii() and slot.isdigit():
        return int(slot)
    return None


def from_paho(props: Any) -> Properties:
    """The fields a handler may want from a received PUBLISH's properties (EMPTY when none)."""
    found = props.__dict__ if props is not None else {}
    if not found.keys() & _PAHO_NAMES:  # only a topic alias or subscription id, or nothing
        return EMPTY
    return Properties(
        tuple(found.get("UserProperty", ())),
        found.get("ContentType"),
        found.get("ResponseTopic"),
        found.get("CorrelationData"),
        found.get("MessageExpiryInterval"),
        found.get("PayloadFormatIndicator"),
    )


def to_paho(props: Properties, response_topic: str | None = None) -> PahoProperties:
    """paho's PUBLISH properties for ``props``; ``response_topic`` overrides the one in ``props``."""
    out = PahoProperties(PacketTypes.PUBLISH)
    if props.user_properties:
        out.UserProperty = list(props.user_properties)
    if props.content_type is not None:
        out.ContentType = props.content_type
    if response_topic or props.response_topic is not None:
        out.ResponseTopic = response_topic or props.response_topic
    if props.correlation_data is not None:
        out.CorrelationData = props.correlation_data
    if props.message_expiry is not None:
        out.MessageExpiryInterval = props.message_expiry
    if props.payload_format_indicator is not None:
        out.PayloadFormatIndicator = props.payload_format_indicator
    return out


_UNSAFE = re.compile("[%+#/\x00]")
_PAHO_NAMES = {
    "UserProperty",
    "ContentType",
    "ResponseTopic",
    "CorrelationData",
    "MessageExpiryInterval",
    "PayloadFormatIndicator",
}
