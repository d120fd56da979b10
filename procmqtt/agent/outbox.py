"""The agent's outgoing publishes (the workers' and dead letters), from the publish channel through
paho to the answer. Runs in the agent process, in its one thread.

Why a queue of our own: paho numbers what it holds with 16-bit message ids, shared with SUBSCRIBE
and UNSUBSCRIBE, and refuses a publish whose id is still in use (``MQTT_ERR_QUEUE_SIZE``). So the
agent hands paho at most ``PAHO_WINDOW`` publishes at a time, and at most ``[mqtt] max_inflight``
QoS 1/2 ones (paho's own limit is off: it rescans everything it holds at every PUBACK), and keeps
the rest here, in order, handing the next ones over as paho confirms earlier ones; any number of
workers can publish.

Bound: each worker has at most ``publish_buffer`` publishes unconfirmed (``publish()`` blocks, then
raises ``PublishBufferFull``; link.py), QoS 0 included, so what waits here is at most
workers x ``publish_buffer`` publishes, plus one dead letter per message the agent holds.

QoS 0: paho reports a QoS 0 publish sent once ``BrokerSocket.send`` took its bytes, which are then
only in the agent's write buffer; the answer waits until the kernel has taken them
(``BrokerSocket.sent``). A broker that stops reading fills TCP, then the bounded write buffer, and
QoS 0 publishes stay unconfirmed like QoS 1 ones, until the workers' ``publish_buffer`` is full.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from procmqtt.agent.brokersocket import BrokerSocket
from procmqtt.agent.deliveries import Delivery
from procmqtt.ipc import channel
from procmqtt.topics import packet_problem

PAHO_WINDOW = 10_000
"""Publishes handed to paho and not yet confirmed, at most: far below its 65,535 message ids, and
far above what it sends at once (``max_inflight``)."""
ID_RETRIES = 4
"""paho refuses a QoS 1/2 publish whose id is still in use (its counter went round while one
waited); each call takes the next id, so a few tries find a free one."""


@dataclass(eq=False)
class Outgoing:
    """One publish on its way: a worker's (answered with ``channel.Published``) or a dead letter
    (whose original is acknowledged once it is confirmed, or could not be sent)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any = None  # paho's Properties (MQTT 5)
    slot: int = -1  # the worker that published it
    generation: int = 0
    request_id: int = 0
    dead_letter: Delivery | None = None  # the message this dead letter stands for (its original)
    info: mqtt.MQTTMessageInfo | None = None  # paho's, once handed over
    stream: BrokerSocket | None = None  # QoS 0 written: the socket its bytes were written to ...
    end: int = 0  # ... and where they end in its ``written`` count


