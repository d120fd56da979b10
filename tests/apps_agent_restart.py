"""Apps for tests/test_agent_restart.py: a handler that waits, with no timeout, for a publish the
agent takes while the broker is down, across an agent SIGKILL. Each step is one JSON line in
<record_dir>/steps.jsonl."""

from __future__ import annotations

import asyncio
import json
import os
import time

from procmqtt import Message, Worker


class _Steps(Worker):
    def on_start(self) -> None:
        self.dir = self.config.app["record_dir"]
        self.fd = os.open(os.path.join(self.dir, "steps.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def step(self, name: str, **extra: object) -> None:
        os.write(self.fd, (json.dumps({"step": name, "time": time.monotonic(), **extra}) + "\n").encode())

    def broker_down(self) -> bool:
        """The test creates this file once the agent has seen the broker go."""
        return os.path.exists(os.path.join(self.dir, "broker-down"))


class WaitsAcrossAgentRestart(_Steps):
    """On any message: once the broker is down, publish at QoS 1 and ``wait()`` with no timeout;
    then publish again (to the new agent) and wait for that one too."""

    def on_message(self, message: Message) -> None:
        self.step("received")
        while not self.broker_down():
            time.sleep(0.01)
        lost = self.publish("out/lost", b"1", qos=1)
        # Answered at once (QoS 0 without a connection fails): the agent has read the publish above.
        self.step("taken", probe=self.publish("out/probe", b"", qos=0).wait(10))
        self.step("first", ok=lost.wait(), error=lost.error)
        later = self.publish("out/later", b"2", qos=1)
        self.step("second", ok=later.wait(), error=later.error)


class AwaitsAcrossAgentRestart(_Steps):
    """``WaitsAcrossAgentRestart`` with ``await`` on the worker's event loop."""

    async def on_message(self, message: Message) -> None:
        self.step("received")
        while not self.broker_down():
            await asyncio.sleep(0.01)
        lost = self.publish("out/lost", b"1", qos=1)
        self.step("taken", probe=await self.publish("out/probe", b"", qos=0).wait_async(10))
        self.step("first", ok=await lost, error=lost.error)
        later = self.publish("out/later", b"2", qos=1)
        self.step("second", ok=await later, error=later.error)
