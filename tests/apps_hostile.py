"""Apps for tests/test_subscriptions.py: a worker that sends the agent what Worker.subscribe refuses."""

from __future__ import annotations

from apps import Recorder

from procmqtt import Message
from procmqtt.ipc import channel


class RawSubscriber(Recorder):
    """'ctl/raw-subscribe': the payload as a Subscribe record, past Worker.subscribe's checks, as an
    older procmqtt worker or a bug would send it."""

    def on_message(self, message: Message) -> None:
        if message.topic == "ctl/raw-subscribe":
            self.record("received", message)
            self._require_link().send(channel.Subscribe(message.text, 1))
            self.record("done", message)
            return
        super().on_message(message)
