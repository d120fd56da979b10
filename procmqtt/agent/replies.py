"""MQTT 5 request/reply in the agent: where the replies to a worker's requests come back.

A request carries a response topic under this instance's reply prefix, ending in the worker's
slot; the agent subscribes to the prefix once the first request is made (never inside the share
group, never saved) and routes what arrives there to that slot's worker, acknowledged at once: a
reply is an answer a handler awaits, not work for the app. "Reply" means only this, in the agent;
the agent's word for how a worker's publish went is "answer" (``channel.Published``).
Runs in the agent process, in its one thread.
"""

from __future__ import annotations

from procmqtt import mqtt5
from procmqtt.ipc import channel

REPLY_WAIT_FALLBACK = 30.0
"""Seconds to keep reading for a reply when a request carries no message expiry."""


class Replies:
    """The reply filter's state: subscribed or not, how long a handler may still wait, replies routed."""

    def __init__(self, client_id: str) -> None:
        self.prefix = mqtt5.reply_prefix(client_id)  # + worker slot: where its replies come back
        self.filter = self.prefix + "+"
        self.wanted = False  # a worker made a request: the reply filter is subscribed
        self.count = 0  # replies routed to workers
        self.until = 0.0  # keep reading the broker until then: a worker awaits a reply

    def expect(self, record: channel.Publish, now: float) -> tuple[str, bool]:
        """A worker's request, about to leave: its response topic, and True if the reply filter
        must be subscribed first (the broker handles our packets in order, so before the request)."""
        first = not self.wanted
        self.wanted = True
        expiry = record.properties.message_expiry if record.properties else None
        wait = REPLY_WAIT_FALLBACK if expiry is None else min(expiry, REPLY_WAIT_FALLBACK * 10)
        self.until = max(self.until, now + wait)
        return f"{self.prefix}{record.slot}", first

    def is_reply(self, topic: str) -> bool:
        return topic.startswith(self.prefix)

    def slot(self, topic: str) -> int | None:
        """The worker slot a reply is for (the topic's last level), or None if it names none."""
        self.count += 1
        return mqtt5.reply_slot(topic, self.prefix)
