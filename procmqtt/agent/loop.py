"""The agent: the one process that holds the MQTT connection.

One thread does everything, in one ``poll`` loop (``poller``): the broker socket (``session``,
through paho's external-loop API), the shared publish channel, and every worker's channel. paho is
never called from two threads, so no lock is needed and none can be left held. Everything here runs
in the agent process, after fork.

The loop is thin: it reads, tells the delivery core (``ledger``) what happened, and carries out
what the ledger decides (deliver to a worker, acknowledge, dead-letter, drop). The broker session
(``session``), publish tracking (``outbox``) and MQTT 5 replies (``replies``) are their own modules.

Delivery: a QoS 1 message is acknowledged to the broker only when a worker reports it done, so a
message held by a worker that dies goes to another worker, and a message still held when the agent
itself dies is sent again by the broker (persistent session). See docs/delivery.md.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

from procmqtt import logs
from procmqtt.agent import health, metrics
from procmqtt.agent.connection import ConnState
from procmqtt.agent.deliveries import INVALID, Delivery, Effects, Inbound
from procmqtt.agent.dispatch import DISPATCHERS
from procmqtt.agent.ledger import DeliveryLedger
from procmqtt.agent.outbox import Outbox, dead_letter_entry
from procmqtt.agent.replies import Replies
from procmqtt.agent.retry import RetrySchedule
from procmqtt.agent.session import BrokerSession
from procmqtt.agent.upstream import Upstream
from procmqtt.agent.workers import WorkerChannel, WorkerChannels
from procmqtt.config import Config
from procmqtt.errors import ExitCode
from procmqtt.ipc import channel, poller
from procmqtt.ipc.ring import RING_MIN
from procmqtt.ipc.shared import SharedState
from procmqtt.ipc.signals import SignalQueue
from procmqtt.message import EMPTY, Properties
from procmqtt.orderkey import key_function

TICK = 1.0
"""Longest sleep of the loop: paho's keepalive and the orphan check run at least this often."""
UPSTREAM_BATCH = 512
"""Datagrams read from the publish channel per pass, so the broker socket is never starved."""
CLOSED_PASSES_LIMIT = 100
"""Loop passes in a row that may find a closed socket in the wait list before the agent gives up."""


