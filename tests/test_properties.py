"""MQTT 5 in process: the Properties value object, publish/request/reply checks, the worker's reply
routing over real channels (with this test playing the agent), and WorkerHarness support."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from procmqtt import Message, Outcome, Properties, RequestFailed, Worker, route
from procmqtt.config import from_mapping
from procmqtt.ipc import channel
from procmqtt.message import EMPTY
from procmqtt.testing import WorkerHarness
from procmqtt.worker.link import _AgentLink

pytestmark = pytest.mark.unit  # pure logic: no broker, no process

V5 = {"mqtt": {"protocol": "5"}}


# --- the value object ------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_properties_normalise_and_keep_user_property_order():
    p = Properties(user_properties=[["b", "1"], ("a", "2"), ("b", "3")], correlation_data="id-1")
    assert p.user_properties == (("b", "1"), ("a", "2"), ("b", "3"))
    assert p.correlation_data == b"id-1"
    assert p.user_property("b") == "1" and p.user_property("zz", "none") == "none"
    assert hash(p) == hash(Properties(user_properties=(("b", "1"), ("a", "2"), ("b", "3")), correlation_data=b"id-1"))
    assert Properties() == EMPTY


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "fields, error",
    [
        ({"user_properties": [("a", 1)]}, "user_properties must be (name, value) pairs of strings"),
        ({"user_properties": ["abc"]}, "user_properties must be (name, value) pairs of strings"),
        ({"content_type": b"json"}, "content_type must be a string"),
        ({"content_type": "x" * 70000}, "content_type must be at most 65535 bytes"),
        ({"response_topic": "replies/#"}, "response_topic: a topic to publish to must not contain wildcards"),
        ({"correlation_data": 42}, "correlation_data must be bytes or str"),
        ({"message_expiry": -1}, "message_expiry must be whole seconds from 0 to 4294967295"),
        ({"message_expiry": 1.5}, "message_expiry must be whole seconds"),
        ({"message_expiry": True}, "message_expiry must be whole seconds"),
        ({"payload_format_indicator": 2}, "payload_format_indicator must be 0 (bytes) or 1 (UTF-8)"),
    ],
)
def test_bad_properties_are_refused_with_one_clear_line(fields, error):
    with pytest.raises(ValueError) as info:
        Properties(**fields)
    assert error in str(info.value) and "\n" not in str(info.value)


# --- WorkerHarness: properties, request, reply -----------------------------------------------


class Service(Worker):
    @route("props/#")
    def show(self, message: Message) -> None:
        p = message.properties
        self.publish(
            "seen",
            {"type": p.content_type, "user": p.user_properties, "corr": p.correlation_data.hex()},
            qos=1,
            properties=Properties(content_type="application/json"),
            user_properties=[("k", "v")],
        )

    @route("svc/{name}")
    def answer(self, message: Message, name: str) -> None:
        self.reply(message, f"hello {name}", message_expiry=30)

    @route("ask/{name}")
    def ask(self, message: Message, name: str) -> None:
        reply = self.request(f"svc/{name}", message.payload, timeout=2)
        self.publish("answer", reply.payload)

    @route("plain")
    def plain(self, message: Message) -> None:
        self.publish("out", message.payload)


@pytest.mark.timeout(10)
def test_harness_delivers_properties_and_records_published_ones():
    with WorkerHarness(Service, config=V5) as h:
        props = Properties(user_properties=(("tenant", "acme"),), content_type="text/plain", correlation_data=b"\x01")
        assert h.deliver("props/x", b"hi", 1, properties=props) is Outcome.OK
        assert h.published == [("seen", b'{"type":"text/plain","user":[["tenant","acme"]],"corr":"01"}', 1, False)]
        (sent,) = h.published_messages
        assert sent.properties == Properties(user_properties=(("k", "v"),), content_type="application/json")
        h.deliver("plain", b"x")
        assert h.published_messages[-1].properties is None  # published without properties


@pytest.mark.timeout(10)
def test_harness_answers_requests_and_replies_go_to_the_response_topic():
    with WorkerHarness(Service, config=V5) as h:
        h.respond("svc/+", lambda request: request.text.upper())
        assert h.deliver("ask/bob", "question") is Outcome.OK
        request, answer = h.published_messages
        assert request.topic == "svc/bob" and request.qos == 1
        assert request.properties.response_topic == "procmqtt/reply/harness/0"
        assert len(request.properties.correlation_data) == 16 and request.properties.message_expiry == 2
        assert (answer.topic, answer.payload) == ("answer", b"QUESTION")
        asked = Properties(response_topic="replies/here", correlation_data=b"c-7")
        h.deliver("svc/alice", properties=asked)
        reply = h.published_messages[-1]
        assert (reply.topic, reply.payload, reply.qos) == ("replies/here", b"hello alice", 1)
        assert reply.properties == Properties(correlation_data=b"c-7", message_expiry=30)


@pytest.mark.timeout(10)
def test_harness_request_without_a_responder_times_out_at_once():
    with WorkerHarness(Service, config=V5) as h:
        began = time.monotonic()
        with pytest.raises(TimeoutError, match=r"request to 'svc/bob': no reply within 2s"):
            h.deliver("ask/bob")
        assert time.monotonic() - began < 1


class AsyncAsker(Worker):
    @route("ask")
    async def ask(self, message: Message) -> None:
        reply = await self.request_async("svc/x", message.payload, timeout=1)
        self.publish("answer", reply.payload)


@pytest.mark.timeout(10)
def test_harness_request_async():
    with WorkerHarness(AsyncAsker, config=V5) as h:
        h.respond("svc/#", "fixed answer")
        assert h.deliver("ask", b"q") is Outcome.OK
        assert h.published[-1] == ("answer", b"fixed answer", 0, False)


@pytest.mark.timeout(10)
def test_mqtt311_misuse_gives_clear_errors():
    with WorkerHarness(Service) as h:  # the default protocol, 3.1.1
        w = h.worker
        with pytest.raises(
            ValueError,
            match=r'publish: message properties need MQTT 5; set \[mqtt\] protocol = "5" '
            r"\(this app uses 3.1.1\)",
        ):
            w.publish("t", b"", content_type="text/plain")
        with pytest.raises(ValueError, match=r"request: request/reply needs MQTT 5"):
            w.request("svc/x", b"")
        with pytest.raises(ValueError, match=r"reply: the message on 'q' came over MQTT 3.1.1"):
            w.reply(Message("q", b""), b"")
        with pytest.raises(ValueError, match=r"deliver: properties need MQTT 5"):
            h.deliver("plain", properties=Properties(content_type="x"))
        assert h.deliver("plain") is Outcome.OK
        assert h.published_messages[-1].properties is None


@pytest.mark.timeout(10)
def test_v5_misuse_gives_clear_errors():
    with WorkerHarness(Service, config=V5) as h:
        w = h.worker
        with pytest.raises(ValueError, match=r"reply: the message on 'q' has no response topic"):
            w.reply(Message("q", b"", properties=EMPTY))
        with pytest.raises(ValueError, match=r"request: response_topic and correlation_data are set by request"):
            w.request("svc/x", correlation_data=b"mine")
        with pytest.raises(ValueError, match=r"request: timeout must be a number of seconds above 0"):
            w.request("svc/x", timeout=0)
        with pytest.raises(ValueError, match=r"publish: payload_format_indicator=1 declares a UTF-8 payload"):
            w.publish("t", b"\xff", payload_format_indicator=1)
        with pytest.raises(ValueError, match=r"publish: message_expiry must be whole seconds"):
            w.publish("t", message_expiry=-5)
        with pytest.raises(ValueError, match=r"publish: properties must be a procmqtt.Properties"):
            w.publish("t", properties={"content_type": "x"})
        with pytest.raises(ValueError, match=r"unexpected keyword argument 'colour'"):
            w.publish("t", colour="red")
        # no correlation: none sent
        assert h.deliver("svc/x", properties=Properties(response_topic="r/1")) is Outcome.OK
        assert h.published_messages[-1].properties == Properties(message_expiry=30)


# --- the worker's side of request/reply over real channels -----------------------------------


class _Agent:
    """Plays the agent for one worker: answers its requests as told, over real socket pairs."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.agent_up, worker_up = channel.pair()
        self.agent_in, worker_in = channel.pair()
        worker_in.setblocking(False)
        config = from_mapping(V5, "test")
        self.link = _AgentLink(0, 1, worker_in, worker_up, config)
        self.worker = Worker()
        self.worker._attach(0, config, self.link)
        self.seen: list[channel.Publish] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                records = channel.receive(self.agent_up)
            except OSError:
                return
            if not records:
                return
            for record in records:
                if isinstance(record, channel.Publish):
                    self.seen.append(record)
                    self.answer(self, record)

    def send(self, record: channel.Record) -> None:
        channel.send(self.agent_in, record)

    def close(self) -> None:
        self.agent_in.close()
        self.agent_up.close()


