"""The app's subscriptions as the agent keeps them across its own restarts: a JSON file of
``{filter: qos}`` in the supervisor's state directory. Runs in the agent process.

Whatever the file holds is checked before it reaches paho: a filter that paho or the broker
refuses would otherwise crash every agent that loads it, a crash loop no restart can end. So a
record is checked as subscribed (inside ``$share/<group>/`` with ``share_group``) before it is
saved, and a bad entry already in the file is dropped with a log line when it is loaded.
"""

from __future__ import annotations

import json
import logging
import os

from procmqtt.config import MqttConfig
from procmqtt.topics import filter_problem


def problem(m: MqttConfig, topic_filter: object, qos: object) -> str | None:
    """Why ``topic_filter`` at ``qos`` cannot be subscribed as the agent would send it, or None."""
    if not isinstance(topic_filter, str):
        return "a topic filter must be a string"
    try:
        topic_filter.encode()
    except UnicodeEncodeError:
        return "a topic filter must be valid UTF-8"
    found = filter_problem(topic_filter)
    if found is None and m.share_group:
        found = filter_problem(m.wire_filter(topic_filter))
        if found is not None:
            found += f" as subscribed, inside $share/{m.share_group}/ ([mqtt] share_group)"
    if found is None and (type(qos) is not int or qos not in (0, 1, 2)):
        found = f"qos must be 0, 1 or 2, got {qos!r}"
    return found


def shown(topic_filter: object) -> str:
    """A filter for a log line: a runaway one is cut short."""
    text = repr(topic_filter)
    return text if len(text) <= 100 else f"{text[:100]}... ({len(text)} characters)"


def load(path: str, m: MqttConfig, log: logging.Logger) -> dict[str, int]:
    """The saved subscriptions, without invalid entries; ``[mqtt.topics]`` when there is no file
    (or it cannot be read: logged)."""
    configured = {s.topic_filter: s.qos for s in m.topics}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        return configured
    except (OSError, ValueError) as exc:
        log.error("cannot read the saved subscriptions in %s (%s); using [mqtt.topics]", path, exc)
        return configured
    if not isinstance(saved, dict):
        log.error("the saved subscriptions in %s are not a JSON object; using [mqtt.topics]", path)
        return configured
    kept: dict[str, int] = {}
    for topic_filter, qos in saved.items():
        why = problem(m, topic_filter, qos)
        if why is None:
            kept[topic_filter] = qos
        else:
            log.error("dropping the saved subscription %s: %s", shown(topic_filter), why)
    return kept


def save(path: str, subscriptions: dict[str, int]) -> None:
    """Replace the file atomically: an agent killed mid-write leaves the previous version."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(subscriptions, f)
    os.replace(tmp, path)
