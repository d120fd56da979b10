"""What the delivery core (``ledger.py``) takes in and hands out: a message as it arrived
(:class:`Inbound`), a message the agent holds (:class:`Delivery`), and the callbacks through which
the ledger acts (:class:`Effects`). Apart from the ledger so that the broker socket, the outbox and
the loop can name them without the ledger's logic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from procmqtt.message import Properties

INVALID = "its body did not validate (the worker logged which field); not retried"
"""The reason given with a message whose body did not validate (``Outcome.INVALID``)."""


class Inbound(NamedTuple):
    """A PUBLISH as it arrived from the broker, decoded (``brokersocket`` or paho)."""

    topic: str
    payload: bytes
    qos: int
    mid: int  # the packet id, what an acknowledgement names
    retain: bool
    dup: bool


@dataclass(slots=True, eq=False)
class Delivery:
    """One message the agent holds: undispatched (``pending``) or given to a worker (``slot``)."""

    delivery_id: int
    mid: int
    epoch: int  # connection the message arrived on; an ack on a later connection is meaningless
    topic: str
    payload: bytes
    qos: int
    retain: bool
    redelivered: bool
    properties: Properties | None = None  # MQTT 5 only
    slot: int = -1
    attempts: int = 0  # workers that died or failed while handling it
    key: str = ""  # ordered mode: its order key


@dataclass(frozen=True, slots=True)
class Effects:
    """What the ledger asks the agent to do. Each is called in the order decided.

    - ``deliver(slot, delivery)``: send it to the slot's worker.
    - ``acknowledge(mid, qos)``: PUBACK (QoS 1) or PUBCOMP (QoS 2) on the current connection.
    - ``dead_letter(delivery, reason)``: publish it to the dead letter topic, then call the ledger's
      ``settle`` (confirmed, failed or unpublishable: the original is done).
    - ``drop(delivery, reason)``: given up without a dead letter (the ledger acknowledges it).
    - ``requeued(delivery)``: it goes out again, marked redelivered (for the metrics).
    """

    deliver: Callable[[int, Delivery], None]
    acknowledge: Callable[[int, int], None]
    dead_letter: Callable[[Delivery, str], None]
    drop: Callable[[Delivery, str], None]
    requeued: Callable[[Delivery], None]