class Agent(Upstream):
    """Holds the broker connection; dispatches to workers and publishes for them."""

    def __init__(
        self,
        config: Config,
        client_id: str,
        upstream: socket.socket,
        workers: dict[int, tuple[int, socket.socket]],
        state_dir: str,
        supervisor_pid: int,
        shared: SharedState,
        metrics_listener: socket.socket | None = None,
        health_listener: socket.socket | None = None,
    ) -> None:
        """Runs in the agent process; ``workers`` maps slot to (generation, socket) at fork time.

        ``metrics_listener``, ``health_listener``: the ``[metrics]`` and ``[health]`` sockets the
        supervisor opened, or None.
        """
        self.config = config
        self.client_id = client_id
        self.upstream = upstream
        self.upstream.setblocking(False)
        self.supervisor_pid = supervisor_pid
        self.shared = shared
        self.metrics_listener = metrics_listener
        self.health_listener = health_listener
        self.probes = health.Probes(shared) if health_listener is not None else None
        self.log = logs.get("agent")
        self.channels = WorkerChannels(workers, config.workers.prefetch)
        self.workers = self.channels.by_slot  # the workers the agent knows, by slot
        self._write = self.channels.write
        self.metrics = metrics.Counters(max(config.workers.count, max(self.workers, default=-1) + 1))
        w = config.workers
        self.ledger = DeliveryLedger(
            Effects(self._deliver, self._acknowledge, self._dead_letter, self._drop, self._requeued),
            DISPATCHERS[w.dispatch](),
            prefetch=w.prefetch,
            workers=w.count,
            max_attempts=w.max_attempts,
            retry_failed=w.on_error == "retry",
            dead_letters=w.dead_letter_topic is not None,
            retry=RetrySchedule(w.retry_delay, w.retry_backoff, w.retry_max_delay),
            key_of=key_function(w.order_key) if w.dispatch == "ordered" else None,
        )
        for slot, (generation, _) in workers.items():
            self.ledger.worker_up(slot, generation, ready=True, inherited=True)
        self.v5 = config.mqtt.protocol == "5"
        self.publishes = Outbox(self._published, self.log, v5=self.v5, inflight=config.mqtt.inflight())
        self.replies = Replies(client_id)
        self.session = BrokerSession(
            config,
            client_id,
            state_dir,
            self.log,
            ledger=self.ledger,
            counters=self.metrics,
            publishes=self.publishes,
            replies=self.replies,
        )
        self.oddities: Counter[str] = Counter()  # hostile or broken input handled, by kind (``_odd``)
        self.closed_passes = 0  # passes in a row whose wait list held a closed socket
        self.poller = poller.Poller()  # kept across passes, told only what changed
        self.known: object = None  # the workers' channels' version the lists below were built for
        self.by_sock: dict[socket.socket, WorkerChannel] = {}
        self.readers: list[Any] = []  # what every pass reads: the publish channel, signals, the workers
        self.stopping = False
        self.stop_deadline = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """The agent process's main loop; returns its exit code."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
        self.signals = SignalQueue([signal.SIGTERM])
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # stack on demand
        self.session.start(self._intake, self._odd)
        if self.metrics_listener is not None:
            metrics.serve(self.metrics_listener, self.metrics)
        if self.health_listener is not None and self.probes is not None:
            health.serve(self.health_listener, self.probes)
        self.log.info(
            "agent started; broker %s:%d, client id %s, %d subscription(s)",
            self.config.mqtt.host,
            self.config.mqtt.port,
            self.client_id,
            len(self.session.subs),
        )
        for worker in self.workers.values():  # inherited: a dead agent may have taken their publishes
            self._write(worker, channel.AgentStarted())
        last_misc = 0.0
        try:
            while not self._finished():
                self._step()
                now = time.monotonic()
                if now - last_misc >= TICK:
                    last_misc = now
                    self._tick(now)
        finally:
            self.session.close()
            odd = "".join(f"; {count} bad {kind}(s) ignored" for kind, count in self.oddities.items())
            self.log.info("agent exiting: %s%s", self.metrics.summary(), odd)
        return self.session.exit_code

    def _finished(self) -> bool:
        if self.session.exit_code != ExitCode.OK:
            return True
        if not self.stopping:
            return False
        late = time.monotonic() >= self.stop_deadline
        if self.workers and not late:
            return False
        if self.publishes and not late:
            return False  # workers' publishes still unconfirmed (reconnecting for them if need be)
        if late and (self.workers or self.publishes):
            self.log.warning(
                "graceful timeout: %d worker(s) still running, %d publish(es) unconfirmed",
                len(self.workers),
                len(self.publishes),
            )
        self.session.disconnect()
        return True

    def begin_stop(self, reason: str) -> None:
        """Stop dispatching; workers finish what they hold, then the agent flushes and leaves."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.workers.graceful_timeout
        held = self.ledger.stop()
        self.log.info(
            "stopping (%s): %d worker(s) finish what they hold; %d undispatched message(s) "
            "stay unacknowledged at the broker",
            reason,
            len(self.workers),
            held,
        )
        for worker in self.workers.values():
            self._write(worker, channel.Stop())
        self._publish_readiness(time.monotonic())  # /readyz fails at once

    # --- one pass of the loop ----------------------------------------------------------------

    def _step(self) -> None:
        now = time.monotonic()
        next_due = self.ledger.due(now)  # failed messages whose retry delay is over go out again
        session = self.session
        wanted = not self.stopping or self.publishes  # while stopping, only to flush publishes
        if session.state is ConnState.DISCONNECTED and now >= session.next_attempt and wanted:
            session.connect()
        if self.known is not self.channels.version:  # a worker came or went: the lists change
            self.known = self.channels.version
            self.by_sock = {worker.sock: worker for worker in self.workers.values()}
            self.readers = [self.upstream, self.signals, *self.by_sock]
        by_sock = self.by_sock
        rlist: list[Any] = self.readers
        wlist: list[Any] = [worker.sock for worker in self.workers.values() if worker.unsent]
        mqtt_sock = session.socket()
        buffered = False  # bytes already read from the broker that select would not announce
        if mqtt_sock is not None and session.want_data(now):
            rlist = [*rlist, mqtt_sock]
            buffered = session.stream is not None and mqtt_sock is session.stream and session.stream.waiting()
            if session.unwritten():
                wlist.append(mqtt_sock)
        timeout = 0.0 if buffered else TICK
        if next_due is not None:  # wake for the next held message
            timeout = max(0.0, min(timeout, next_due - now))
        if session.state is ConnState.DISCONNECTED and wanted:
            timeout = max(0.0, min(timeout, session.next_attempt - now))
        try:
            readable, writable = self.poller.wait(rlist, wlist, timeout)
        except poller.ClosedUnderUs as exc:
            self._closed_under_us(exc)
            return
        self.closed_passes = 0
        if self.signals in readable and self.signals.pop():
            self.begin_stop("SIGTERM received")
        if mqtt_sock is not None and (buffered or mqtt_sock in readable):
            session.read()
            session.last_read = time.monotonic()
        if self.upstream in readable:
            self._read_upstream(UPSTREAM_BATCH)
        gone = [
            w
            for s in readable
            if (w := by_sock.get(s)) is not None and self.workers.get(w.slot) is w and self.channels.at_eof(s)
        ]
        if gone:
            # A dead worker's completions were queued on the publish channel before it died:
            # read them all first, so nothing it finished is handed out again.
            self._read_upstream(None)
            for worker in gone:
                if self.workers.get(worker.slot) is worker:
                    self._forget_worker(worker)
        # What this pass queued for the broker (acknowledgements, publishes) goes out in one write,
        # before the workers are woken: the broker's answers are then on their way while we flush.
        session.write()
        self.channels.flush(by_sock[s] for s in writable if s in by_sock)

    def _odd(self, kind: str, message: str, *args: Any) -> None:
        """Something a hostile or broken peer sent, handled without a crash: counted, logged as a
        warning the first time per kind and at debug level after that, so a flood cannot fill the log."""
        self.oddities[kind] += 1
        count = self.oddities[kind]
        if count == 1:
            self.log.warning(message + " (further ones are logged at debug level)", *args)
        else:
            self.log.debug(message + " (%d so far)", *args, count)

    def _closed_under_us(self, exc: poller.ClosedUnderUs) -> None:
        """A socket in the wait list was closed (by a paho callback, say): the next pass rebuilds
        the list without it. Passes that keep finding one are a bug, not a race: leave with an error
        (the supervisor starts a new agent) instead of spinning."""
        self.closed_passes += 1
        self.log.debug("a socket was closed under the loop (%s); rebuilding the wait list", exc)
        if self.closed_passes >= CLOSED_PASSES_LIMIT:
            self.log.error("%d passes in a row found a closed socket (%s); the agent exits", self.closed_passes, exc)
            self.session.exit_code = ExitCode.FORCED

    def _tick(self, now: float) -> None:
        """Once a second: paho keepalive, CONNACK timeout, orphan check, gauges."""
        self.session.tick(now)
        if os.getppid() != self.supervisor_pid and not self.stopping:
            self.begin_stop("the supervisor is gone")
        ledger = self.ledger
        self.metrics.sample(ledger.in_flight(), ledger.window(), ledger.waiting, len(ledger.keys))
        self._publish_readiness(now)

    def _publish_readiness(self, now: float) -> None:
        """For ``[health]``'s thread: the readiness now, replaced whole (``health.py``)."""
        if self.probes is not None:
            self.probes.readiness = health.take(self.session, self.ledger, stopping=self.stopping, now=now)

    # --- messages in ---------------------------------------------------------------------------

    def _intake(self, batch: list[Inbound], properties: Properties | None) -> None:
        """Every message from the broker (decoded by ``brokersocket`` or by paho): MQTT 5 replies
        to the workers that await them, the rest to the ledger."""
        replies = self.replies
        if self.v5 and any(replies.is_reply(m.topic) for m in batch):
            for m in batch:
                if replies.is_reply(m.topic):
                    self._route_reply(m, properties or EMPTY)
            batch = [m for m in batch if not replies.is_reply(m.topic)]
        share = self.session.share
        if share.listening():  # the share_group check's messages (``sharecheck``) are not the app's
            batch = [m for m in batch if not share.arrived(m.topic, self.session.client)]
        self.metrics.received += len(batch)
        self.ledger.arrived(batch, properties)

    def _route_reply(self, m: Inbound, properties: Properties) -> None:
        """A reply to a worker's request goes to that worker, acknowledged at once (``replies``)."""
        if m.qos:
            self.session.client.ack(m.mid, m.qos)
        slot = self.replies.slot(m.topic)
        if slot is None:
            self._odd(
                "reply topic",
                "a message on %r, under this instance's reply topics, names no worker slot; acknowledged and dropped",
                m.topic[:200],
            )
            return
        worker = self.workers.get(slot)
        if worker is None:
            self.log.debug("reply on %r: no such worker; dropped", m.topic)
            return
        self._write(worker, channel.Reply(m.topic, m.payload, m.qos, m.retain, properties))

    # --- the ledger's effects ------------------------------------------------------------------

    def _deliver(self, slot: int, d: Delivery) -> None:
        """Once per message: ``WorkerChannels.write`` inlined, or ``deliver`` for a large payload."""
        self.metrics.dispatched[slot] += 1
        record = channel.Deliver(d.delivery_id, d.topic, d.payload, d.qos, d.retain, d.redelivered, d.properties)
        if len(d.payload) >= RING_MIN:  # through the worker's ring if it has room (agent/workers.py)
            self.channels.deliver(self.workers[slot], record)
            return
        self.workers[slot].unsent.append(channel.encode_parts(record))
        self.channels.dirty.add(slot)

    def _acknowledge(self, mid: int, qos: int) -> None:
        stream, client = self.session.stream, self.session.client
        live: Any = client.socket()  # paho may have replaced the connection's socket
        if qos == 1 and stream is not None and live is stream and stream.puback(mid):
            return  # straight into the write buffer (``brokersocket``)
        client.ack(mid, qos)

    def _requeued(self, d: Delivery) -> None:
        self.metrics.redelivered += 1

    def _drop(self, d: Delivery, reason: str) -> None:
        self.metrics.dropped += 1
        self.log.log(
            logging.DEBUG if reason is INVALID else logging.ERROR,  # an invalid body: the worker's line says it
            "dropping the message on %r: %s; set [workers] dead_letter_topic to keep such messages",
            d.topic,
            reason,
        )

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        entry = dead_letter_entry(self.config.workers.dead_letter_topic or "", d, reason, v5=self.v5)
        problem = self.publishes.problem(entry)
        if problem:  # a topic too long with the original appended, say: drop it, and say so
            self.metrics.dropped += 1
            self.log.error(
                "dropping the message on %r: %s; its dead letter cannot be published (%s)",
                d.topic[:200],
                reason,
                problem,
            )
            self.ledger.settle(d)
            return
        self.metrics.dead_lettered += 1
        self.log.log(
            logging.DEBUG if reason is INVALID else logging.ERROR,
            "dead-lettering the message on %r to %r: %s",
            d.topic,
            entry.topic,
            reason,
        )
        self.publishes.add(entry)  # the original is acknowledged once the broker has the dead letter
