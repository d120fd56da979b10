"""The agent: the one process that holds the MQTT connection.

One thread does everything, in one ``poll`` loop (``poller``): paho's socket (through paho's external-loop
API), the shared publish channel, and every worker's channel. paho is never called from two
threads, so no lock is needed and none can be left held. Everything here runs in the agent
process, after fork.

Delivery: a QoS 1 message is acknowledged to the broker only when a worker reports it done, so a
message held by a worker that dies goes to another worker, and a message still held when the agent
itself dies is sent again by the broker (persistent session). See README "Delivery guarantees".
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import ssl
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode

from procmqtt import logs, mqtt5
from procmqtt.agent import connection, metrics, subscriptions
from procmqtt.agent.brokersocket import BrokerSocket, wrap_socket
from procmqtt.agent.connection import ConnState
from procmqtt.agent.dispatch import DISPATCHERS
from procmqtt.agent.ledger import Delivery, DeliveryLedger, Effects, Inbound
from procmqtt.agent.outbox import EarlyAnswers, Outbox, Outgoing, sync_ack
from procmqtt.backoff import Backoff
from procmqtt.config import Config
from procmqtt.errors import ExitCode
from procmqtt.ipc import channel, poller
from procmqtt.ipc.shared import SharedState
from procmqtt.ipc.signals import SignalQueue
from procmqtt.message import EMPTY, Properties
from procmqtt.worker.link import describe_error

TICK = 1.0
"""Longest sleep of the loop: paho's keepalive and the orphan check run at least this often."""
UPSTREAM_BATCH = 512
"""Datagrams read from the publish channel per pass, so the broker socket is never starved."""
READ_AHEAD = 1024 * 1024
"""Bytes of the broker's stream the agent holds unparsed at most (beyond one large packet)."""
_AUTH_REFUSED = {134, 135}  # Bad user name or password, Not authorized (3.1.1 codes 4 and 5)
STABLE_CONNECTION = 10.0
"""Seconds a connection must last before the reconnect backoff starts over. A reset on every CONNACK
let a connection that the broker closes right away (another client with our id takes the session
over, and ours takes it back) reconnect ~1,000 times a second. Ten seconds is far beyond such a
takeover round trip or a CONNACK-then-close, and short enough that a real outage after a healthy
connection reconnects at once."""
SHORT_LIVED_WARN = 3
"""Connections in a row shorter than ``STABLE_CONNECTION`` before the agent says, once, that
another client probably uses its client id."""
_SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code
CLOSED_PASSES_LIMIT = 100
"""Loop passes in a row that may find a closed socket in the wait list before the agent gives up."""
REPLY_WAIT_FALLBACK = 30.0
"""Seconds to keep reading for a reply when a request carries no message expiry."""


@dataclass
class _WorkerChannel:
    """The agent's end of one worker's channel (what it holds is the ledger's ``Seat``)."""

    slot: int
    generation: int
    sock: socket.socket
    unsent: deque[bytes] = field(default_factory=deque)  # encoded records not yet sent


