"""What the agent reads on the publish channel: the workers' Done, Publish, Ready, Retire, Sync,
Holding and subscriptions, and the supervisor's WorkerUp, WorkerExited, StopAgent and Restarts.

Mixed into ``Agent`` (``loop.py``), which sets the attributes declared here. Runs in the agent
process, in its one thread; each record is turned into a call on the ledger, the outbox, the
session or the workers' channels.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from paho.mqtt.enums import MQTTErrorCode

from procmqtt import mqtt5
from procmqtt.agent import metrics
from procmqtt.agent.ledger import DeliveryLedger
from procmqtt.agent.outbox import Outbox, Outgoing, sync_ack
from procmqtt.agent.session import BrokerSession
from procmqtt.agent.workers import WorkerChannel, WorkerChannels
from procmqtt.ipc import channel
from procmqtt.ipc.shared import SharedState
from procmqtt.message import Outcome
from procmqtt.worker.link import describe_error

_OK = Outcome.OK


class Upstream:
    """The publish channel's records, handled; mixed into ``Agent``."""

    upstream: socket.socket
    ledger: DeliveryLedger
    channels: WorkerChannels
    workers: dict[int, WorkerChannel]
    metrics: metrics.Counters
    publishes: Outbox
    session: BrokerSession
    shared: SharedState
    log: logging.Logger
    stopping: bool
    _write: Callable[[WorkerChannel, channel.Record], None]
    begin_stop: Callable[[str], None]

    # --- workers -------------------------------------------------------------------------------

    def _worker_record(self, record: channel.Ready | channel.Retire) -> None:
        if isinstance(record, channel.Ready):
            self.ledger.ready(record.slot, record.generation)
        elif self.ledger.retiring(record.slot, record.generation):
            self._write(self.workers[record.slot], channel.Stop())

    def _add_worker(self, record: channel.WorkerUp) -> None:
        current = self.workers.get(record.slot)
        if current is not None and current.generation >= record.generation:
            record.sock.close()  # already known (inherited at fork), or stale
            return
        if current is not None:
            self._forget_worker(current)
        worker = self.channels.add(record.slot, record.generation, record.sock)
        self.metrics.ensure_slots(record.slot + 1)  # SIGTTIN adds slots
        if self.stopping:
            self._write(worker, channel.Stop())
        self.ledger.worker_up(record.slot, record.generation)

    def _forget_worker(self, worker: WorkerChannel) -> None:
        """A worker is gone: the ledger takes back what it held (``DeliveryLedger.gone``)."""
        self.channels.remove(worker)
        current = self.shared.current(worker.slot, worker.generation)
        held = self.ledger.gone(worker.slot, worker.generation, current)
        if held and self.stopping:
            self.log.warning(
                "worker %d stopped holding %d message(s); QoS 1 ones stay at the broker", worker.slot, held
            )
        elif held:
            self.log.warning(
                "worker %d is gone holding %d unfinished message(s); they go to other workers", worker.slot, held
            )

    def _read_upstream(self, limit: int | None) -> None:
        """Read up to ``limit`` datagrams (None: all there are). Their ``Done``s settle without
        dispatching; one ``dispatch`` after the last fills every window they freed at once, so a
        pass hands out its batch with one look at the workers, not one per ``Done``."""
        count = 0
        try:
            while limit is None or count < limit:
                try:
                    records = channel.receive(self.upstream)
                except BlockingIOError:
                    return
                if records is None:
                    return
                count += 1
                for record in records:
                    if type(record) is channel.Done:
                        self._done(record)
                    else:
                        self._handle_upstream(record)
        finally:
            self.ledger.dispatch()

    def _handle_upstream(self, record: channel.Record) -> None:
        """Every record but ``Done`` (``_read_upstream`` takes those)."""
        if isinstance(record, channel.Publish):
            self._publish(record)
        elif isinstance(record, channel.Subscribe):
            self.session.runtime_subscribe(record)
        elif isinstance(record, channel.Unsubscribe):
            self.session.runtime_unsubscribe(record)
        elif isinstance(record, (channel.Ready, channel.Retire)):
            self._worker_record(record)
        elif isinstance(record, channel.WorkerUp):
            self._add_worker(record)
        elif isinstance(record, channel.WorkerExited):  # no end of file while a child of it holds the channel
            worker = self.channels.current(record.slot, record.generation)
            if worker is not None:
                self._forget_worker(worker)
        elif isinstance(record, channel.StopAgent):
            self.begin_stop("requested by the supervisor")
        elif isinstance(record, channel.Restarts):
            self.metrics.set_restarts(record.cause, record.total)
        elif isinstance(record, channel.Sync):
            self._sync_worker(record)
        elif isinstance(record, channel.Holding):
            if record.deliveries:
                self.log.info(
                    "worker %d still holds %d message(s) from the agent before", record.slot, len(record.deliveries)
                )
            self.ledger.holding(record.slot, record.generation, record.deliveries)

    def _publish(self, record: channel.Publish) -> None:
        """Queue a worker's publish; the end of the pass hands it to paho (``outbox``)."""
        entry = Outgoing(
            record.topic,
            record.payload,
            record.qos,
            record.retain,
            None,
            record.slot,
            record.generation,
            record.request_id,
        )
        if record.properties is not None:
            try:
                response_topic = self.session.expect_reply(record) if record.request else None
                entry.properties = mqtt5.to_paho(record.properties, response_topic)
            except Exception as exc:  # noqa: BLE001 - a record paho cannot take fails its publish, never the agent
                self.log.warning("publish to %r failed: its properties: %s", record.topic[:200], exc)
                self._answer(record.slot, record.generation, record.request_id, MQTTErrorCode.MQTT_ERR_INVAL)
                return
        self.publishes.add(entry)

    def _done(self, record: channel.Done) -> None:
        """A worker's outcome, one of a batch (``_read_upstream`` dispatches after it)."""
        outcome = record.outcome
        if outcome is _OK:  # the common case: no clock, no retry, no dead letter
            slot = self.ledger.done(record.delivery_id, failed=False, batch=True)
        else:
            slot = self.ledger.done(
                record.delivery_id,
                failed=outcome is Outcome.FAILED,
                now=time.monotonic(),
                retry_after=record.retry_after if outcome is Outcome.RETRY else None,  # negative: the schedule's
                invalid=outcome is Outcome.INVALID,
                batch=True,
            )
        if slot >= 0:
            if self.channels.in_ring:  # its range of the worker's ring, if it had one, is free again
                self.channels.done(record.delivery_id, slot)
            self.metrics.done(slot, outcome, record.seconds)
            if outcome is Outcome.INVALID:
                self.metrics.invalid += 1

    def _published(self, entry: Outgoing, error: int) -> None:
        """A publish is answered (``outbox``): the worker hears, or a dead letter's original is acknowledged."""
        d = entry.dead_letter
        described = describe_error(error) if error else ""  # the one use of the worker's error names
        if d is not None:
            if error:
                self.metrics.dropped += 1
                self.log.error(
                    "the dead letter of the message on %r could not be published to %r (%s); dropping the message",
                    d.topic,
                    entry.topic[:200],
                    described,
                )
            self.ledger.settle(d)
            return
        if error >= 128:
            self.log.warning("the broker refused the publish to %r: %s", entry.topic, described)
        self._answer(entry.slot, entry.generation, entry.request_id, error)

    def _answer(self, slot: int, generation: int, request_id: int, error: int) -> None:
        """Tell a worker how its publish went (``channel.Published``)."""
        self.metrics.published(error)  # every worker publish ends here once
        self.channels.answer(slot, generation, channel.Published(request_id, int(error)))

    def _sync_worker(self, record: channel.Sync) -> None:
        worker = self.channels.current(record.slot, record.generation)
        if worker is not None:
            self._write(worker, sync_ack(self.publishes, record))
