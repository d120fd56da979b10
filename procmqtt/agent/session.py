"""The agent's broker session: connect, CONNACK, backoff, subscriptions (and their persistence),
will and birth, reading and writing the broker socket, and leaving cleanly.

Runs in the agent process, in its one thread, driven by the loop (``loop.py``). It tells the
delivery ledger when acknowledgements can go out and when a connection is lost (``connected``,
``offline``), and hands the messages it reads to the loop's one intake path; it makes no delivery
decision itself. The connection's states and their legal transitions are in ``connection.py``.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from procmqtt import mqtt5
from procmqtt.agent import connection, metrics
from procmqtt.agent.brokersocket import BrokerSocket, wrap_socket
from procmqtt.agent.connection import ConnState
from procmqtt.agent.deliveries import Inbound
from procmqtt.agent.ledger import DeliveryLedger
from procmqtt.agent.outbox import Outbox
from procmqtt.agent.replies import Replies
from procmqtt.agent.sharecheck import ShareCheck
from procmqtt.agent.subscriptions import Subscriptions
from procmqtt.backoff import Backoff
from procmqtt.config import Config
from procmqtt.errors import ExitCode
from procmqtt.ipc import channel, poller
from procmqtt.message import EMPTY, Properties

READ_AHEAD = 1024 * 1024
"""Bytes of the broker's stream the agent holds unparsed at most (beyond one large packet)."""
_AUTH_REFUSED = {134, 135}  # Bad user name or password, Not authorized (3.1.1 codes 4 and 5)

Intake = Callable[[list[Inbound], "Properties | None"], None]


