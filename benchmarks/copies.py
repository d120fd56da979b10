"""What one large Deliver costs on its way through a channel, step by step (issue 16).

    python3 benchmarks/copies.py                 # 64 KiB, 1 MiB, 4 MiB payloads
    python3 benchmarks/copies.py --pipe 20000 --sizes 65536   # CPU per role, two processes
    PYTHONPATH=/path/to/other/tree python3 benchmarks/copies.py   # the same steps in another tree

Times, in one process and one thread, the steps the agent and a worker run per message: the
payload copied out of the broker socket's read buffer, the record encoded and sent
(``encode_parts`` + ``send_many`` where they exist, else ``encode`` + ``send_many``), and the
worker's ``receive`` (the kernel's copy out and the payload's copy into its own ``bytes``). The
ring step (where ``procmqtt.ipc.ring`` exists) is the same message through the worker's shared-memory
ring: the payload copied into the ring, a ``DeliverAt`` sent and received, the payload copied out. The
first step is one plain copy of the payload (``bytes`` of a ``memoryview``): the yardstick. Median of many rounds,
microseconds and page faults per message; CPU-bound and single-threaded, so it is steadier than an end-to-end run
on a shared host, but still read it as ratios within one run.

``--pipe N`` measures instead the CPU of each role over N messages between two processes: the agent's
side (``WorkerChannels``: ``deliver`` where it exists, else ``write``; ``flush``; each ``Done`` read
back, ``done``) in this process, a worker's side (``receive``, the payload out of the ring or the
record, a ``Done`` back) in a child, with a window of 16 messages as the default prefetch. The
payload is copied out of a read buffer per message, as the agent does. CPU from ``os.times`` (10 ms
ticks), start-up excluded.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from procmqtt.ipc import channel


def timed(step: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median microseconds of ``step`` over ``rounds`` batches of 8 calls, and the page faults
    per call (a fresh large buffer faults in page by page)."""
    samples = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(8):
            step()
        samples.append((time.perf_counter() - start) / 8 * 1e6)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return statistics.median(samples), faults / rounds / 8


def measure(size: int, rounds: int) -> dict[str, tuple[float, float]]:
    payload = os.urandom(size)
    buffer = bytearray(size + 64)
    buffer[32 : 32 + size] = payload
    view = memoryview(buffer)
    record = channel.Deliver(1, "bench/x", payload, 1, False, False)
    encode = getattr(channel, "encode_parts", channel.encode)
    a, b = channel.pair()
    a.setblocking(False)

    def send_and_receive() -> None:
        channel.send_many(a, deque([encode(record)]))
        channel.receive(b)

    encoded = channel.encode(record)
    channel.send_many(a, deque([encoded]))
    try:
        steps = {
            "agent: payload out of the read buffer (memcpy)": timed(lambda: bytes(view[32 : 32 + size]), rounds),
            "agent: encode": timed(lambda: encode(record), rounds),
            "agent + worker: encode, send_many, receive": timed(send_and_receive, rounds),
        }
        try:
            from procmqtt.ipc import ring  # absent in trees before the ring
        except ImportError:
            return steps
        if size <= getattr(ring, "RING_MAX", getattr(ring, "RING_SIZE", 0)):  # RING_SIZE before rings were sized
            steps["agent + worker: through the ring"] = timed(_through_ring(ring, payload), rounds)
        return steps
    finally:
        channel.receive(b)
        a.close()
        b.close()


def _through_ring(ring: Any, payload: bytes) -> Callable[[], object]:
    """One message through a ring: copied in, named by a ``DeliverAt``, received, copied out; each
    range freed at once, as a ``Done`` would (so consecutive messages use consecutive ranges)."""
    a, b = channel.pair()  # closed when the process ends
    writer = ring.Ring(ring.ring_size(len(payload), 16)) if hasattr(ring, "ring_size") else ring.Ring()
    channel.send(a, channel.RingFile(writer.fd))
    writer.sent()
    (attach,) = channel.receive(b) or []
    reader = ring.RingReader(attach.fd)

    def step() -> None:
        offset = writer.put(1, payload)
        channel.send_many(
            a, deque([channel.encode_parts(channel.DeliverAt(1, "bench/x", offset, len(payload), 1, False, False))])
        )
        (at,) = channel.receive(b) or []
        reader.read(at.offset, at.length)
        writer.free(1)

    return step


def pipe(size: int, count: int, window: int = 16) -> tuple[float, float, float]:
    """Agent and worker CPU microseconds per message, and messages per second (``--pipe``)."""
    from procmqtt.agent.workers import WorkerChannels
    from procmqtt.message import Outcome

    down_agent, down_worker = channel.pair()
    up_agent, up_worker = channel.pair()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        start = os.times()
        ring = None
        seen = 0
        while seen < count:
            dones: deque[channel.Encoded] = deque()
            for record in channel.receive(down_worker) or []:
                if type(record).__name__ == "RingFile":
                    from procmqtt.ipc.ring import RingReader

                    ring = RingReader(record.fd)  # type: ignore[union-attr]
                    continue
                if type(record).__name__ == "DeliverAt":
                    assert ring is not None
                    ring.read(record.offset, record.length)  # type: ignore[union-attr]
                dones.append(channel.encode_parts(channel.Done(record.delivery_id, Outcome.OK)))  # type: ignore[union-attr]
                seen += 1
            channel.send_many(up_worker, dones)
        end = os.times()
        os.write(report_w, str((end.user + end.system - start.user - start.system) / count * 1e6).encode())
        os._exit(0)
    buffer = bytearray(size + 64)
    buffer[32 : 32 + size] = os.urandom(size)
    view = memoryview(buffer)
    up_agent.setblocking(False)
    try:
        channels = WorkerChannels({0: (1, down_agent)}, window)  # sized rings: the window is the prefetch
    except TypeError:  # trees before rings were sized
        channels = WorkerChannels({0: (1, down_agent)})  # type: ignore[call-arg]
    worker = channels.by_slot[0]
    deliver = getattr(channels, "deliver", channels.write)
    sent = done = 0
    start, began = os.times(), time.perf_counter()
    while done < count:
        while sent < count and sent - done < window:
            deliver(worker, channel.Deliver(sent, "bench/x", bytes(view[32 : 32 + size]), 1, False, False))
            sent += 1
        channels.flush([worker])
        select.select([up_agent], [], [])
        try:
            while True:
                for record in channel.receive(up_agent) or []:
                    if hasattr(channels, "done"):
                        channels.done(record.delivery_id, 0)  # type: ignore[union-attr]
                    done += 1
        except BlockingIOError:
            pass
    end, elapsed = os.times(), time.perf_counter() - began
    os.waitpid(pid, 0)
    worker_us = float(os.read(report_r, 100))
    return (end.user + end.system - start.user - start.system) / count * 1e6, worker_us, count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="65536,1048576,4194304")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--pipe", type=int, default=0, help="messages: CPU per role between two processes")
    args = parser.parse_args()
    print(f"procmqtt from {os.path.dirname(channel.__file__)}")
    if args.pipe:
        for size in map(int, args.sizes.split(",")):
            agent_us, worker_us, rate = pipe(size, args.pipe)
            print(
                f"{size:>9} B  CPU per message: agent {agent_us:6.1f} us, worker {worker_us:6.1f} us; {rate:,.0f} msg/s"
            )
        return
    for size in map(int, args.sizes.split(",")):
        for step, (us, faults) in measure(size, max(10, args.rounds * 65536 // max(size, 65536))).items():
            print(f"{size:>9} B  {step:48} {us:9.1f} us {faults:8.0f} page faults")


if __name__ == "__main__":
    main()
