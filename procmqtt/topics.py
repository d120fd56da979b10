"""MQTT topic names and filters, checked before anything reaches the broker.

The broker would reject a bad filter with a SUBACK failure long after startup; checking here turns
a typo into a startup error that names the key.
"""

from __future__ import annotations

from paho.mqtt.client import topic_matches_sub

MAX_TOPIC_BYTES = 65535


def filter_problem(topic_filter: object) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT subscription filter, or None when it is.

    Accepts shared subscriptions (``$share/<group>/<filter>``).
    """
    if not isinstance(topic_filter, str):
        return "a topic filter must be a string"
    if not topic_filter:
        return "a topic filter must not be empty"
    if "\x00" in topic_filter:
        return "a topic filter must not contain NUL"
    if len(topic_filter.encode()) > MAX_TOPIC_BYTES:
        return f"a topic filter must be at most {MAX_TOPIC_BYTES} bytes"
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or any(c in levels[1] for c in "+#"):
            return "a shared subscription must look like $share/<group>/<filter>"
        levels = levels[2:]
        if not "/".join(levels):
            return "a shared subscription must look like $share/<group>/<filter>"
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def topic_problem(topic: object) -> str | None:
    """Why ``topic`` is not a valid topic name to publish to, or None when it is."""
    if not isinstance(topic, str):
        return "a topic must be a string"
    if not topic:
        return "a topic must not be empty"
    if "+" in topic or "#" in topic:
        return "a topic to publish to must not contain wildcards ('+' or '#')"
    if "\x00" in topic:
        return "a topic must not contain NUL"
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        return f"a topic must be at most {MAX_TOPIC_BYTES} bytes"
    return None


def unshared(topic_filter: str) -> str:
    """The filter topics are matched against: without a shared subscription's ``$share/<group>/``."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when ``topic`` matches ``topic_filter`` by MQTT's rules (``$share/<group>/`` ignored)."""
    return topic_matches_sub(unshared(topic_filter), topic)


MAX_REMAINING_LENGTH = 268_435_455
"""MQTT's largest packet after its fixed header: a PUBLISH's topic, packet id, properties and
payload must fit in it (the "256 MiB" limit)."""


def packet_problem(topic: str, payload_size: int, qos: int, properties_size: int | None = None) -> str | None:
    """Why a PUBLISH of ``topic`` and a payload of ``payload_size`` bytes cannot be sent, or None.

    ``properties_size``: the packed MQTT 5 properties (None on MQTT 3.1.1).
    """
    problem = topic_problem(topic)
    if problem:
        return problem
    size = 2 + len(topic.encode()) + (2 if qos else 0) + payload_size
    if properties_size is not None:
        size += 4 + properties_size  # their length takes at most four bytes
    if size > MAX_REMAINING_LENGTH:
        return (
            f"the payload of {payload_size:,} bytes is too large: with the topic and headers the packet "
            f"takes {size:,} bytes, over MQTT's maximum packet size of {MAX_REMAINING_LENGTH:,}"
        )
    return None