def _confirm_and_reply(agent: _Agent, record: channel.Publish, correlation: bytes | None = None) -> None:
    agent.send(channel.Published(record.request_id, 0))
    if record.request:
        corr = record.properties.correlation_data if correlation is None else correlation
        agent.send(
            channel.Reply("procmqtt/reply/c/0", b"re: " + record.payload, 1, False, Properties(correlation_data=corr))
        )


@pytest.mark.timeout(10)
def test_reply_reaches_the_request_with_its_correlation_data():
    agent = _Agent(_confirm_and_reply)
    try:
        reply = agent.worker.request("svc/x", b"q1", timeout=5)
        assert (reply.topic, reply.payload) == ("procmqtt/reply/c/0", b"re: q1")
        (sent,) = agent.seen
        assert sent.request and sent.properties.response_topic is None  # the agent fills it in
        assert sent.properties.message_expiry == 5 and sent.qos == 1
    finally:
        agent.close()


@pytest.mark.timeout(10)
def test_a_reply_with_other_correlation_data_is_not_taken():
    agent = _Agent(lambda a, r: _confirm_and_reply(a, r, correlation=b"someone else"))
    try:
        with pytest.raises(TimeoutError, match=r"request to 'svc/x': no reply within 0.3s"):
            agent.worker.request("svc/x", b"q", timeout=0.3)
        assert not agent.link._replies and not agent.link._request_of  # nothing left behind
        assert agent.link.next(0.05) is None  # and it never became a delivery
    finally:
        agent.close()


