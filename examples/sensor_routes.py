"""Topic routes with JSON payloads: one method per kind of reading, the device taken from the topic.

    procmqtt run examples/sensor_routes.py:SensorRoutes -c examples/sensor_routes.toml --broker embedded
    mosquitto_pub -p PORT -t sensors/d1/temperature -m '{"celsius": 31.5}'
    mosquitto_pub -p PORT -t sensors/d1/humidity -m '{"percent": 97}'
    mosquitto_sub -p PORT -t 'alerts/#' -v

(PORT is the one procmqtt logs: "embedded broker: mosquitto (pid ...) on 127.0.0.1:PORT".) Routes are
subscribed automatically; ``{device}`` matches one topic level and arrives as the ``device`` argument.
A message goes to the most specific matching route, so ``sensors/#`` only gets what the others do not.
"""

from __future__ import annotations

from typing import Any

from procmqtt import Message, Worker, route


class SensorRoutes(Worker):
    def on_start(self) -> None:
        self.max_celsius = float(self.config.app.get("max_celsius", 30.0))
        self.max_humidity = float(self.config.app.get("max_humidity", 90.0))

    @route("sensors/{device}/temperature", qos=1)
    def temperature(self, message: Message, device: str) -> None:
        celsius = self.number(message, "celsius")
        if celsius is not None and celsius > self.max_celsius:
            self.publish(f"alerts/{device}/temperature", {"device": device, "celsius": celsius}, qos=1)

    @route("sensors/{device}/humidity", qos=1)
    def humidity(self, message: Message, device: str) -> None:
        percent = self.number(message, "percent")
        if percent is not None and percent > self.max_humidity:
            self.publish(f"alerts/{device}/humidity", {"device": device, "percent": percent}, qos=1)

    @route("sensors/#")
    def other(self, message: Message) -> None:
        self.log.debug("no handler for %s", message.topic)

    def number(self, message: Message, key: str) -> float | None:
        """``payload[key]`` as a float; a malformed reading is logged and skipped, not retried."""
        try:
            data: Any = message.json()
            return float(data[key])
        except (ValueError, KeyError, TypeError):
            self.log.warning("%s: expected JSON like {%r: 21.5}, got %r", message.topic, key, message.payload[:100])
            return None
