"""The message a worker receives."""

from __future__ import annotations

import enum
import json as _json
from dataclasses import dataclass
from typing import Any


class Outcome(enum.IntEnum):
    """How handling one message ended; travels back to the agent with the completion."""

    OK = 0
    FAILED = 1  # the handler raised
    UNROUTED = 2  # no route matched (acknowledged like OK, counted apart)


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message as the broker delivered it.

    ``payload`` is the exact bytes from the broker; nothing is decoded unless you ask, so binary
    payloads are safe. ``redelivered`` is True when a worker that held this message died and it was
    handed to another one.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    redelivered: bool = False

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (raises ``UnicodeDecodeError`` if it is not)."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON (raises ``ValueError`` if it is not)."""
        return _json.loads(self.payload)
