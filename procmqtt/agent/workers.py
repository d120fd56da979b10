"""The agent's ends of the workers' channels. Runs in the agent process, in its one thread.

Records for a worker are encoded when queued (``write``) and sent in one batch per worker at the
end of the loop's pass (``flush``), never blocking: what the socket does not take waits for it to
be writable. A worker never writes to its own channel (it writes to the shared publish channel),
so its channel turning readable means end of file: the worker is gone (``at_eof``).

A payload of ``ring.RING_MIN`` bytes or more goes through the worker's shared-memory ring when it
has room (``deliver``; see ``ipc/ring.py``): its range is freed on the delivery's ``Done``
(``done``) or with the whole ring when the worker's channel is removed or the ring is replaced by
a larger one (``_ring_for``).
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from procmqtt import logs
from procmqtt.agent.outbox import EarlyAnswers
from procmqtt.ipc import channel
from procmqtt.ipc.ring import RING_MIN, Ring, ring_size


@dataclass(eq=False)
class WorkerChannel:
    """The agent's end of one worker's channel (what the worker holds is the ledger's ``Seat``)."""

    slot: int
    generation: int
    sock: socket.socket
    unsent: deque[channel.Encoded] = field(default_factory=deque)  # encoded records not yet sent
    ring: Ring | None = None  # made for the first large payload (``WorkerChannels.deliver``)
    no_ring: bool = False  # its memory file could not be made: payloads go inline


class WorkerChannels:
    """The known workers' channels by slot, and answers kept for workers not known yet."""

    def __init__(self, inherited: dict[int, tuple[int, socket.socket]], prefetch: int) -> None:
        """``inherited``: slot -> (generation, socket) at the agent's fork; ``prefetch``: a worker's
        window, which sizes its ring."""
        self.prefetch = prefetch
        self.by_slot: dict[int, WorkerChannel] = {}
        for slot, (generation, sock) in inherited.items():
            sock.setblocking(False)
            self.by_slot[slot] = WorkerChannel(slot, generation, sock)
        self.dirty: set[int] = set()  # slots with records to flush at the end of this pass
        self.version = object()  # replaced whenever a worker is added or removed
        self.early_answers = EarlyAnswers({slot: gen for slot, (gen, _) in inherited.items()})
        self.in_ring: dict[int, WorkerChannel] = {}  # delivery id -> the worker whose ring holds its payload

    def current(self, slot: int, generation: int) -> WorkerChannel | None:
        """The channel of that worker, if it is the one the agent knows in its slot."""
        worker = self.by_slot.get(slot)
        return worker if worker is not None and worker.generation == generation else None

    def write(self, worker: WorkerChannel, record: channel.Record) -> None:
        """Queue a record for a worker; the end of the pass sends each worker's queue as one batch."""
        worker.unsent.append(channel.encode_parts(record))
        self.dirty.add(worker.slot)

    def deliver(self, worker: WorkerChannel, record: channel.Deliver) -> None:
        """Queue a delivery: a large payload through the worker's ring when it has room, else inline."""
        if len(record.payload) >= RING_MIN and not worker.no_ring:
            at = self._in_ring(worker, record)
            if at is not None:
                self.write(worker, at)
                return
        self.write(worker, record)

    def _in_ring(self, worker: WorkerChannel, record: channel.Deliver) -> channel.DeliverAt | None:
        """The payload copied into the ring and the record that names it (queued only after the
        copy, so a torn write is never announced); None when it must go inline."""
        ring = self._ring_for(worker, len(record.payload))
        if ring is None:
            return None
        offset = ring.put(record.delivery_id, record.payload)
        if offset is None:
            return None  # no room: the ring full, or a range ahead still held
        self.in_ring[record.delivery_id] = worker
        r = record
        return channel.DeliverAt(
            r.delivery_id, r.topic, offset, len(r.payload), r.qos, r.retain, r.redelivered, r.properties
        )

    def _ring_for(self, worker: WorkerChannel, length: int) -> Ring | None:
        """The worker's ring for a payload of ``length`` bytes: made for the first, replaced by a
        larger one when a payload asks for more (``ring_size``) and no record naming the old one
        is still queued (the worker reads in order: it copies those out before it switches). The
        new ring's record goes ahead of the delivery; None (inline) if it cannot be sent now."""
        ring, size = worker.ring, ring_size(length, self.prefetch)
        if ring is not None and (worker.unsent or ring.space.size >= size):
            return ring  # large enough, or records naming it still wait to be sent
        try:
            larger = Ring(size)
        except OSError as exc:  # no memory file (a descriptor limit, say)
            if ring is None:  # a worker without any ring: its payloads go inline, said once
                worker.no_ring = True
                logs.get("agent").warning("worker %d: no ring (%s); its large payloads go inline", worker.slot, exc)
            return ring
        try:
            sent = channel.send(worker.sock, channel.RingFile(larger.fd), block=False)
        except OSError:
            sent = False  # the worker is gone; its end of file comes on a later pass
        if not sent:  # the channel is full: the ring we have (or inline) now, a new one next time
            larger.close()
            return ring
        larger.sent()
        if ring is not None:
            self._drop_ring(worker)
        worker.ring = larger
        return larger

    def _drop_ring(self, worker: WorkerChannel) -> None:
        """The worker's ring is no longer written: its ranges are forgotten (the worker's mapping
        stays valid until it replaces or unmaps it)."""
        if worker.ring is not None:
            for delivery_id in worker.ring.taken:
                self.in_ring.pop(delivery_id, None)
            worker.ring.close()
            worker.ring = None

    def done(self, delivery_id: int, slot: int) -> None:
        """The Done of a delivery the ledger knew at ``slot`` arrived: its range of that worker's
        ring (if it had one) may be written again. A Done the ledger did not know frees nothing."""
        worker = self.in_ring.get(delivery_id)
        if worker is not None and worker.slot == slot and worker.ring is not None:
            del self.in_ring[delivery_id]
            worker.ring.free(delivery_id)

    def answer(self, slot: int, generation: int, answer: channel.Published) -> None:
        """How a worker's publish went: to the worker, or kept until its WorkerUp arrives."""
        worker = self.current(slot, generation)
        if worker is not None:
            self.write(worker, answer)
        else:
            self.early_answers.keep(slot, generation, answer)

    def add(self, slot: int, generation: int, sock: socket.socket) -> WorkerChannel:
        """A new worker (the previous one in its slot is already removed); answers kept for it are queued."""
        worker = self.by_slot[slot] = WorkerChannel(slot, generation, sock)
        self.version = object()
        for answer in self.early_answers.worker_up(slot, generation):
            self.write(worker, answer)
        return worker

    def remove(self, worker: WorkerChannel) -> None:
        del self.by_slot[worker.slot]
        self.version = object()
        worker.sock.close()
        self._drop_ring(worker)  # dropped with its channel: nothing reads it again

    def flush(self, writable: Iterable[WorkerChannel]) -> None:
        """Send what this pass queued, and what waited for a socket now ``writable``."""
        for worker in writable:
            if self.by_slot.get(worker.slot) is worker:
                self.dirty.add(worker.slot)
        for slot in self.dirty:
            known = self.by_slot.get(slot)
            if known is not None:
                try:
                    channel.send_many(known.sock, known.unsent, block=False)
                except OSError as exc:
                    if not channel.is_gone(exc):
                        raise
                    known.unsent.clear()  # it is dead; its end of file arrives on the next pass
        self.dirty.clear()

    @staticmethod
    def at_eof(sock: socket.socket) -> bool:
        """Workers never write to their own channel, so readable means end of file."""
        try:
            return channel.receive(sock) is None
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