class Agent:
    """Holds the broker connection; dispatches to workers and publishes for them."""

    def __init__(self, config: Config, client_id: str, upstream: socket.socket,
                 workers: dict[int, tuple[int, socket.socket]], state_dir: str, supervisor_pid: int,
                 shared: SharedState, metrics_listener: socket.socket | None = None) -> None:
        """Runs in the agent process; ``workers`` maps slot to (generation, socket) at fork time.

        ``metrics_listener``: the ``[metrics]`` socket the supervisor opened, or None.
        """
        self.config = config
        self.client_id = client_id
        self.upstream = upstream
        self.state_path = os.path.join(state_dir, "subscriptions.json")
        self.supervisor_pid = supervisor_pid
        self.shared = shared
        self.log = logs.get("agent")
        self.workers: dict[int, _WorkerChannel] = {}
        for slot, (generation, sock) in workers.items():
            sock.setblocking(False)
            self.workers[slot] = _WorkerChannel(slot, generation, sock)
        self.upstream.setblocking(False)
        self.prefetch = config.workers.prefetch
        w = config.workers
        self.ledger = DeliveryLedger(Effects(self._deliver, self._acknowledge, self._dead_letter, self._drop,
                                             self._requeued),
                                     DISPATCHERS[w.dispatch](), prefetch=w.prefetch, workers=w.count,
                                     max_attempts=w.max_attempts, retry_failed=w.on_error == "retry",
                                     dead_letters=w.dead_letter_topic is not None)
        for slot, (generation, _) in workers.items():
            self.ledger.worker_up(slot, generation, ready=True)
        self.subscriptions = self._load_subscriptions()
        self.state = ConnState.DISCONNECTED
        self.backoff = Backoff(base=0.5, cap=30.0)
        self.connected_at = 0.0
        self.short_lived = 0  # connections in a row that ended before STABLE_CONNECTION
        self.dropped_for = ""  # the protocol error we closed the connection for, until it is closed
        self.warned_takeover = False
        self.next_attempt = 0.0
        self.connack_deadline = 0.0
        self.publishes = Outbox(self._published, self.log, v5=config.mqtt.protocol == "5",  # not yet answered
                                inflight=config.mqtt.inflight())
        self.subscribe_requests: dict[int, list[str]] = {}
        self.unsubscribe_on_connect: set[str] = set()  # removed offline; a persistent session may hold them
        self.early_answers = EarlyAnswers({slot: gen for slot, (gen, _) in workers.items()})
        self.syncing = 0  # mid of the UNSUBSCRIBE that proves the broker has our acknowledgements
        self.metrics = metrics.Counters(max(config.workers.count, max(self.workers, default=-1) + 1))
        self.v5 = config.mqtt.protocol == "5"
        self.batch_properties = EMPTY if self.v5 else None  # of the messages ``brokersocket`` decodes
        self.reply_prefix = mqtt5.reply_prefix(client_id)  # + worker slot: where its replies come back
        self.replies_wanted = False  # a worker made a request: the reply filter is subscribed
        self.replies = 0  # replies routed to workers
        self.replies_until = 0.0  # keep reading the broker until then: a worker awaits a reply
        self.metrics_listener = metrics_listener
        self.last_broker_read = 0.0
        self.dirty: set[int] = set()  # slots with records to flush at the end of this pass
        self.oddities: Counter[str] = Counter()  # hostile or broken input handled, by kind (``_odd``)
        self.closed_passes = 0  # passes in a row whose wait list held a closed socket
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = ExitCode.OK
        self.client: mqtt.Client = None  # type: ignore[assignment]  # created in run(), after fork
        self.stream: BrokerSocket | None = None  # the broker socket as paho sees it (brokersocket.py)

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """The agent process's main loop; returns its exit code."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
        self.signals = SignalQueue([signal.SIGTERM])
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # stack on demand
        self.client = self._make_client()
        if self.metrics_listener is not None:
            metrics.serve(self.metrics_listener, self.metrics)
        self.log.info("agent started; broker %s:%d, client id %s, %d subscription(s)",
                      self.config.mqtt.host, self.config.mqtt.port, self.client_id, len(self.subscriptions))
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
            sock = self.client.socket()
            if sock is not None:
                sock.close()
            odd = "".join(f"; {count} bad {kind}(s) ignored" for kind, count in self.oddities.items())
            self.log.info("agent exiting: %s%s", self.metrics.summary(), odd)
        return self.exit_code

    def _make_client(self) -> mqtt.Client:
        client = connection.make_client(self.config.mqtt, self.client_id,
                                        self.config.workers.count * self.prefetch)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    def _set_state(self, new: ConnState) -> None:
        connection.check_transition(self.state, new)
        self.state = new
        if new is not ConnState.CONNECTED:
            self.ledger.offline(lost=False)  # acknowledgements go nowhere now

    def _finished(self) -> bool:
        if self.exit_code != ExitCode.OK:
            return True
        if not self.stopping:
            return False
        late = time.monotonic() >= self.stop_deadline
        if self.workers and not late:
            return False
        if self.publishes and not late:
            return False  # workers' publishes still unconfirmed (reconnecting for them if need be)
        if late and (self.workers or self.publishes):
            self.log.warning("graceful timeout: %d worker(s) still running, %d publish(es) unconfirmed",
                             len(self.workers), len(self.publishes))
        self._disconnect()
        return True

    def _disconnect(self) -> None:
        if self.state is not ConnState.CONNECTED:
            return
        will = self.config.mqtt.will
        if will is not None:  # a clean DISCONNECT suppresses the will: say it ourselves
            self.client.publish(will.topic, will.payload, will.qos, will.retain)
        self._sync_with_broker()
        if self.state is not ConnState.CONNECTED:  # the broker went away meanwhile
            return
        self._set_state(ConnState.CLOSING)
        self.client.disconnect()
        deadline = time.monotonic() + 2.0
        while self.client.want_write() and time.monotonic() < deadline and self.client.socket() is not None:
            try:
                poller.wait([], [self.client.socket()], 0.1)
            except poller.ClosedUnderUs:
                break  # paho closed it: nothing more can be written
            self.client.loop_write()
        self.log.info("disconnected from the broker")

    def _sync_with_broker(self, timeout: float = 2.0) -> None:
        """Wait until the broker has processed every acknowledgement we sent.

        paho closes the socket right after DISCONNECT; with unread messages in our receive buffer
        the kernel answers with a reset, and the broker may drop our last PUBACKs unread, so their
        messages would come again next run. The broker handles a client's packets in order, so the
        UNSUBACK of a harmless UNSUBSCRIBE proves every earlier PUBACK arrived.
        """
        _, mid = self.client.unsubscribe(f"procmqtt/sync/{mqtt5.topic_level(self.client_id)}")
        if mid is None:
            return
        self.syncing = mid
        deadline = time.monotonic() + timeout
        while self.syncing and time.monotonic() < deadline:
            sock = self.client.socket()
            if sock is None:
                return
            waiting = self.stream is not None and self.stream.waiting()
            try:
                readable, _ = poller.wait([sock], [sock] if self._broker_unwritten() else [], 0 if waiting else 0.05)
            except poller.ClosedUnderUs:
                self.log.debug("the broker socket closed while syncing; not waiting for the UNSUBACK")
                return
            if readable or waiting:
                self._read_broker()  # messages arriving now are ignored: we are stopping
            self._write_broker()

    def begin_stop(self, reason: str) -> None:
        """Stop dispatching; workers finish what they hold, then the agent flushes and leaves."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.workers.graceful_timeout
        held = self.ledger.stop()
        self.log.info("stopping (%s): %d worker(s) finish what they hold; %d undispatched message(s) "
                      "stay unacknowledged at the broker", reason, len(self.workers), held)
        for worker in self.workers.values():
            self._write(worker, channel.Stop())

    # --- one pass of the loop ----------------------------------------------------------------

    def _step(self) -> None:
        now = time.monotonic()
        wanted = not self.stopping or self.publishes  # while stopping, only to flush publishes
        if self.state is ConnState.DISCONNECTED and now >= self.next_attempt and wanted:
            self._connect()
        rlist: list[Any] = [self.upstream, self.signals]
        wlist: list[Any] = []
        by_sock: dict[socket.socket, _WorkerChannel] = {}
        for worker in self.workers.values():
            by_sock[worker.sock] = worker
            rlist.append(worker.sock)
            if worker.unsent:
                wlist.append(worker.sock)
        mqtt_sock = self.client.socket() if self.state is not ConnState.DISCONNECTED else None
        buffered = False  # bytes already read from the broker that select would not announce
        if mqtt_sock is not None and self._want_broker_data(now):
            rlist.append(mqtt_sock)
            buffered = self.stream is not None and mqtt_sock is self.stream and self.stream.waiting()
            if self._broker_unwritten():
                wlist.append(mqtt_sock)
        timeout = 0.0 if buffered else TICK
        if self.state is ConnState.DISCONNECTED and wanted:
            timeout = max(0.0, min(timeout, self.next_attempt - now))
        try:
            readable, writable = poller.wait(rlist, wlist, timeout)
        except poller.ClosedUnderUs as exc:
            self._closed_under_us(exc)
            return
        self.closed_passes = 0
        if self.signals in readable and self.signals.pop():
            self.begin_stop("SIGTERM received")
        if mqtt_sock is not None and (buffered or mqtt_sock in readable):
            self._read_broker()
            self.last_broker_read = time.monotonic()
        if self.upstream in readable:
            self._read_upstream(UPSTREAM_BATCH)
        gone = [w for s in readable
                if (w := by_sock.get(s)) is not None and self.workers.get(w.slot) is w and self._at_eof(s)]
        if gone:
            # A dead worker's completions were queued on the publish channel before it died:
            # read them all first, so nothing it finished is handed out again.
            self._read_upstream(None)
            for worker in gone:
                if self.workers.get(worker.slot) is worker:
                    self._forget_worker(worker)
        # What this pass queued for the broker (acknowledgements, publishes) goes out in one write,
        # before the workers are woken: the broker's answers are then on their way while we flush.
        self._write_broker()
        for sock in writable:
            worker = by_sock.get(sock)
            if worker is not None and self.workers.get(worker.slot) is worker:
                self.dirty.add(worker.slot)
        for slot in self.dirty:
            worker = self.workers.get(slot)
            if worker is not None:
                self._flush(worker)
        self.dirty.clear()

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
            self.log.error("%d passes in a row found a closed socket (%s); the agent exits",
                           self.closed_passes, exc)
            self.exit_code = ExitCode.FORCED

    def _broker_unwritten(self) -> bool:
        return self.client.want_write() or (self.stream is not None and bool(self.stream.out))

    def _write_broker(self) -> None:
        """Queued publishes to paho (``outbox``), paho's queued packets, then one ``send`` for all of
        them (``brokersocket``); QoS 0 publishes the kernel took are answered."""
        stream = self.stream if self.stream is not None and self.client.socket() is self.stream else None
        if stream is not None and stream.out:
            stream.flush()  # room in the bounded write buffer for what paho holds
        if stream is None or not stream.full():  # else they wait in the outbox, not in paho's queue too
            self.publishes.feed(self.client)
        if self.client.socket() is None:
            return
        if self.client.want_write():
            self.client.loop_write()
        if stream is not None:
            stream.flush()
            self.publishes.sent(stream)

    def _tick(self, now: float) -> None:
        """Once a second: paho keepalive, CONNACK timeout, publish bookkeeping, orphan check, gauges."""
        if self.state is not ConnState.DISCONNECTED and self.client.socket() is not None:
            self.client.loop_misc()
        if self.state is ConnState.CONNECTING and now >= self.connack_deadline:
            self._set_state(ConnState.DISCONNECTED)
            self._schedule_reconnect(f"no CONNACK within {self.config.mqtt.connect_timeout:g}s {self._connect_hint()}")
        if os.getppid() != self.supervisor_pid and not self.stopping:
            self.begin_stop("the supervisor is gone")
        self.metrics.sample(self.ledger.in_flight(), self.ledger.window())

    # --- broker connection -------------------------------------------------------------------

    def _connect(self) -> None:
        self._set_state(ConnState.CONNECTING)
        try:
            self.client.reconnect()
        except (OSError, ValueError) as exc:
            self._set_state(ConnState.DISCONNECTED)
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"TLS handshake failed: {exc.reason or exc}"
            else:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                if self.config.mqtt.tls is not None:
                    reason += " " + self._connect_hint()
            self._schedule_reconnect(f"cannot connect: {reason}")
            return
        self.connack_deadline = time.monotonic() + self.config.mqtt.connect_timeout
        self.stream = wrap_socket(self.client)
        self._fail_lost_publishes()

    def _connect_hint(self) -> str:
        """paho reports TLS mix-ups as silence or a bare disconnect; say what to check."""
        tls = "TLS on" if self.config.mqtt.tls else "no TLS"
        return (f"({tls}): is this an MQTT port, does it expect TLS ([mqtt.tls]), and does it require "
                f"a client certificate?")

    def _schedule_reconnect(self, reason: str) -> None:
        delay = self.backoff.next()
        self.next_attempt = time.monotonic() + delay
        m = self.config.mqtt
        self.log.warning("broker %s:%d: %s; retrying in %.1fs", m.host, m.port, reason, delay)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.state is not ConnState.CONNECTING:  # a second CONNACK: the broker broke the protocol
            if self.state is ConnState.CONNECTED:
                self._drop_connection("a second CONNACK on a live connection")
            return
        if reason.is_failure:
            m = self.config.mqtt
            if reason.value in _AUTH_REFUSED:
                code = reason.value if self.config.mqtt.protocol == "5" else {134: 4, 135: 5}[reason.value]
                self.log.error("broker %s:%d refused the credentials of user %r: %s (CONNACK reason code %d)",
                               m.host, m.port, m.username, reason, code)
                self.exit_code = ExitCode.AUTH
                return
            self._set_state(ConnState.DISCONNECTED)
            self._schedule_reconnect(f"connection refused: {reason} (reason code {reason.value})")
            return
        self._set_state(ConnState.CONNECTED)
        self.connected_at = time.monotonic()  # the backoff resets only once this connection proves stable
        if self.ledger.connected() > 1:
            self.metrics.reconnects += 1
        self.log.info("connected to %s:%d (session present: %s)", self.config.mqtt.host,
                      self.config.mqtt.port, bool(flags.session_present))
        window = getattr(properties, "ReceiveMaximum", None) if self.v5 else None
        if window is not None and window < self.config.mqtt.inflight():  # paho cannot apply it on a live connection
            self.log.warning("the broker's Receive Maximum is %d, below [mqtt] max_inflight (%d): a broker that "
                             "enforces it may disconnect us; set max_inflight = %d", window,
                             self.config.mqtt.inflight(), window)
        if self.subscriptions:
            self._subscribe(list(self.subscriptions.items()))
        if self.unsubscribe_on_connect:
            self._unsubscribe(sorted(self.unsubscribe_on_connect))
            self.unsubscribe_on_connect.clear()
        if self.replies_wanted:
            self._subscribe_replies()
        birth = self.config.mqtt.birth
        if birth is not None:
            self.client.publish(birth.topic, birth.payload, birth.qos, birth.retain)

    def _drop_connection(self, error: str) -> None:
        """The broker broke the protocol: close the connection (MQTT 5: with reason "Protocol
        error") and reconnect with backoff, as after a loss; never a crash."""
        m = self.config.mqtt
        self.log.error("broker %s:%d: protocol error: %s; dropping the connection", m.host, m.port, error)
        self._set_state(ConnState.CLOSING)
        self.dropped_for = error
        self.ledger.offline(lost=True)  # undispatched QoS 1 messages come again on the next connection
        if self.v5:
            self.client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Protocol error"))
        else:
            self.client.disconnect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.dropped_for and self.exit_code == ExitCode.OK:  # our close after a protocol error
            self._set_state(ConnState.DISCONNECTED)
            self._note_connection_end(reason)
            self._schedule_reconnect(f"dropped after a protocol error ({self.dropped_for})")
            self.dropped_for = ""
            return
        if self.state in (ConnState.CLOSING, ConnState.DISCONNECTED) or self.exit_code != ExitCode.OK:
            self.state = ConnState.DISCONNECTED  # expected: we closed it, or we are leaving
            self.ledger.offline(lost=False)
            return
        was_connected = self.state is ConnState.CONNECTED
        self._set_state(ConnState.DISCONNECTED)
        if not was_connected:
            self._schedule_reconnect(f"the broker closed the connection before CONNACK {self._connect_hint()}")
            return
        self.ledger.offline(lost=True)  # undispatched QoS 1 messages come again on the next connection
        self._note_connection_end(reason)
        self._schedule_reconnect(f"connection lost ({reason})")

    def _note_connection_end(self, reason: Any) -> None:
        """A stable connection starts the backoff over; short ones in a row keep it growing, and
        say once what usually causes them."""
        if time.monotonic() - self.connected_at >= STABLE_CONNECTION:
            self.backoff.reset()
            self.short_lived = 0
            return
        self.short_lived += 1
        taken_over = getattr(reason, "value", None) == _SESSION_TAKEN_OVER and self.v5
        if (taken_over or self.short_lived >= SHORT_LIVED_WARN) and not self.warned_takeover:
            self.warned_takeover = True
            self.log.warning("the broker keeps closing the connection right after accepting it: another "
                             "client is %susing the client id %r (two instances of this app?); give each "
                             "instance its own [mqtt] client_id", "" if taken_over else "probably ",
                             self.client_id)

    def _subscribe(self, subs: list[tuple[str, int]]) -> None:
        valid = []
        for f, qos in subs:  # one bad filter must not cost the others (paho refuses the whole list)
            problem = subscriptions.problem(self.config.mqtt, f, qos)
            if problem is None:
                valid.append((f, qos))
            else:
                self.log.error("not subscribing to %s: %s", subscriptions.shown(f), problem)
        wire = [(self.config.mqtt.wire_filter(f), qos) for f, qos in valid]
        if not wire:
            return
        try:
            rc, mid = self.client.subscribe(wire)
        except Exception:  # paho refuses what the checks missed: a failed request, not a dead agent
            self.log.exception("paho refused to subscribe to %s", ", ".join(subscriptions.shown(f) for f, _ in wire))
            return
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self.subscribe_requests[mid] = [f for f, _ in wire]

    def _unsubscribe(self, filters: list[str]) -> None:
        wire = [self.config.mqtt.wire_filter(f) for f in filters]
        try:
            _, mid = self.client.unsubscribe(wire)
        except Exception:  # as in _subscribe
            self.log.exception("paho refused to unsubscribe from %s", ", ".join(subscriptions.shown(f) for f in wire))
            return
        if mid is not None:
            self.subscribe_requests[mid] = wire

    def _subscribe_replies(self) -> None:
        """Replies are this instance's own: never inside the share group, never saved.

        QoS 0: a QoS 1 reply would need a slot of the Receive Maximum window, which handlers waiting
        for replies may hold entirely; it would then wait for a slot only its own arrival can free.
        """
        reply_filter = self.reply_prefix + "+"
        try:
            rc, mid = self.client.subscribe(reply_filter, 0)
        except Exception:  # as in _subscribe
            self.log.exception("paho refused to subscribe to %s", reply_filter)
            return
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self.subscribe_requests[mid] = [reply_filter]

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        filters = self.subscribe_requests.pop(mid, [])
        granted = []
        for topic_filter, reason in zip(filters, reasons, strict=False):
            if reason.is_failure:
                self.log.error("the broker refused the subscription to %s: %s", topic_filter, reason)
            else:
                granted.append(f"{topic_filter} (qos {reason.value})")
        if granted:
            self.log.info("subscribed to %s", ", ".join(granted))

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if mid == self.syncing:
            self.syncing = 0
            return
        for topic_filter in self.subscribe_requests.pop(mid, []):
            self.log.info("unsubscribed from %s", topic_filter)

    # --- messages in ---------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's PUBLISH (an MQTT 5 one with properties, or QoS 2): into the one intake path."""
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # from a broker that does not check; raising would crash-loop on its resend
            self._odd("topic", "a message whose topic is not valid UTF-8 (%r, QoS %d); acknowledged and dropped",
                      getattr(msg, "_topic", b"?")[:200], msg.qos)
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        properties = mqtt5.from_paho(getattr(msg, "properties", None)) if self.v5 else None
        self._intake([Inbound(topic, msg.payload, msg.qos, msg.mid, bool(msg.retain), bool(msg.dup))], properties)

    def _intake(self, batch: list[Inbound], properties: Properties | None) -> None:
        """Every message from the broker (decoded by ``brokersocket`` or by paho): MQTT 5 replies
        to the workers that await them, the rest to the ledger."""
        if self.v5 and any(m.topic.startswith(self.reply_prefix) for m in batch):
            for m in batch:
                if m.topic.startswith(self.reply_prefix):
                    self._route_reply(m.topic, m.payload, m.qos, m.mid, m.retain, properties or EMPTY)
            batch = [m for m in batch if not m.topic.startswith(self.reply_prefix)]
        self.metrics.received += len(batch)
        self.ledger.arrived(batch, properties)

    def _route_reply(self, topic: str, payload: bytes, qos: int, mid: int, retain: bool,
                     properties: Properties) -> None:
        """A reply to a worker's request goes to that worker (the topic's last level is its slot),
        acknowledged at once: it is an answer awaited by a handler, not work for the app."""
        if qos:
            self.client.ack(mid, qos)
        self.replies += 1
        slot = mqtt5.reply_slot(topic, self.reply_prefix)
        if slot is None:
            self._odd("reply topic", "a message on %r, under this instance's reply topics, names no worker "
                      "slot; acknowledged and dropped", topic[:200])
            return
        worker = self.workers.get(slot)
        if worker is None:
            self.log.debug("reply on %r: no such worker; dropped", topic)
            return
        self._write(worker, channel.Reply(topic, payload, qos, retain, properties))

    # --- the ledger's effects ------------------------------------------------------------------

    def _deliver(self, slot: int, d: Delivery) -> None:
        self.metrics.dispatched[slot] += 1
        self._write(self.workers[slot], channel.Deliver(d.delivery_id, d.topic, d.payload, d.qos, d.retain,
                                                        d.redelivered, d.properties))

    def _acknowledge(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)

    def _requeued(self, d: Delivery) -> None:
        self.metrics.redelivered += 1

    def _drop(self, d: Delivery, reason: str) -> None:
        self.metrics.dropped += 1
        self.log.error("dropping the message on %r: %s; set [workers] dead_letter_topic to keep such "
                       "messages", d.topic, reason)

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        topic = self.config.workers.dead_letter_topic
        target = f"{topic}/{d.topic}"
        properties = None
        if self.config.mqtt.protocol == "5":
            properties = PahoProperties(PacketTypes.PUBLISH)
            properties.UserProperty = [("procmqtt-reason", reason), ("procmqtt-topic", d.topic)]
        entry = Outgoing(target, d.payload, 1, False, properties, dead_letter=d)
        problem = self.publishes.problem(entry)
        if problem:  # a topic too long with the original appended, say: drop it, and say so
            self.metrics.dropped += 1
            self.log.error("dropping the message on %r: %s; its dead letter cannot be published (%s)",
                           d.topic[:200], reason, problem)
            self.ledger.settle(d)
            return
        self.metrics.dead_lettered += 1
        self.log.error("dead-lettering the message on %r to %r: %s", d.topic, target, reason)
        self.publishes.add(entry)  # the original is acknowledged once the broker has the dead letter

    # --- workers -------------------------------------------------------------------------------

    def _write(self, worker: _WorkerChannel, record: channel.Record) -> None:
        """Queue a record for a worker; the end of the pass sends each worker's queue as one batch."""
        worker.unsent.append(channel.encode(record))
        self.dirty.add(worker.slot)

    def _flush(self, worker: _WorkerChannel) -> None:
        """Never blocks: what does not fit waits for the socket to be writable."""
        try:
            channel.send_many(worker.sock, worker.unsent, block=False)
        except OSError as exc:
            if not channel.is_gone(exc):
                raise
            worker.unsent.clear()  # it is dead; its end of file arrives on the next pass

    def _at_eof(self, sock: socket.socket) -> bool:
        """Workers never write to their own channel, so readable means end of file."""
        try:
            return channel.receive(sock) is None
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

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
        worker = self.workers[record.slot] = _WorkerChannel(record.slot, record.generation, record.sock)
        for answer in self.early_answers.worker_up(record.slot, record.generation):
            self._write(worker, answer)
        self.metrics.ensure_slots(record.slot + 1)  # SIGTTIN adds slots
        if self.stopping:
            self._write(worker, channel.Stop())
        self.ledger.worker_up(record.slot, record.generation)

    def _forget_worker(self, worker: _WorkerChannel) -> None:
        """A worker is gone: the ledger takes back what it held (``DeliveryLedger.gone``)."""
        del self.workers[worker.slot]
        worker.sock.close()
        current = self.shared.current(worker.slot, worker.generation)
        held = self.ledger.gone(worker.slot, worker.generation, current)
        if held and self.stopping:
            self.log.warning("worker %d stopped holding %d message(s); QoS 1 ones stay at the broker",
                             worker.slot, held)
        elif held:
            self.log.warning("worker %d is gone holding %d unfinished message(s); they go to other workers",
                             worker.slot, held)

    # --- the publish channel -----------------------------------------------------------------

    def _read_upstream(self, limit: int | None) -> None:
        count = 0
        while limit is None or count < limit:
            try:
                records = channel.receive(self.upstream)
            except BlockingIOError:
                return
            if records is None:
                return
            count += 1
            for record in records:
                self._handle_upstream(record)

    def _want_broker_data(self, now: float) -> bool:
        """Backpressure: read from the broker only while workers can take more, so a flood waits in
        the broker (and TCP), not in the agent. Read anyway while acknowledgements are awaited
        (handlers may be waiting on them; ``_read_broker`` then takes one packet per pass) and now
        and then for PINGRESP."""
        return (self.ledger.room() > 0
                or bool(self.publishes or self.subscribe_requests)
                or now < self.replies_until  # a handler waits for a reply, maybe behind the flood
                or now - self.last_broker_read > self.config.mqtt.keepalive / 4)

    def _read_broker(self) -> None:
        """Read what the broker sent, in bulk: PUBLISH packets are decoded here, everything else is
        given to paho one whole packet at a time (``brokersocket``). Takes at most what the workers'
        read-ahead has room for, but at least one message, and every packet before it, so
        acknowledgements awaited by handlers are never stuck behind a flood."""
        stream = self.stream
        if stream is None:  # a paho whose socket could not be wrapped reads for itself
            self.client.loop_read()
            return
        if self.client.socket() is not stream:
            return
        stream.fill(READ_AHEAD)
        budget = max(1, self.ledger.room())
        while budget > 0 and self.client.socket() is stream:
            batch = stream.publishes(budget, self.v5)
            if batch:
                budget -= len(batch)
                self._intake(batch, self.batch_properties)
                continue
            if not stream.release():
                return  # the rest of the packet is still on its way
            before, pos = self.metrics.received + self.replies, stream.pos
            self.client.loop_read()
            if self.metrics.received + self.replies != before:
                budget -= 1
            elif stream.pos == pos:
                return  # paho took nothing: it closed the connection or has it closing

    def _handle_upstream(self, record: channel.Record) -> None:
        if isinstance(record, channel.Done):
            self._done(record)
        elif isinstance(record, channel.Publish):
            self._publish(record)
        elif isinstance(record, channel.Subscribe):
            problem = subscriptions.problem(self.config.mqtt, record.topic_filter, record.qos)
            if problem is not None:  # saved, it would crash every agent that loads it
                self.log.error("runtime subscription to %s dropped, not saved: %s",
                               subscriptions.shown(record.topic_filter), problem)
                return
            self.subscriptions[record.topic_filter] = record.qos
            self.unsubscribe_on_connect.discard(record.topic_filter)
            self._save_subscriptions()
            if self.state is ConnState.CONNECTED:
                self._subscribe([(record.topic_filter, record.qos)])
        elif isinstance(record, channel.Unsubscribe):
            problem = subscriptions.problem(self.config.mqtt, record.topic_filter, 0)
            if problem is not None:  # never subscribed, and paho would refuse it
                self.log.error("unsubscribe from %s ignored: %s", subscriptions.shown(record.topic_filter), problem)
                return
            self.subscriptions.pop(record.topic_filter, None)
            self._save_subscriptions()
            if self.state is ConnState.CONNECTED:
                self._unsubscribe([record.topic_filter])
            else:
                self.unsubscribe_on_connect.add(record.topic_filter)
        elif isinstance(record, (channel.Ready, channel.Retire)):
            self._worker_record(record)
        elif isinstance(record, channel.WorkerUp):
            self._add_worker(record)
        elif isinstance(record, channel.WorkerExited):  # no end of file while a child of it holds the channel
            worker = self.workers.get(record.slot)
            if worker is not None and worker.generation == record.generation:
                self._forget_worker(worker)
        elif isinstance(record, channel.StopAgent):
            self.begin_stop("requested by the supervisor")
        elif isinstance(record, channel.Restarts):
            self.metrics.set_restarts(record.cause, record.total)
        elif isinstance(record, channel.Sync):
            self._sync_worker(record)

    def _publish(self, record: channel.Publish) -> None:
        """Queue a worker's publish; the end of the pass hands it to paho (``outbox``)."""
        entry = Outgoing(record.topic, record.payload, record.qos, record.retain, None, record.slot,
                         record.generation, record.request_id)
        if record.properties is not None:
            try:
                response_topic = self._expect_reply(record) if record.request else None
                entry.properties = mqtt5.to_paho(record.properties, response_topic)
            except Exception as exc:  # noqa: BLE001 - a record paho cannot take fails its publish, never the agent
                self.log.warning("publish to %r failed: its properties: %s", record.topic[:200], exc)
                self._answer(record.slot, record.generation, record.request_id, MQTTErrorCode.MQTT_ERR_INVAL)
                return
        self.publishes.add(entry)

    def _done(self, record: channel.Done) -> None:
        slot = self.ledger.done(record.delivery_id, failed=record.failed)
        if slot >= 0:
            self.metrics.done(slot, record.outcome, record.seconds)

    def _published(self, entry: Outgoing, error: int) -> None:
        """A publish is answered (``outbox``): the worker hears, or a dead letter's original is acknowledged."""
        d = entry.dead_letter
        described = describe_error(error) if error else ""  # the one use of the worker's error names
        if d is not None:
            if error:
                self.metrics.dropped += 1
                self.log.error("the dead letter of the message on %r could not be published to %r (%s); "
                               "dropping the message", d.topic, entry.topic[:200], described)
            self.ledger.settle(d)
            return
        if error >= 128:
            self.log.warning("the broker refused the publish to %r: %s", entry.topic, described)
        self._answer(entry.slot, entry.generation, entry.request_id, error)

    def _expect_reply(self, record: channel.Publish) -> str:
        """A worker's request: subscribe to the replies before the request leaves (the broker handles
        our packets in order), and read the broker eagerly until the request expires."""
        if not self.replies_wanted:
            self.replies_wanted = True
            if self.state is ConnState.CONNECTED:
                self._subscribe_replies()
        expiry = record.properties.message_expiry if record.properties else None
        wait = REPLY_WAIT_FALLBACK if expiry is None else min(expiry, REPLY_WAIT_FALLBACK * 10)
        self.replies_until = max(self.replies_until, time.monotonic() + wait)
        return f"{self.reply_prefix}{record.slot}"

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.publishes.confirmed(mid, reason.value if reason.is_failure else 0, self.stream)

    def _fail_lost_publishes(self) -> None:
        """paho drops unsent QoS 0 publishes on reconnect, and the old socket's unsent bytes are
        gone; tell their workers."""
        self.publishes.fail_lost(self.stream)

    def _answer(self, slot: int, generation: int, request_id: int, error: int) -> None:
        """Tell a worker how its publish went (``channel.Published``)."""
        self.metrics.published(error)  # every worker publish ends here once
        worker = self.workers.get(slot)
        answer = channel.Published(request_id, int(error))
        if worker is not None and worker.generation == generation:
            self._write(worker, answer)
        else:
            self.early_answers.keep(slot, generation, answer)

    def _sync_worker(self, record: channel.Sync) -> None:
        worker = self.workers.get(record.slot)
        if worker is not None and worker.generation == record.generation:
            self._write(worker, sync_ack(self.publishes, record))

    # --- subscriptions survive agent restarts ------------------------------------------------

    def _load_subscriptions(self) -> dict[str, int]:
        return subscriptions.load(self.state_path, self.config.mqtt, self.log)

    def _save_subscriptions(self) -> None:
        subscriptions.save(self.state_path, self.subscriptions)
