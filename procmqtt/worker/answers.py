"""What a handler holds while the agent answers: a publish's handle, a request's waiter, and the
``PublishError`` an answer carries. Runs in the worker process (any thread, or its event loop).

The handles know their link only through the ``Link`` protocol, so the real channels
(``link._AgentLink``) and ``procmqtt.testing.FakeLink`` are interchangeable.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Protocol

from paho.mqtt.client import error_string
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from procmqtt.errors import RequestFailed
from procmqtt.message import Message, Properties

if TYPE_CHECKING:
    from procmqtt.ipc.channel import Record


class PublishError(enum.IntEnum):
    """Why a publish failed: ``PublishHandle.error`` once answered (``OK``, 0, on success).

    One int carries three sources, as it did before it had names: paho's error codes (1-16), the
    broker's MQTT 5 reason codes (128 and up) and procmqtt's own ``AGENT_GONE``. An ``int``, so
    ``handle.error == 135`` and ``if handle.error:`` keep working; ``description`` is the sentence
    the logs use. A code without a name here (a newer broker's) is still a ``PublishError``, named
    ``CODE_<n>``.
    """

    OK = 0
    # paho's (MQTTErrorCode): the agent could not hand the message to the broker
    NO_MEMORY = 1
    PROTOCOL = 2
    INVALID = 3  # paho refused the message (e.g. its properties)
    NO_CONNECTION = 4
    CONNECTION_REFUSED = 5
    NOT_FOUND = 6
    CONNECTION_LOST = 7  # the broker connection dropped before a QoS 0 message left, or AGENT_GONE
    AGENT_GONE = 7  # the agent's side closed or restarted before an answer (an alias of the above)
    TLS = 8
    PAYLOAD_SIZE = 9  # over the broker's or MQTT's maximum packet size
    NOT_SUPPORTED = 10
    AUTH = 11
    ACL_DENIED = 12
    UNKNOWN = 13
    ERRNO = 14
    QUEUE_SIZE = 15
    KEEPALIVE = 16
    # the broker's MQTT 5 reason codes (PUBACK, PUBREC, PUBCOMP)
    UNSPECIFIED_ERROR = 0x80
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    NOT_AUTHORIZED = 0x87
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    QUOTA_EXCEEDED = 0x97
    PAYLOAD_FORMAT_INVALID = 0x99

    @classmethod
    def _missing_(cls, value: object) -> PublishError | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"CODE_{value}"
        member._value_ = value
        return member

    def __str__(self) -> str:  # the number, as before it had a name (and on every Python version)
        return str(int(self))

    @property
    def description(self) -> str:
        """Words for the code: the broker's reason (``Not authorized (reason code 135)``) or paho's."""
        code = int(self)
        if code == PublishError.AGENT_GONE:
            return "the agent's side closed or restarted before an answer"
        if code >= 128:
            try:
                return f"{ReasonCode(PacketTypes.PUBACK, identifier=code)} (reason code {code})"
            except (ValueError, KeyError):  # paho knows no name for it
                return f"reason code {code}"
        return str(error_string(code))


def describe_error(code: int) -> str:
    """Words for ``PublishHandle.error`` (the agent's log lines use it too)."""
    return PublishError(code).description


class Link(Protocol):
    """What handles and ``Worker`` use of the worker's channels: ``link._AgentLink`` in production,
    ``procmqtt.testing.FakeLink`` in unit tests."""

    closed: bool  # the agent side is gone for good
    loop_thread: int | None  # async apps: the event loop's thread, which reads the channel

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None = None
    ) -> PublishHandle: ...

    def request(self, topic: str, payload: bytes, qos: int, properties: Properties) -> _ReplyWaiter: ...

    def send(self, record: Record) -> None: ...

    def wait_for(self, answer: _Answer, timeout: float | None) -> bool: ...

    def forget(self, waiter: _ReplyWaiter) -> None: ...


class _Answer:
    """Something the agent answers later (a publish confirmation, a reply), awaited by a handler:
    ``wait()`` blocks, ``await`` does not block the event loop. ``error`` is ``PublishError.OK``
    (0) on success, None until answered."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.error: PublishError | None = None
        self._done = threading.Event()
        self._waiters: list[asyncio.Future[None]] = []

    def wait(self, timeout: float | None = None) -> bool:
        """True once answered with success; False when it failed or ``timeout`` seconds passed first."""
        return self._link.wait_for(self, timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """``wait()`` for coroutines: the worker's event loop reads the confirmation meanwhile."""
        if self._done.is_set() or self._link.closed:  # closed: as wait(), False
            return self._done.is_set() and self.error == 0
        if not self._link.loop_thread:  # no event loop reads the channel
            return await asyncio.to_thread(self.wait, timeout)
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._done.is_set():  # resolved by another thread just now
            future.set_result(None)
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.remove(future)
        return self._done.is_set() and self.error == 0

    def __await__(self) -> Generator[Any, None, bool]:
        return self.wait_async().__await__()

    def _resolve(self, error: int) -> None:
        self.error = PublishError(error)
        self._done.set()
        for future in self._waiters:
            loop = future.get_loop()
            if threading.get_ident() == self._link.loop_thread:
                _settle(future)
            else:
                loop.call_soon_threadsafe(_settle, future)


class PublishHandle(_Answer):
    """What ``Worker.publish`` returns: ``wait()`` tells whether the publish reached the broker.

    ``wait()`` is True once the message's bytes are in the kernel's socket to the broker (QoS 0; not
    merely in the agent's buffer) or the broker acknowledged it (QoS 1/2). In an async handler,
    ``await handle`` (or ``await handle.wait_async(timeout)``) gives the same answer without blocking
    the event loop. After a failure, ``error`` says why (a ``PublishError``).
    """

    def __init__(self, link: Link, request_id: int) -> None:
        super().__init__(link)
        self.request_id = request_id
        self._waiter: _ReplyWaiter | None = None  # a request's publish: the wait for its reply

    def reply_waiter(self) -> _ReplyWaiter:
        """The request this handle published (``Worker.request`` through ``on_publish`` middleware)."""
        if self._waiter is None:
            raise RuntimeError("request: an on_publish middleware returned the handle of another publish")
        return self._waiter


class _ReplyWaiter(_Answer):
    """One ``Worker.request`` in flight: answered by the reply with its correlation data, or failed
    early when its publish fails or the agent goes away."""

    def __init__(self, link: Link, correlation: bytes) -> None:
        super().__init__(link)
        self.correlation = correlation
        self.reply: Message | None = None
        self.handle: PublishHandle | None = None  # its request's publish; set by the link

    def _answer(self, reply: Message) -> None:
        self.reply = reply
        self._resolve(0)

    def result(self, topic: str, timeout: float) -> Message:
        """The reply, once the wait is over; raises ``TimeoutError`` or ``RequestFailed``."""
        self._link.forget(self)
        if self.reply is not None:
            return self.reply
        if self.error is None:
            raise TimeoutError(f"request to {topic!r}: no reply within {timeout:g}s")
        raise RequestFailed(f"request to {topic!r} failed: {self.error.description}")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