@pytest.mark.timeout(10)
def test_a_refused_request_fails_at_once_with_the_reason():
    agent = _Agent(lambda a, r: a.send(channel.Published(r.request_id, 135)))
    try:
        began = time.monotonic()
        with pytest.raises(RequestFailed, match=r"request to 'svc/x' failed: Not authorized \(reason code 135\)"):
            agent.worker.request("svc/x", b"q", timeout=5)
        assert time.monotonic() - began < 2
    finally:
        agent.close()


@pytest.mark.timeout(10)
def test_a_request_fails_when_the_agent_goes_away():
    agent = _Agent(lambda a, r: a.close())
    with pytest.raises(RequestFailed, match=r"the agent's side closed or restarted before an answer"):
        agent.worker.request("svc/x", b"q", timeout=5)


@pytest.mark.timeout(10)
def test_request_async_reads_the_reply_on_the_event_loop():
    agent = _Agent(_confirm_and_reply)

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        agent.link.loop_thread = threading.get_ident()
        loop.add_reader(agent.link.inbound, agent.link.read_available)
        replies = await asyncio.gather(
            *(agent.worker.request_async("svc/x", f"q{i}".encode(), timeout=5) for i in range(5))
        )
        loop.remove_reader(agent.link.inbound)
        return [r.payload for r in replies]

    try:
        assert asyncio.run(main()) == [f"re: q{i}".encode() for i in range(5)]
    finally:
        agent.close()
