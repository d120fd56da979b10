"""A runnable example: average temperatures per device, publish an alert when it is too hot.

procmqtt run examples/sensors.py:Sensors -c examples/sensors.toml -w 4
mosquitto_pub -t sensors/d1/temperature -m '{"celsius": 31.5}'
mosquitto_sub -t 'alerts/#' -v
"""

from procmqtt import Message, Worker


class Sensors(Worker):
    def on_start(self) -> None:
        self.limit = float(self.config.app.get("alert_above", 30.0))
        self.seen = 0

    def on_message(self, message: Message) -> None:
        device = message.topic.split("/")[1]
        celsius = float(message.json()["celsius"])
        self.seen += 1
        self.log.info("worker %d: %s is at %.1f C", self.worker_id, device, celsius)
        if celsius > self.limit:
            self.publish(f"alerts/{device}", {"device": device, "celsius": celsius}, qos=1)

    def on_stop(self) -> None:
        self.log.info("worker %d handled %d reading(s)", self.worker_id, self.seen)
