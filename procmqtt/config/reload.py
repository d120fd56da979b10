"""SIGHUP: what a newly loaded configuration changes in a running procmqtt (decided in the supervisor).

As in gunicorn, every reload replaces the workers gracefully, so new code and every setting the
workers read take effect. The broker side is procmqtt's own:

- ``[mqtt.topics]`` changes reach the running agent as the subscribe / unsubscribe records a
  worker's ``self.subscribe`` sends, so the connection, and every message on it, stays.
- A setting the agent reads when it starts (host, port, credentials, client id, protocol, TLS,
  will, ... and the ``[workers]`` settings it applies) needs a new connection: the agent restarts
  gracefully. With a persistent session (the default) the broker keeps the messages meanwhile.
- A section nothing running can adopt (``[metrics]``: the socket was opened at start) keeps its
  old value, and the reload says a restart is needed for it.

Which is which is each key's ``reload`` in ``schema.KEYS``; the sets below derive from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

from procmqtt.config.schema import APP_SECTION, KEYS, SECTIONS, Reload
from procmqtt.config.values import Config, Subscription

AGENT_KEYS: dict[str, tuple[str, ...]] = {
    section: tuple(k.name for k in KEYS if k.section == section and k.field and k.reload is Reload.AGENT)
    for section in SECTIONS
}
"""Per section, the fields the agent reads when it starts: a change needs a new agent (connection)."""
LIVE_MQTT_KEYS = frozenset(k.name for k in KEYS if k.section == "mqtt" and k.field and k.reload is not Reload.AGENT)
"""[mqtt] keys applied without a new connection: subscriptions live, the others by new workers."""
AGENT_WORKERS_KEYS = AGENT_KEYS["workers"]
"""[workers] keys the agent reads when it starts (the rest are read by the workers or the supervisor)."""
RELOADED_SECTIONS = frozenset(
    {APP_SECTION, "source", *(k.section for k in KEYS if "." not in k.section and k.reload is not Reload.RESTART)}
)
"""Config fields a reload applies; any other section needs a restart of procmqtt."""


@dataclass(frozen=True)
class Changes:
    """The difference between the running configuration and a newly loaded one."""

    subscribe: tuple[Subscription, ...] = ()  # new filters, or a new QoS for a filter
    unsubscribe: tuple[str, ...] = ()  # filters no longer in [mqtt.topics]
    agent: tuple[str, ...] = ()  # changed keys that need a new agent (a new connection)
    needs_restart: tuple[str, ...] = ()  # changed sections kept as they were until procmqtt restarts

    def describe(self) -> str:
        parts = []
        if self.subscribe:
            parts.append("subscribe " + ", ".join(f"{s.topic_filter} (qos {s.qos})" for s in self.subscribe))
        if self.unsubscribe:
            parts.append("unsubscribe " + ", ".join(self.unsubscribe))
        if self.agent:
            parts.append(f"{', '.join(self.agent)} changed: the agent reconnects (graceful restart)")
        if self.needs_restart:
            parts.append(f"{', '.join(self.needs_restart)} changed: kept as it was until procmqtt restarts")
        return "; ".join(parts) or "no subscription or connection change"


def compare(old: Config, new: Config) -> Changes:
    """What a reload from ``old`` to ``new`` does beyond replacing the workers. Names keys, never values."""
    old_topics = {s.topic_filter: s.qos for s in old.mqtt.topics}
    new_topics = {s.topic_filter: s.qos for s in new.mqtt.topics}
    agent = [
        f"[{section}] {name}"
        for section, names in AGENT_KEYS.items()
        if section in RELOADED_SECTIONS
        for name in names
        if getattr(getattr(old, section), name) != getattr(getattr(new, section), name)
    ]
    return Changes(
        subscribe=tuple(Subscription(f, q) for f, q in new_topics.items() if old_topics.get(f) != q),
        unsubscribe=tuple(f for f in old_topics if f not in new_topics),
        agent=tuple(agent),
        needs_restart=tuple(f"[{name}]" for name in _changed(old, new) if name not in RELOADED_SECTIONS),
    )


def adoptable(old: Config, new: Config) -> Config:
    """``new``, with the sections a reload cannot apply kept as they are in ``old``."""
    kept = {name: getattr(old, name) for name in _changed(old, new) if name not in RELOADED_SECTIONS}
    return replace(new, **kept)


def _changed(old: Any, new: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
