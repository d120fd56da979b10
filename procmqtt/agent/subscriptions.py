"""The app's subscriptions as the agent keeps them across its own restarts: a JSON file of
``{filter: qos}`` in the supervisor's state directory. Runs in the agent process.

Whatever the file holds is checked before it reaches paho: a filter that paho or the broker
refuses would otherwise crash every agent that loads it, a crash loop no restart can end. So a
record is checked as subscribed (inside ``$share/<group>/`` with ``share_group``) before it is
saved, and a bad entry already in the file is dropped with a log line when it is loaded.

:class:`Subscriptions` also sends them: all of them on every connection (a broker without our
session has none), a runtime change at once when connected, and an unsubscribe made offline on
the next connection (a persistent session may still hold the filter).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

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


class Subscriptions:
    """The filters the app subscribes (saved at every change) and the requests awaiting the broker."""

    def __init__(self, m: MqttConfig, path: str, log: logging.Logger) -> None:
        self.m = m
        self.path = path
        self.log = log
        self.filters = load(path, m, log)  # filter -> qos, as configured or changed at run time
        self.requests: dict[int, list[str]] = {}  # mid -> filters of a SUBSCRIBE/UNSUBSCRIBE in flight
        self.unsubscribe_on_connect: set[str] = set()  # removed offline; a persistent session may hold them

    def __len__(self) -> int:
        return len(self.filters)

    def connected(self, client: mqtt.Client) -> None:
        """A new connection: subscribe everything, and send the unsubscribes made offline. Requests
        of an earlier connection are never answered (paho does not send them again): forgotten."""
        self.requests.clear()
        if self.filters:
            self.subscribe(client, list(self.filters.items()))
        if self.unsubscribe_on_connect:
            self.unsubscribe(client, sorted(self.unsubscribe_on_connect))
            self.unsubscribe_on_connect.clear()

    def add(self, topic_filter: str, qos: int, client: mqtt.Client | None) -> None:
        """A runtime subscription; ``client`` while connected."""
        why = problem(self.m, topic_filter, qos)
        if why is not None:  # saved, it would crash every agent that loads it
            self.log.error("runtime subscription to %s dropped, not saved: %s", shown(topic_filter), why)
            return
        self.filters[topic_filter] = qos
        self.unsubscribe_on_connect.discard(topic_filter)
        save(self.path, self.filters)
        if client is not None:
            self.subscribe(client, [(topic_filter, qos)])

    def remove(self, topic_filter: str, client: mqtt.Client | None) -> None:
        """A runtime unsubscribe; ``client`` while connected, else it is sent on the next connection."""
        why = problem(self.m, topic_filter, 0)
        if why is not None:  # never subscribed, and paho would refuse it
            self.log.error("unsubscribe from %s ignored: %s", shown(topic_filter), why)
            return
        self.filters.pop(topic_filter, None)
        save(self.path, self.filters)
        if client is not None:
            self.unsubscribe(client, [topic_filter])
        else:
            self.unsubscribe_on_connect.add(topic_filter)

    def subscribe(self, client: mqtt.Client, subs: list[tuple[str, int]]) -> None:
        valid = []
        for f, qos in subs:  # one bad filter must not cost the others (paho refuses the whole list)
            why = problem(self.m, f, qos)
            if why is None:
                valid.append((f, qos))
            else:
                self.log.error("not subscribing to %s: %s", shown(f), why)
        wire = [(self.m.wire_filter(f), qos) for f, qos in valid]
        if not wire:
            return
        try:
            rc, mid = client.subscribe(wire)
        except Exception:  # paho refuses what the checks missed: a failed request, not a dead agent
            self.log.exception("paho refused to subscribe to %s", ", ".join(shown(f) for f, _ in wire))
            return
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self.requests[mid] = [f for f, _ in wire]

    def unsubscribe(self, client: mqtt.Client, filters: list[str]) -> None:
        wire = [self.m.wire_filter(f) for f in filters]
        try:
            _, mid = client.unsubscribe(wire)
        except Exception:  # as in subscribe
            self.log.exception("paho refused to unsubscribe from %s", ", ".join(shown(f) for f in wire))
            return
        if mid is not None:
            self.requests[mid] = wire

    def subscribe_replies(self, client: mqtt.Client, reply_filter: str) -> None:
        """MQTT 5 replies (``replies``) are this instance's own: never inside the share group, never saved.

        QoS 0: a QoS 1 reply would need a slot of the Receive Maximum window, which handlers waiting
        for replies may hold entirely; it would then wait for a slot only its own arrival can free.
        """
        try:
            rc, mid = client.subscribe(reply_filter, 0)
        except Exception:  # as in subscribe
            self.log.exception("paho refused to subscribe to %s", reply_filter)
            return
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self.requests[mid] = [reply_filter]

    def granted(self, mid: int, reasons: list[Any]) -> list[tuple[str, int]]:
        """The broker's SUBACK; returns the filters it refused, with the reason codes."""
        filters = self.requests.pop(mid, [])
        granted, refused = [], []
        for topic_filter, reason in zip(filters, reasons, strict=False):
            if reason.is_failure:
                self.log.error("the broker refused the subscription to %s: %s", topic_filter, reason)
                refused.append((topic_filter, reason.value))
            else:
                granted.append(f"{topic_filter} (qos {reason.value})")
        if granted:
            self.log.info("subscribed to %s", ", ".join(granted))
        return refused

    def unsubscribed(self, mid: int) -> None:
        """The broker's UNSUBACK."""
        for topic_filter in self.requests.pop(mid, []):
            self.log.info("unsubscribed from %s", topic_filter)
