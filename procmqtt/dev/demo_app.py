"""The app ``procmqtt demo`` runs: sensor readings in, a little CPU on each, an alert now and then.

Shipped inside the package so ``procmqtt demo`` works from an installed wheel. Its topics:

- ``demo/sensors/<device>``: readings, JSON ``{"celsius": 21.5, "seq": 17}`` (in, QoS 1)
- ``demo/alerts/<device>``: a reading above ``[app] alert_above`` (out, QoS 1)
- ``demo/ping``: answered on ``demo/pong`` with the same payload. The demo uses it as "is the app
  subscribed yet?" and, at the end, as "has every reading before this one been handed to a worker?"
  (the agent dispatches in arrival order, and a graceful stop finishes what was handed out).
- ``demo/workers/<id>``: what the worker handled, published when it stops (out, QoS 1)
"""

from __future__ import annotations

import time

from procmqtt.message import Message
from procmqtt.worker.base import Worker
from procmqtt.worker.middleware import SlowLog

PING, PONG = "demo/ping", "demo/pong"
REPORT_TIMEOUT = 5.0


def burn(seconds: float) -> None:
    """Keep one core busy for ``seconds``: a stand-in for parsing, validation or a small model."""
    deadline = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < deadline:
        x = (x * 31 + 7) % 1_000_003


class DemoSensors(Worker):
    middleware = (SlowLog(1.0),)  # a reading that takes a second names itself in the log

    def on_start(self) -> None:
        self.alert_above = float(self.config.app.get("alert_above", 30.0))
        self.work = float(self.config.app.get("work_ms", 1.0)) / 1000
        self.averages: dict[str, float] = {}
        self.readings = 0
        self.alerts = 0

    def on_message(self, message: Message) -> None:
        if message.topic == PING:
            self.publish(PONG, message.payload, qos=1)
            return
        device = message.topic.rsplit("/", 1)[-1]
        celsius = float(message.json()["celsius"])
        burn(self.work)
        average = 0.9 * self.averages.get(device, celsius) + 0.1 * celsius
        self.averages[device] = average
        self.readings += 1
        if celsius > self.alert_above:
            self.alerts += 1
            self.publish(
                f"demo/alerts/{device}", {"device": device, "celsius": celsius, "average": round(average, 2)}, qos=1
            )

    def on_stop(self) -> None:
        report = {"worker": self.worker_id, "readings": self.readings, "alerts": self.alerts}
        self.publish(f"demo/workers/{self.worker_id}", report, qos=1).wait(REPORT_TIMEOUT)
