"""The records that travel on the channels: their kinds and fields (``procmqtt.ipc.channel``
carries them, ``procmqtt.ipc.codec`` lays them out in bytes).

Plain frozen values, the same on either side of the fork.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from procmqtt.message import Outcome, Properties

# Kinds: downstream (agent -> worker)
DELIVER = 1
PUBLISHED = 2
STOP = 3
REPLY = 4
AGENT_STARTED = 5
SYNC_ACK = 6
RING_FILE = 7
DELIVER_AT = 8
# Kinds: upstream (workers and supervisor -> agent)
DONE = 10
PUBLISH = 11
SUBSCRIBE = 12
UNSUBSCRIBE = 13
RETIRE = 14
SYNC = 15
READY = 16
HOLDING = 17
WORKER_UP = 20
STOP_AGENT = 21
RESTARTS = 22
WORKER_EXITED = 23


@dataclass(slots=True)
class Deliver:
    """One message for a worker. Not frozen, unlike the other records: it is built twice per message
    (agent, worker) and a frozen dataclass's ``__init__`` costs about four times as much."""

    delivery_id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    redelivered: bool
    properties: Properties | None = None  # MQTT 5 only


@dataclass(slots=True)
class DeliverAt:
    """A ``Deliver`` whose payload is in the worker's ring (``ipc/ring.py``) at ``offset``: the worker
    copies it out when it reads the record and goes on with a plain ``Deliver``."""

    delivery_id: int
    topic: str
    offset: int
    length: int
    qos: int
    retain: bool
    redelivered: bool
    properties: Properties | None = None  # MQTT 5 only


@dataclass(frozen=True, slots=True)
class RingFile:
    """The agent's ring for this worker: its memory file's descriptor (``SCM_RIGHTS``). Every
    ``DeliverAt`` after it names this ring; one from a new agent replaces the old."""

    fd: int


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to a worker's ``request``: already acknowledged, for that worker only."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties


@dataclass(frozen=True, slots=True)
class Published:
    request_id: int
    error: int


@dataclass(frozen=True, slots=True)
class AgentStarted:
    """From a new agent to each worker it inherited (a first agent has none): publishes that the
    agent before it took and did not confirm never will be, so a worker awaiting any asks (``Sync``)."""


@dataclass(frozen=True, slots=True)
class SyncAck:
    """The answer to ``Sync``: of the worker's publishes up to ``last_request_id``, these are still
    in flight; the others were either confirmed before this record or taken by a dead agent."""

    last_request_id: int
    in_flight: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(slots=True)
class Done:
    """A worker finished a delivery. Not frozen, like ``Deliver``: it is built twice per message
    (worker, agent), and a frozen dataclass's ``__init__`` costs about three times as much."""

    delivery_id: int
    outcome: Outcome = Outcome.OK
    seconds: float = 0.0  # time in the handler, for the processing-time metric
    retry_after: float = -1.0  # Outcome.RETRY: the handler's delay in seconds; negative: the configured one

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAILED


@dataclass(frozen=True, slots=True)
class Publish:
    slot: int
    generation: int
    request_id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None  # MQTT 5 only
    request: bool = False  # the agent adds this worker's reply topic as the response topic


@dataclass(frozen=True, slots=True)
class Sync:
    """A worker asks which of its publishes up to ``last_request_id`` the agent still holds. Records
    from one worker arrive in order, so the agent reading this has read all of those publishes."""

    slot: int
    generation: int
    last_request_id: int


@dataclass(frozen=True, slots=True)
class Holding:
    """A worker's answer to ``AgentStarted``: the deliveries the agent before gave it that it has not
    reported done (running or still queued), as (delivery id, topic). In ordered mode the new agent
    keeps their keys busy until their ``Done`` or the worker's death; other modes ignore it."""

    slot: int
    generation: int
    deliveries: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic_filter: str
    qos: int


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic_filter: str


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker finished on_start: the agent may give it messages."""

    slot: int
    generation: int


@dataclass(frozen=True, slots=True)
class Retire:
    """The worker wants to be replaced (recycling): send it nothing more, then a stop."""

    slot: int
    generation: int


@dataclass(frozen=True, slots=True)
class WorkerUp:
    slot: int
    generation: int
    sock: socket.socket


@dataclass(frozen=True, slots=True)
class WorkerExited:
    """The supervisor reaped this worker. Its end of file may never come (a process it forked can
    hold its channel open), so the agent forgets it on this record; the worker's own records were
    queued before it died, so they are read before this one."""

    slot: int
    generation: int


@dataclass(frozen=True, slots=True)
class StopAgent:
    pass


@dataclass(frozen=True, slots=True)
class Restarts:
    """The supervisor's running total of worker restarts for one cause, for the metrics.

    A total, not an increment: a new agent is sent every total, and one that also reads a record
    queued for its dead predecessor counts nothing twice.
    """

    cause: str
    total: int


Record = (
    Deliver
    | DeliverAt
    | RingFile
    | Reply
    | Published
    | AgentStarted
    | SyncAck
    | Stop
    | Done
    | Publish
    | Sync
    | Holding
    | Subscribe
    | Unsubscribe
    | Ready
    | Retire
    | WorkerUp
    | WorkerExited
    | StopAgent
    | Restarts
)
