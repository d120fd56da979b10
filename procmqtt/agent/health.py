"""Health probes: ``GET /livez`` and ``GET /readyz`` for Kubernetes and the like (``[health]``).

Where they are served, and why. From a thread of the agent, with ``endpoint.py``'s bounded
responder on a listening socket the supervisor opened before any fork, as ``[metrics]`` is:

- a thread in the supervisor is unsafe (it forks; a child forked while that thread holds a lock
  inherits the lock held forever), and the agent never forks;
- readiness is the agent's knowledge (the connection, the subscriptions, the workers' seats), so
  it is read in the process that has it, not shipped to another one;
- the supervisor's part of liveness is one word of shared memory (``SharedState.beat``), written
  at every pass of its loop, which wakes at least once a second. A supervisor whose loop is stuck
  (or gone) stops beating, and ``/livez`` fails ``STALE_AFTER`` seconds later. The agent's loop
  publishes its ``Readiness`` once a tick (``TICK``, one second); a stuck agent loop stops
  publishing and ``/livez`` fails the same way. A dead agent answers nothing: the probe waits in
  the socket's accept queue (the socket stays open in the supervisor) until the next agent
  answers, or times out, which is a failed probe too.

``/livez`` does not look at the broker: while the broker is away, the agent reconnects by itself
and a new pod would not reach the broker either. ``/readyz`` does: 200 only while connected, with
every SUBSCRIBE and UNSUBSCRIBE sent on this connection answered, not stopping, and at least one
worker ready (booted, not retiring); 503 otherwise. Both answer a small JSON body; neither reads
a request body. Readiness is at most one tick old.

The endpoint thread reads only ``Probes.readiness`` (a frozen object the loop replaces whole: one
reference, atomic under the GIL) and the shared heartbeat (one aligned word), so it needs no lock.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from procmqtt.agent import endpoint
from procmqtt.agent.connection import ConnState

if TYPE_CHECKING:
    from procmqtt.agent.ledger import DeliveryLedger
    from procmqtt.agent.session import BrokerSession
    from procmqtt.config import Config
    from procmqtt.ipc.shared import SharedState

STALE_AFTER = 20.0
"""Seconds without a pass of the supervisor's loop, or a tick of the agent's, before /livez fails.
Both normally run every second; a SIGHUP that imports a slow app holds the supervisor's loop."""
DEADLINE = 2.0
"""Seconds a probe connection may take in all; a probe is one short request and a short answer."""


@dataclass(frozen=True)
class Readiness:
    """What the agent's loop knows, taken once a tick and published whole."""

    at: float  # time.monotonic() when the loop took it
    state: str  # the connection's state ("connected", "connecting", ...), or "stopping"
    connected_since: float | None  # time.time() of the CONNACK, None while not connected
    subscribed: bool  # every SUBSCRIBE/UNSUBSCRIBE sent on this connection answered
    workers_ready: int  # booted and not retiring: they take messages
    workers_total: int  # the workers the agent knows
    pending: int  # messages in the agent not given to a worker (queued, held for a retry, waiting on a key)

    @property
    def ready(self) -> bool:
        return self.state == ConnState.CONNECTED.value and self.subscribed and self.workers_ready > 0


def take(session: BrokerSession, ledger: DeliveryLedger, *, stopping: bool, now: float) -> Readiness:
    """In the agent's loop: the readiness now (cheap: a pass over the seats)."""
    connected = session.state is ConnState.CONNECTED
    seats = ledger.seats.values()
    return Readiness(
        at=now,
        state="stopping" if stopping else session.state.value,
        connected_since=time.time() - (now - session.connected_at) if connected else None,
        subscribed=connected and not session.subs.requests,
        workers_ready=sum(s.ready and not s.retiring for s in seats),
        workers_total=len(seats),
        pending=len(ledger.pending) + len(ledger.held) + ledger.waiting,
    )


class Probes:
    """The two routes; ``readiness`` is replaced by the agent's loop, read by the endpoint's thread."""

    def __init__(self, shared: SharedState, clock: Callable[[], float] = time.monotonic) -> None:
        self.shared = shared
        self.clock = clock
        self.readiness = Readiness(clock(), "starting", None, False, 0, 0, 0)

    def routes(self) -> dict[str, endpoint.Handler]:
        return {"/livez": self.livez, "/readyz": self.readyz}

    def livez(self, request: endpoint.Request | None = None) -> endpoint.Response:
        """200 while the supervisor's loop and the agent's loop both run, whatever the broker does."""
        r = self.readiness
        problems = self._stalled(r)
        return _answer(not problems, r, problems)

    def readyz(self, request: endpoint.Request | None = None) -> endpoint.Response:
        """200 only while alive, connected, subscribed, and at least one worker is ready."""
        r = self.readiness
        problems = self._stalled(r)
        if r.state == "stopping":
            problems.append("stopping: taking no new messages")
        elif r.state != ConnState.CONNECTED.value:
            problems.append(f"not connected to the broker ({r.state})")
        elif not r.subscribed:
            problems.append("subscriptions not yet acknowledged by the broker")
        if r.workers_ready == 0:
            problems.append(f"no worker ready (0 of {r.workers_total})")
        return _answer(not problems, r, problems)

    def _stalled(self, r: Readiness) -> list[str]:
        now = self.clock()
        problems = []
        supervisor = now - self.shared.heartbeat()
        if supervisor > STALE_AFTER:
            problems.append(f"the supervisor's loop has not run for {supervisor:.0f} s")
        agent = now - r.at
        if agent > STALE_AFTER:
            problems.append(f"the agent's loop has not run for {agent:.0f} s")
        return problems


def _answer(ok: bool, r: Readiness, problems: list[str]) -> endpoint.Response:
    body = asdict(r)
    del body["at"]
    since = r.connected_since
    body["connected_since"] = (
        None if since is None else datetime.fromtimestamp(since, timezone.utc).isoformat(timespec="seconds")
    )
    body = {"status": "ok" if ok else "unavailable", **body, "problems": problems}
    return endpoint.Response(
        200 if ok else 503,
        json.dumps(body).encode() + b"\n",
        (("Content-Type", "application/json"), ("Cache-Control", "no-store")),
    )


def listen(config: Config) -> socket.socket | None:
    """In the supervisor, before any fork: the ``[health]`` listening socket, or None when off.

    Raises ``ConfigError`` (exit 2) when the address is unusable or the port taken.
    """
    h = config.health
    if h.port is None:
        return None
    return endpoint.listen(h.host, h.port, f"{config.source}: [health]")


def serve(sock: socket.socket, probes: Probes) -> endpoint.Endpoint:
    """In the agent, after fork: answer ``/livez`` and ``/readyz`` on ``sock`` from one daemon thread."""
    return endpoint.serve(sock, probes.routes(), name="procmqtt-health", deadline=DEADLINE)
