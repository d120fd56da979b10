"""The baselines, as separate processes: python peers.py raw|pool|share HOST PORT CLIENT_ID FILTER QOS [N].

A  raw:   one paho client, handler in on_message, loop_forever() in the main thread.
B  pool:  one paho client, multiprocessing.Pool(N).apply_async per message.
C  share: N independent paho processes on $share/bench/<filter>.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

import paho.mqtt.client as mqtt
from common import handle
from paho.mqtt.enums import CallbackAPIVersion


def client(client_id: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    c.max_inflight_messages_set(1000)
    return c


def run_raw(host: str, port: int, client_id: str, topic_filter: str, qos: int) -> None:
    c = client(client_id)

    def reply(topic: str, payload: bytes) -> None:
        c.publish(topic, payload, qos=1)

    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic_filter, qos)
    c.on_subscribe = lambda *a: print("READY", flush=True)
    c.on_message = lambda cl, u, m: handle(m.payload, reply)
    c.connect(host, port)
    c.loop_forever()


def _pool_task(payload: bytes) -> None:
    handle(payload)


def run_pool(host: str, port: int, client_id: str, topic_filter: str, qos: int, n: int) -> None:
    pool = multiprocessing.get_context("fork").Pool(n)
    c = client(client_id)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic_filter, qos)
    c.on_subscribe = lambda *a: print("READY", flush=True)
    c.on_message = lambda cl, u, m: pool.apply_async(_pool_task, (m.payload,))
    c.connect(host, port)
    c.loop_forever()


def run_share(host: str, port: int, client_id: str, topic_filter: str, qos: int, n: int) -> None:
    children = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                run_raw(host, port, f"{client_id}-{i}", f"$share/bench/{topic_filter}", qos)
            finally:
                os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *a: [os.kill(p, signal.SIGTERM) for p in children] and sys.exit(0))
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    kind, host, port, client_id, topic_filter, qos = sys.argv[1:7]
    args = (host, int(port), client_id, topic_filter, int(qos))
    if kind == "raw":
        run_raw(*args)
    elif kind == "pool":
        run_pool(*args, int(sys.argv[7]))
    else:
        run_share(*args, int(sys.argv[7]))
