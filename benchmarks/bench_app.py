"""The procmqtt peer: the same handler as the others, in a Worker."""

from common import handle

from procmqtt import Message, Worker


class Bench(Worker):
    def on_message(self, message: Message) -> None:
        handle(message.payload, lambda topic, payload: self.publish(topic, payload, qos=1))