class BrokerSession:
    """One broker connection after another, and what must survive between them."""

    def __init__(
        self,
        config: Config,
        client_id: str,
        state_dir: str,
        log: logging.Logger,
        *,
        ledger: DeliveryLedger,
        counters: metrics.Counters,
        publishes: Outbox,
        replies: Replies,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.log = log
        self.ledger = ledger
        self.metrics = counters
        self.publishes = publishes
        self.replies = replies
        self.v5 = config.mqtt.protocol == "5"
        self.batch_properties = EMPTY if self.v5 else None  # of the messages ``brokersocket`` decodes
        self.subs = Subscriptions(config.mqtt, os.path.join(state_dir, "subscriptions.json"), log)
        self.share = ShareCheck(config.mqtt, client_id, log)  # does the broker do share_group?
        self.state = ConnState.DISCONNECTED
        self.backoff = Backoff(base=0.5, cap=30.0)
        self.connected_at = 0.0
        self.short_lived = 0  # connections in a row that ended before connection.STABLE_CONNECTION
        self.dropped_for = ""  # the protocol error we closed the connection for, until it is closed
        self.warned_takeover = False
        self.next_attempt = 0.0
        self.connack_deadline = 0.0
        self.syncing = 0  # mid of the UNSUBSCRIBE that proves the broker has our acknowledgements
        self.last_read = 0.0
        self.intake: Intake  # set in start(): the loop's one intake path
        self.odd: Callable[..., None]  # set in start(): counts and logs what a broken broker sent
        self.exit_code = ExitCode.OK  # why the agent leaves early (bad credentials, no $share, stuck loop)
        self.client: mqtt.Client = None  # type: ignore[assignment]  # created in start(), after fork
        self.stream: BrokerSocket | None = None  # the broker socket as paho sees it (brokersocket.py)

    def start(self, intake: Intake, odd: Callable[..., None]) -> None:
        """Build the paho client (in the agent process, after fork). Every PUBLISH read goes to
        ``intake``; ``odd(kind, message, *args)`` counts and logs what a broken broker sent."""
        self.intake = intake
        self.odd = odd
        client = connection.make_client(
            self.config.mqtt, self.client_id, self.config.workers.count * self.config.workers.prefetch
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self.client = client

    def close(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def _set_state(self, new: ConnState) -> None:
        connection.check_transition(self.state, new)
        self.state = new
        if new is not ConnState.CONNECTED:
            self.ledger.offline(lost=False)  # acknowledgements go nowhere now

    # --- connecting ----------------------------------------------------------------------------

    def connect(self) -> None:
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
                    reason += " " + connection.hint(self.config.mqtt)
            self._schedule_reconnect(f"cannot connect: {reason}")
            return
        self.connack_deadline = time.monotonic() + self.config.mqtt.connect_timeout
        self.stream = wrap_socket(self.client)
        self.publishes.fail_lost(self.stream)  # paho drops unsent QoS 0 publishes on reconnect

    def tick(self, now: float) -> None:
        """Once a second: paho keepalive and the CONNACK timeout."""
        if self.state is not ConnState.DISCONNECTED and self.client.socket() is not None:
            self.client.loop_misc()
        if self.state is ConnState.CONNECTING and now >= self.connack_deadline:
            self._set_state(ConnState.DISCONNECTED)
            m = self.config.mqtt
            self._schedule_reconnect(f"no CONNACK within {m.connect_timeout:g}s {connection.hint(m)}")
        if self.state is ConnState.CONNECTED:  # a check cut short starts again on the next connection
            self._refuse(self.share.due(now, self.client))

    def _refuse(self, error: str | None) -> None:
        """The broker cannot do what the configuration asks (``sharecheck``): exit 2."""
        if error is not None:
            self.log.error("%s", error)
            self.exit_code = ExitCode.USAGE

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
        m = self.config.mqtt
        if reason.is_failure:
            if reason.value in _AUTH_REFUSED:
                code = reason.value if self.v5 else {134: 4, 135: 5}[reason.value]
                self.log.error(
                    "broker %s:%d refused the credentials of user %r: %s (CONNACK reason code %d)",
                    m.host,
                    m.port,
                    m.username,
                    reason,
                    code,
                )
                self.exit_code = ExitCode.AUTH
                return
            self._set_state(ConnState.DISCONNECTED)
            self._schedule_reconnect(f"connection refused: {reason} (reason code {reason.value})")
            return
        self._set_state(ConnState.CONNECTED)
        self.connected_at = time.monotonic()  # the backoff resets only once this connection proves stable
        if self.ledger.connected() > 1:
            self.metrics.reconnects += 1
        self.log.info("connected to %s:%d (session present: %s)", m.host, m.port, bool(flags.session_present))
        window = getattr(properties, "ReceiveMaximum", None) if self.v5 else None
        if window is not None and window < m.inflight():  # paho cannot apply it on a live connection
            self.log.warning(
                "the broker's Receive Maximum is %d, below [mqtt] max_inflight (%d): a broker that "
                "enforces it may disconnect us; set max_inflight = %d",
                window,
                m.inflight(),
                window,
            )
        self.subs.connected(self.client)
        self._refuse(self.share.connected(self.client, properties, self.v5))
        if self.replies.wanted:
            self.subscribe_replies()
        if m.birth is not None:
            self.client.publish(m.birth.topic, m.birth.payload, m.birth.qos, m.birth.retain)

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
            hint = connection.hint(self.config.mqtt)
            self._schedule_reconnect(f"the broker closed the connection before CONNACK {hint}")
            return
        self.ledger.offline(lost=True)  # undispatched QoS 1 messages come again on the next connection
        self._note_connection_end(reason)
        self._schedule_reconnect(f"connection lost ({reason})")

    def _note_connection_end(self, reason: Any) -> None:
        """A stable connection starts the backoff over; short ones in a row keep it growing, and
        say once what usually causes them."""
        if time.monotonic() - self.connected_at >= connection.STABLE_CONNECTION:
            self.backoff.reset()
            self.short_lived = 0
            return
        self.short_lived += 1
        taken_over = getattr(reason, "value", None) == connection.SESSION_TAKEN_OVER and self.v5
        if (taken_over or self.short_lived >= connection.SHORT_LIVED_WARN) and not self.warned_takeover:
            self.warned_takeover = True
            self.log.warning(
                "the broker keeps closing the connection right after accepting it: another "
                "client is %susing the client id %r (two instances of this app?); give each "
                "instance its own [mqtt] client_id",
                "" if taken_over else "probably ",
                self.client_id,
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's PUBLISH (an MQTT 5 one with properties, or QoS 2): into the one intake path."""
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # from a broker that does not check; raising would crash-loop on its resend
            self.odd(
                "topic",
                "a message whose topic is not valid UTF-8 (%r, QoS %d); acknowledged and dropped",
                getattr(msg, "_topic", b"?")[:200],
                msg.qos,
            )
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        properties = mqtt5.from_paho(getattr(msg, "properties", None)) if self.v5 else None
        self.intake([Inbound(topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain), bool(msg.dup))], properties)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.publishes.confirmed(mid, reason.value if reason.is_failure else 0, self.stream)

    # --- subscriptions -------------------------------------------------------------------------

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        refused = self.subs.granted(mid, reasons)
        self._refuse(self.share.granted(mid, reasons, refused, client, time.monotonic()))

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if mid == self.syncing:
            self.syncing = 0
            return
        self.subs.unsubscribed(mid)

    def runtime_subscribe(self, record: channel.Subscribe) -> None:
        """A worker subscribed at run time: saved, so every later agent subscribes too."""
        self.subs.add(record.topic_filter, record.qos, self.client if self.state is ConnState.CONNECTED else None)

    def runtime_unsubscribe(self, record: channel.Unsubscribe) -> None:
        self.subs.remove(record.topic_filter, self.client if self.state is ConnState.CONNECTED else None)

    def subscribe_replies(self) -> None:
        self.subs.subscribe_replies(self.client, self.replies.filter)

    def expect_reply(self, record: channel.Publish) -> str:
        """A worker's request: its response topic; the reply filter is subscribed before the
        request leaves (the broker handles our packets in order)."""
        topic, first = self.replies.expect(record, time.monotonic())
        if first and self.state is ConnState.CONNECTED:
            self.subscribe_replies()
        return topic

    # --- the socket ----------------------------------------------------------------------------

    def socket(self) -> Any:
        """The socket to wait on, or None while disconnected."""
        return self.client.socket() if self.state is not ConnState.DISCONNECTED else None

    def unwritten(self) -> bool:
        return self.client.want_write() or (self.stream is not None and bool(self.stream.out))

    def want_data(self, now: float) -> bool:
        """Backpressure: read from the broker only while workers can take more, so a flood waits in
        the broker (and TCP), not in the agent. Read anyway while acknowledgements are awaited
        (handlers may be waiting on them; ``read`` then takes one packet per pass) and now
        and then for PINGRESP."""
        return (
            self.ledger.room() > 0
            or bool(self.publishes or self.subs.requests)
            or now < self.replies.until  # a handler waits for a reply, maybe behind the flood
            or now - self.last_read > self.config.mqtt.keepalive / 4
        )

    def write(self) -> None:
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

    def read(self) -> None:
        """Read what the broker sent, in bulk: PUBLISH packets are decoded here and go to the intake,
        everything else is given to paho one whole packet at a time (``brokersocket``). Takes at most
        what the ledger's read-ahead has room for, but at least one message, and every packet before
        it, so acknowledgements awaited by handlers are never stuck behind a flood."""
        stream = self.stream
        if stream is None:  # a paho whose socket could not be wrapped reads for itself
            self.client.loop_read()
            return
        live: Any = self.client.socket()
        if live is not stream:
            return
        stream.fill(READ_AHEAD)
        budget = max(1, self.ledger.room())
        while budget > 0 and self._reading(stream):
            batch = stream.publishes(budget, self.v5)
            if batch:
                budget -= len(batch)
                self.intake(batch, self.batch_properties)
                continue
            if not stream.release():
                return  # the rest of the packet is still on its way
            before, pos = self.metrics.received + self.replies.count, stream.pos
            self.client.loop_read()
            if self.metrics.received + self.replies.count != before:
                budget -= 1
            elif stream.pos == pos:
                return  # paho took nothing: it closed the connection or has it closing

    def _reading(self, stream: BrokerSocket) -> bool:
        """paho still reads through ``stream`` (a callback may have closed or replaced it)."""
        return bool(self.client.socket() is stream)

    # --- leaving -------------------------------------------------------------------------------

    def disconnect(self) -> None:
        """Say the will ourselves (a clean DISCONNECT suppresses it), make sure the broker has our
        acknowledgements, then DISCONNECT and flush it."""
        if self.state is not ConnState.CONNECTED:
            return
        will = self.config.mqtt.will
        if will is not None:
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
                readable, _ = poller.wait([sock], [sock] if self.unwritten() else [], 0 if waiting else 0.05)
            except poller.ClosedUnderUs:
                self.log.debug("the broker socket closed while syncing; not waiting for the UNSUBACK")
                return
            if readable or waiting:
                self.read()  # messages arriving now are ignored: we are stopping
            self.write()
