"""Apps for the MQTT 5 integration tests: properties in and out, request and reply."""

from __future__ import annotations

import time
from typing import Any

from apps import Recording

from procmqtt import Message, Properties


def props_json(p: Properties | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "user_properties": [list(pair) for pair in p.user_properties],
        "content_type": p.content_type,
        "response_topic": p.response_topic,
        "correlation_data": None if p.correlation_data is None else p.correlation_data.hex(),
        "message_expiry": p.message_expiry,
        "payload_format_indicator": p.payload_format_indicator,
    }


class Props(Recording):
    """Records each message with its properties; 'echo5/<x>' is published again with properties;
    'ask/<x>' asks [app] service and records the reply; 'service/<x>' is answered with self.reply."""

    def on_message(self, message: Message) -> None:
        self.record("received", message, properties=props_json(message.properties))
        if message.topic.startswith("echo5/"):
            handle = self.publish(
                "echoed5/" + message.topic[6:],
                message.payload,
                qos=1,
                properties=Properties(user_properties=(("from", "procmqtt"), ("worker", "w"))),
                content_type="application/json",
                correlation_data=b"\x00\x01corr",
                response_topic="answers/here",
                message_expiry=600,
                payload_format_indicator=1,
            )
            if not handle.wait(10):
                raise RuntimeError("the echo was not confirmed")
        elif message.topic.startswith("ask/"):
            self.ask(message)
        elif message.topic.startswith("service/"):
            delay = float(self.config.app.get("service_delay", 0))
            if delay:
                time.sleep(delay)
            self.reply(
                message,
                {"answer": message.text, "by": self.worker_id},
                content_type="application/json",
                user_properties=[("answered-by", str(self.worker_id))],
            ).wait(10)
        self.record("done", message)

    def ask(self, message: Message) -> None:
        timeout = float(self.config.app.get("request_timeout", 10))
        began = time.monotonic()
        try:
            reply = self.request(self.config.app.get("service", "service/echo"), message.payload, timeout=timeout)
        except TimeoutError as exc:
            self.record("timeout", message, error=str(exc), elapsed=time.monotonic() - began)
            return
        self.record(
            "reply", message, reply_topic=reply.topic, reply=reply.json(), properties=props_json(reply.properties)
        )


class AsyncAsker(Props):
    """Props with an async on_message: requests are awaited with request_async, several at once."""

    async def on_message(self, message: Message) -> None:  # type: ignore[override]
        self.record("received", message)
        timeout = float(self.config.app.get("request_timeout", 10))
        began = time.monotonic()
        try:
            reply = await self.request_async(
                self.config.app.get("service", "service/echo"), message.payload, timeout=timeout
            )
        except TimeoutError as exc:
            self.record("timeout", message, error=str(exc), elapsed=time.monotonic() - began)
        else:
            self.record(
                "reply", message, reply_topic=reply.topic, reply=reply.json(), properties=props_json(reply.properties)
            )
        self.record("done", message)