class Outbox:
    """Publishes not yet answered: ``queued`` here, in ``paho``, or QoS 0 ``unsent`` to the kernel.

    ``done(entry, error)`` is called once per publish: 0, paho's error code, or the broker's reason
    code. ``len()`` counts every publish not yet answered.
    """

    def __init__(
        self,
        done: Callable[[Outgoing, int], None],
        log: logging.Logger,
        *,
        v5: bool,
        inflight: int,
        window: int | None = None,
    ) -> None:
        self.done = done
        self.v5 = v5
        self.log = log
        self.inflight = inflight  # QoS 1/2 publishes in paho at most: [mqtt] max_inflight
        self.window = PAHO_WINDOW if window is None else window  # read now: tests lower it
        self.queued: deque[Outgoing] = deque()
        self.paho: dict[int, Outgoing] = {}  # message id -> publish handed to paho, not yet confirmed
        self.awaiting_ack = 0  # how many of those are QoS 1/2, awaiting the broker's acknowledgement
        self.unsent: deque[Outgoing] = deque()  # QoS 0 in the write buffer, in the order written

    def __len__(self) -> int:
        return len(self.queued) + len(self.paho) + len(self.unsent)

    def add(self, entry: Outgoing) -> None:
        """Queue a publish; ``feed`` hands it to paho at the end of the agent's pass."""
        self.queued.append(entry)

    def feed(self, client: mqtt.Client) -> None:
        """Hand paho the queued publishes, in order, while it holds fewer than ``window`` (and
        fewer than ``inflight`` QoS 1/2 ones)."""
        queued = self.queued
        while queued and len(self.paho) < self.window and (queued[0].qos == 0 or self.awaiting_ack < self.inflight):
            self._hand_over(client, queued.popleft())

    def problem(self, entry: Outgoing) -> str | None:
        """Why paho cannot send ``entry``; checked first, as paho raises with the message half
        registered (and would raise again at every reconnect)."""
        size = (len(entry.properties.pack()) if entry.properties is not None else 0) if self.v5 else None
        return packet_problem(entry.topic, len(entry.payload), entry.qos, size)

    def _hand_over(self, client: mqtt.Client, entry: Outgoing) -> None:
        try:
            problem = self.problem(entry)
            if problem:
                raise ValueError(problem)
            for _ in range(ID_RETRIES):
                info = client.publish(entry.topic, entry.payload, entry.qos, entry.retain, entry.properties)
                if info.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                    break
        except Exception as exc:  # noqa: BLE001 - what paho cannot encode fails this publish, not the agent
            self.log.warning("publish to %r failed: %s", entry.topic[:200], exc)
            self.done(
                entry, MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE if "too large" in str(exc) else MQTTErrorCode.MQTT_ERR_INVAL
            )
            return
        ok = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        # Without a connection paho keeps QoS 1/2 messages and sends them after the reconnect.
        kept = entry.qos > 0 and info.rc in (MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if ok and info.is_published():
            self.done(entry, 0)
        elif ok or kept:  # waiting for the socket (QoS 0) or the broker's acknowledgement
            entry.info = info
            self.paho[info.mid] = entry
            self.awaiting_ack += entry.qos > 0
        else:
            self.log.warning("publish to %r failed: %s", entry.topic[:200], mqtt.error_string(info.rc))
            self.done(entry, info.rc)

    def confirmed(self, mid: int, error: int, stream: BrokerSocket | None) -> bool:
        """paho's ``on_publish``: the broker's answer (QoS 1/2), or a QoS 0 packet written to
        ``stream``, answered once the kernel has it (``sent``). False if ``mid`` is not ours."""
        entry = self.paho.pop(mid, None)
        if entry is None:
            return False
        self.awaiting_ack -= entry.qos > 0
        if entry.qos == 0 and stream is not None and not error:
            entry.stream, entry.end = stream, stream.written
            self.unsent.append(entry)
            self.sent(stream)  # already there when paho wrote past the buffer's end
        else:
            self.done(entry, error)
        return True

    def sent(self, stream: BrokerSocket) -> None:
        """After ``stream.flush``: QoS 0 publishes whose bytes the kernel has taken succeed."""
        while self.unsent and self.unsent[0].stream is stream and self.unsent[0].end <= stream.sent:
            self.done(self.unsent.popleft(), 0)

    def fail_lost(self, stream: BrokerSocket | None) -> None:
        """After a reconnect: QoS 0 publishes paho dropped with the old connection, or whose bytes
        the old socket never sent, fail (QoS 1/2 ones paho sends again)."""
        for mid, entry in list(self.paho.items()):
            if entry.qos == 0 and entry.info is not None and entry.info.rc == MQTTErrorCode.MQTT_ERR_CONN_LOST:
                del self.paho[mid]
                self.done(entry, MQTTErrorCode.MQTT_ERR_CONN_LOST)
        kept: deque[Outgoing] = deque()
        while self.unsent:
            entry = self.unsent.popleft()
            if entry.stream is stream:
                kept.append(entry)
            else:
                self.done(entry, MQTTErrorCode.MQTT_ERR_CONN_LOST)
        self.unsent = kept

    def in_flight(self, slot: int, generation: int, last_request_id: int) -> tuple[int, ...]:
        """Request ids of a worker's publishes up to ``last_request_id`` not yet answered."""
        return tuple(
            e.request_id
            for e in (*self.queued, *self.paho.values(), *self.unsent)
            if e.slot == slot
            and e.generation == generation
            and e.dead_letter is None
            and e.request_id <= last_request_id
        )


class EarlyAnswers:
    """Answers to publishes a worker made (in on_start, say) before its WorkerUp reached the agent.

    Kept only for a generation newer than any the agent has known in that slot (an older one is
    gone, and nobody waits for its answers); handed over when that worker's WorkerUp arrives.
    """

    def __init__(self, newest: dict[int, int]) -> None:
        self.newest = newest  # slot -> the newest generation known there
        self.kept: dict[tuple[int, int], list[channel.Published]] = {}

    def keep(self, slot: int, generation: int, answer: channel.Published) -> None:
        if generation > self.newest.get(slot, -1):  # its WorkerUp is still queued
            self.kept.setdefault((slot, generation), []).append(answer)

    def worker_up(self, slot: int, generation: int) -> list[channel.Published]:
        """The answers waiting for this worker; those of older generations in its slot are dropped."""
        self.newest[slot] = generation
        out: list[channel.Published] = []
        for key in [k for k in self.kept if k[0] == slot]:
            answers = self.kept.pop(key)
            if key[1] == generation:
                out += answers
        return out

    def __len__(self) -> int:
        return len(self.kept)


def sync_ack(outbox: Outbox, record: channel.Sync) -> channel.SyncAck:
    """Tell a worker which of its publishes up to the Sync are still in flight here; the answers
    to the others are already queued before this one, or were lost with a dead agent."""
    return channel.SyncAck(
        record.last_request_id, outbox.in_flight(record.slot, record.generation, record.last_request_id)
    )


def dead_letter_entry(prefix: str, d: Delivery, reason: str, *, v5: bool) -> Outgoing:
    """The dead letter of ``d``: its payload at QoS 1 on ``prefix/<its topic>``; MQTT 5 adds the
    reason and the original topic as user properties."""
    properties = None
    if v5:
        properties = PahoProperties(PacketTypes.PUBLISH)
        properties.UserProperty = [("procmqtt-reason", reason), ("procmqtt-topic", d.topic)]
    return Outgoing(f"{prefix}/{d.topic}", d.payload, 1, False, properties, dead_letter=d)
