"""The worker's side of the channels: its link to the agent, which resolves the handles a publish
or a request returns (``answers``). Runs in the worker process (any thread of it, and its event
loop for async apps).

Reads of the worker's inbound channel are serialised by one lock; whoever holds it resolves every
handle and waiter it reads a reply for, so a thread waiting on its own publish never misses it.

A restarted agent cannot answer for the publishes its dead predecessor had taken: on its
``AgentStarted`` the link sends ``Sync``, and the ``SyncAck`` fails with ``AGENT_GONE`` each earlier
publish the new agent neither confirmed nor holds, so no ``wait()`` outlives the agent it waits on.
The link also answers ``AgentStarted`` with ``Holding``: the deliveries it read and has not sent a
``Done`` for (running or queued), so that in ordered mode the new agent keeps their keys busy.

A large payload may come in the agent's ring (``ipc/ring.py``): a ``RingFile`` record maps it
(replacing any ring of an agent before), and each ``DeliverAt`` is copied out of it into a plain
``Deliver`` as it is read, so nothing the worker holds refers to the ring.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import deque
from typing import Any

from procmqtt.config import Config
from procmqtt.errors import PublishBufferFull
from procmqtt.ipc import channel, poller
from procmqtt.ipc.ring import RingReader
from procmqtt.message import Message, Properties
from procmqtt.worker.answers import (
    PublishError,
    PublishHandle,
    _Answer,
    _ReplyWaiter,
    describe_error,
)

__all__ = ["AGENT_GONE", "Payload", "describe_error", "to_bytes"]  # describe_error: for the agent's log lines

Payload = Any  # bytes, str, None, or a JSON-serialisable object

AGENT_GONE = PublishError.AGENT_GONE
"""``PublishHandle.error`` when the agent that took the publish is gone, its side closed or the agent
restarted, before confirming it (paho's MQTT_ERR_CONN_LOST)."""


def to_bytes(payload: Payload) -> bytes:
    """bytes stay bytes, str is UTF-8, None is empty, anything else is compact JSON."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if payload is None:
        return b""
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


class _AgentLink:
    """The worker's ends of the channels: its inbound socket and the shared publish channel."""

    def __init__(
        self,
        slot: int,
        generation: int,
        inbound: socket.socket,
        upstream: socket.socket,
        config: Config,
        wakeup: int | None = None,
    ) -> None:
        self.slot = slot
        self.generation = generation
        self.inbound = inbound
        self.upstream = upstream
        self.publish_buffer = config.mqtt.publish_buffer
        self.publish_timeout = config.mqtt.publish_timeout
        self.wakeup = wakeup
        self.closed = False  # the agent side is gone for good (end of file)
        self.loop_thread: int | None = None  # async apps: the event loop's thread, the one reader
        self._outbox: deque[channel.Encoded] = deque()  # encoded records for the agent, sent in batches
        self._flush_at = max(1, config.workers.prefetch // 2)  # so the agent never waits on a full batch
        self._send_lock = threading.Lock()  # keeps the outbox in order when threads publish
        self._inbox: deque[channel.Record] = deque()
        self._in_hand: dict[int, str] = {}  # delivery id -> topic: read, its Done not queued yet
        self._handles: dict[int, PublishHandle] = {}
        self._requests = itertools.count(1)
        self._last_request = 0  # the last request id whose publish is queued; under ``_send_lock``
        self._replies: dict[bytes, _ReplyWaiter] = {}  # correlation data -> request awaiting its reply
        self._request_of: dict[int, _ReplyWaiter] = {}  # publish request id -> its request, until confirmed
        self._lock = threading.Lock()  # one reader of ``inbound`` at a time
        self.ring: RingReader | None = None  # the current agent's ring, once its RingFile arrives

    def send(self, record: channel.Record) -> None:
        """Send now, after whatever is queued (so completions never overtake each other)."""
        with self._send_lock:
            self._send_locked(record)

    def _send_locked(self, record: channel.Record) -> None:
        self._outbox.append(channel.encode_parts(record))
        channel.send_many(self.upstream, self._outbox)

    def send_later(self, done: channel.Done) -> None:
        """Queue a completion to go with the next batch; its delivery is no longer in hand."""
        with self._send_lock:
            self._in_hand.pop(done.delivery_id, None)
            self._outbox.append(channel.encode_parts(done))
            if len(self._outbox) >= self._flush_at:
                channel.send_many(self.upstream, self._outbox)

    def flush(self) -> None:
        with self._send_lock:
            if self._outbox:
                channel.send_many(self.upstream, self._outbox)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None = None,
        *,
        request: _ReplyWaiter | None = None,
    ) -> PublishHandle:
        if len(self._handles) >= self.publish_buffer:
            self._wait_for_room(topic)
        with self._send_lock:  # an id and its publish go out together, so a Sync never counts one unsent
            handle = PublishHandle(self, next(self._requests))
            self._handles[handle.request_id] = handle
            if request is not None:
                self._request_of[handle.request_id] = request
            self._last_request = handle.request_id
            self._send_locked(
                channel.Publish(
                    self.slot,
                    self.generation,
                    handle.request_id,
                    topic,
                    payload,
                    qos,
                    retain,
                    properties,
                    request is not None,
                )
            )
        return handle

    def request(self, topic: str, payload: bytes, qos: int, properties: Properties) -> _ReplyWaiter:
        """Publish a request whose response topic the agent sets to this worker's reply topic."""
        waiter = _ReplyWaiter(self, properties.correlation_data or b"")
        self._replies[waiter.correlation] = waiter
        waiter.handle = self.publish(topic, payload, qos, False, properties, request=waiter)
        return waiter

    def forget(self, waiter: _ReplyWaiter) -> None:
        """The requester stopped waiting: a late reply is dropped."""
        self._replies.pop(waiter.correlation, None)

    def _wait_for_room(self, topic: str) -> None:
        """Block while this worker has ``publish_buffer`` publishes unconfirmed (broker down or
        slow), reading confirmations as they come, up to ``publish_timeout``."""
        deadline = time.monotonic() + self.publish_timeout
        while len(self._handles) >= self.publish_buffer and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishBufferFull(
                    f"publish to {topic!r}: this worker already has {self.publish_buffer} unconfirmed "
                    f"publishes (is the broker reachable?); gave up after {self.publish_timeout:g}s"
                )
            if self._loop_reads():
                time.sleep(min(remaining, 0.01))  # the event loop reads the confirmations
                continue
            with self._lock:
                self._pump(min(remaining, 0.1), wake_on_signal=False)

    def _pump(self, timeout: float | None, *, wake_on_signal: bool = True, first: bool = False) -> bool:
        """Read whatever the agent sent within ``timeout``; True if anything (or a signal) arrived.
        ``first``: stop at the first datagram that brings a delivery or stop record (``_read``)."""
        fds: list[Any] = [self.inbound]
        if wake_on_signal and self.wakeup is not None:
            fds.append(self.wakeup)
        readable, _ = poller.wait(fds, [], timeout)
        if self.inbound not in readable:
            return bool(readable)
        self._read(first=first)
        return True

    def _read(self, *, first: bool = False) -> None:
        """Everything already queued on the inbound channel, without waiting; with ``first``, only
        up to the first datagram that queues a record for ``next``: a worker woken for one message
        runs it without another ``recvmsg`` (and its ``BlockingIOError``) in front of it. What
        stays queued is read before the worker waits again (``next``)."""
        while not (first and self._inbox):
            try:
                records = channel.receive(self.inbound)
            except BlockingIOError:
                return
            except ConnectionResetError:
                records = None
            if records is None:
                self.closed = True
                for answer in [*self._handles.values(), *self._replies.values()]:  # wake their waiters
                    answer._resolve(AGENT_GONE)
                self._handles.clear()
                self._replies.clear()
                self._request_of.clear()
                return
            for record in records:
                if isinstance(record, channel.DeliverAt):
                    record = self._from_ring(record)
                if isinstance(record, channel.Deliver):
                    self._in_hand[record.delivery_id] = record.topic
                    self._inbox.append(record)
                elif isinstance(record, channel.Published):
                    handle = self._handles.pop(record.request_id, None)
                    if handle is not None:
                        handle._resolve(record.error)
                    waiter = self._request_of.pop(record.request_id, None)
                    if waiter is not None and record.error:
                        waiter._resolve(record.error)  # the request never left: no reply will come
                elif isinstance(record, channel.Reply):
                    waiter = self._replies.pop(record.properties.correlation_data or b"", None)
                    if waiter is not None:  # else a late or duplicate reply
                        waiter._answer(
                            Message(record.topic, record.payload, record.qos, record.retain, False, record.properties)
                        )
                elif isinstance(record, channel.AgentStarted):
                    with self._send_lock:  # every delivery read so far came from the agent before
                        self._send_locked(channel.Holding(self.slot, self.generation, tuple(self._in_hand.items())))
                        if self._handles:  # some may have died with the old agent: ask the new one which
                            self._send_locked(channel.Sync(self.slot, self.generation, self._last_request))
                elif isinstance(record, channel.SyncAck):
                    self._fail_lost(record)
                elif isinstance(record, channel.RingFile):
                    if self.ring is not None:
                        self.ring.close()
                    self.ring = RingReader(record.fd)
                else:
                    self._inbox.append(record)

    def _from_ring(self, at: channel.DeliverAt) -> channel.Deliver:
        """The payload copied out of the ring: its range may be reused once this delivery is done."""
        if self.ring is None:
            raise channel.ChannelError("a delivery in a ring before the ring")
        payload = self.ring.read(at.offset, at.length)
        return channel.Deliver(at.delivery_id, at.topic, payload, at.qos, at.retain, at.redelivered, at.properties)

    def _fail_lost(self, ack: channel.SyncAck) -> None:
        """Publishes up to the Sync that the agent neither confirmed (its answers came first) nor holds
        were taken by an agent that died: they fail, with the requests they carried."""
        in_flight = set(ack.in_flight)
        for request_id in list(self._handles):
            if request_id <= ack.last_request_id and request_id not in in_flight:
                handle = self._handles.pop(request_id, None)
                if handle is not None:
                    handle._resolve(AGENT_GONE)
                waiter = self._request_of.pop(request_id, None)
                if waiter is not None:
                    waiter._resolve(AGENT_GONE)

    def read_available(self) -> None:
        """Read what the agent sent, without waiting (the async loop's reader callback)."""
        with self._lock:
            self._read()

    def has_records(self) -> bool:
        return bool(self._inbox)

    def take(self) -> channel.Record | None:
        """The next delivery or stop record already read, or None (the async loop)."""
        return self._inbox.popleft() if self._inbox else None

    def next(self, timeout: float | None = None) -> channel.Record | None:
        """The next delivery or stop record, or None (timeout, signal, or the agent side closed).

        Queued completions go out before the worker waits, so the agent always hears in time.
        """
        if not self._inbox and not self.closed:
            with self._lock:
                self._read()
                if not self._inbox and not self.closed:
                    self.flush()
                    self._pump(timeout, first=True)
        return self._inbox.popleft() if self._inbox else None

    def wait_for(self, handle: _Answer, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not handle._done.is_set() and not self.closed:
            remaining = 0.1 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                break
            if not self._loop_reads() and self._lock.acquire(blocking=False):
                try:
                    self._pump(min(remaining, 0.1), wake_on_signal=False)
                finally:
                    self._lock.release()
            else:  # another thread is reading; it resolves our handle too
                handle._done.wait(min(remaining, 0.01))
        return handle._done.is_set() and handle.error == 0

    def _loop_reads(self) -> bool:
        """True in a thread other than a running event loop's, which reads the channel itself."""
        return self.loop_thread is not None and threading.get_ident() != self.loop_thread
