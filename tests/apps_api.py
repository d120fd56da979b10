"""Apps for tests/test_worker_api.py: user methods named like framework internals, and handlers that
return an Outcome."""

from __future__ import annotations

from procmqtt import Message, Outcome, Worker


class Helpers(Worker):
    """Its own ``handle`` is an ordinary helper; ``fail/...`` returns ``Outcome.FAILED``."""

    def handle(self, text: str) -> str:
        return text.upper()

    def handle_async(self, text: str) -> str:
        return text[::-1]

    def on_message(self, message: Message) -> Outcome | None:
        if message.topic.startswith("fail/"):
            return Outcome.FAILED
        out = f"{self.handle(message.text)} {self.handle_async(message.text)}"
        if not self.publish("out/" + message.topic, out, qos=1).wait(10):
            raise RuntimeError("the publish was not confirmed")
        return None
