"""Apps for tests/test_publish_limits.py: workers that publish more than the broker takes, or what
the agent cannot send. Each logs one line with what happened, for the test to read."""

from __future__ import annotations

import os
import time

from procmqtt import Message, PublishBufferFull, Worker

if os.environ.get("TEST_PAHO_WINDOW"):  # imported before the fork: the agent's outbox uses it
    from procmqtt.agent import outbox

    outbox.PAHO_WINDOW = int(os.environ["TEST_PAHO_WINDOW"])


class Publishers(Worker):
    """``flood/<n>``: n QoS 1 publishes to ``out/<worker>``, payloads 0..n-1, all awaited at the end.
    ``qos0/<size>``: QoS 0 publishes of ``size`` bytes in a loop until the publish buffer is full.
    ``wildcard``: a publish the agent cannot send (a topic with a wildcard, past the worker's own
    check), then an ordinary one."""

    def on_message(self, message: Message) -> None:
        kind, _, arg = message.topic.partition("/")
        self.log.info("handling %s", message.topic)
        time.sleep(float(self.config.app.get("delay", 0)))  # the test stops the broker meanwhile
        getattr(self, kind)(arg)

    def flood(self, arg: str) -> None:
        count = int(arg)
        handles = [self.publish(f"out/{self.worker_id}", str(i), qos=1) for i in range(count)]
        self.log.info("flood: published %d", count)
        confirmed = sum(h.wait(60) for h in handles)
        self.log.info("flood: %d of %d confirmed", confirmed, count)

    def qos0(self, arg: str) -> None:
        size, handles = int(arg), []
        try:
            for _ in range(int(self.config.app.get("most", 1000))):
                handles.append(self.publish("q0/out", b"x" * size, qos=0))
        except PublishBufferFull:
            confirmed = sum(h.wait(0) for h in handles)
            self.log.info("qos0: buffer full after %d publishes, %d confirmed", len(handles), confirmed)
            return
        self.log.info("qos0: all %d published, %d confirmed", len(handles), sum(h.wait(0) for h in handles))

    def wildcard(self, arg: str) -> None:
        bad = self._link.publish("bad/+/topic", b"x", 1, False)  # Worker.publish would refuse it
        self.log.info("wildcard: confirmed %s, error %s", bad.wait(10), bad.error)
        good = self.publish("ok/after", b"fine", qos=1)
        self.log.info("wildcard: then an ordinary publish confirmed %s", good.wait(10))
