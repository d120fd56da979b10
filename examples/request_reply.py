"""Request/reply with MQTT 3.1.1: the request carries its reply topic and a correlation id.

MQTT 5 has properties for both (Response Topic, Correlation Data): with ``protocol = "5"`` use
``self.request(...)`` to ask and ``self.reply(message, ...)`` to answer (docs/mqtt5.md). With
MQTT 3.1.1, as here, they travel in the JSON payload:

    request on rpc/<method>:  {"reply_to": "replies/me", "correlation_id": "42", "args": {...}}
    reply on <reply_to>:      {"correlation_id": "42", "result": ...}   or   {..., "error": "..."}

    procmqtt run examples/request_reply.py:Calculator --broker embedded -w 2
    mosquitto_sub -p PORT -t 'replies/me' -v &
    mosquitto_pub -p PORT -t rpc/sum \
        -m '{"reply_to": "replies/me", "correlation_id": "42", "args": {"numbers": [1, 2, 3.5]}}'

The caller subscribes to its own reply topic before it sends, and matches replies by correlation id.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from procmqtt import Message, Worker, route

METHODS: dict[str, Callable[..., Any]] = {
    "sum": lambda numbers: math.fsum(numbers),
    "mean": lambda numbers: statistics.fmean(numbers),
    "sqrt": lambda x: math.sqrt(x),
}


class Calculator(Worker):
    @route("rpc/{method}", qos=1)
    def call(self, message: Message, method: str) -> None:
        try:
            request = message.json()
            reply_to, correlation_id = request["reply_to"], request.get("correlation_id")
        except (ValueError, KeyError, TypeError):
            self.log.warning("%s: no reply_to in the request, nobody to answer", message.topic)
            return
        if not isinstance(reply_to, str) or not reply_to or "+" in reply_to or "#" in reply_to:
            self.log.warning("%s: reply_to must be a topic name, got %r", message.topic, reply_to)
            return
        reply: dict[str, Any] = {"correlation_id": correlation_id}
        if method not in METHODS:
            reply["error"] = f"unknown method {method!r}; try one of {', '.join(METHODS)}"
        else:
            try:
                reply["result"] = METHODS[method](**request.get("args", {}))
            except (TypeError, ValueError) as exc:  # wrong arguments: the caller's mistake, tell it
                reply["error"] = f"{method}: {exc}"
        self.publish(reply_to, reply, qos=1)
