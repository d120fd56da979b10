"""A CPU-heavy transform: every job costs real CPU, so more worker processes finish a batch sooner.

    jobs/<id>         {"text": "...", "rounds": 20000}   (rounds optional: [app] rounds)
    transformed/<id>  {"id": "<id>", "digest": "<hex>", "worker": 2}

    procmqtt run examples/transform.py:Transform -c examples/transform.toml --broker embedded -w 4
    mosquitto_pub -p PORT -t jobs/1 -m '{"text": "hello"}'
    mosquitto_sub -p PORT -t 'transformed/#' -v

``bash examples/speedup.sh`` times a batch with -w 1 and with -w 4 (docs/guide/examples.md).
"""

from __future__ import annotations

import hashlib

from procmqtt import Message, Worker


def transform(text: str, rounds: int) -> str:
    """Pure CPU work (a stand-in for an image resize, a parser or a model): ``rounds`` chained hashes."""
    digest = text.encode("utf-8")
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


class Transform(Worker):
    def on_start(self) -> None:
        self.rounds = int(self.config.app.get("rounds", 20_000))

    def on_message(self, message: Message) -> None:
        job_id = message.topic.rsplit("/", 1)[-1]
        job = message.json()
        digest = transform(str(job["text"]), int(job.get("rounds", self.rounds)))
        self.publish(f"transformed/{job_id}", {"id": job_id, "digest": digest, "worker": self.worker_id}, qos=1)
