"""What a worker itself costs per message on a no-op drain (issue 16), without broker or agent.

    python3 benchmarks/worker_cost.py                  # µs (elapsed, CPU) per message, sync loop
    python3 benchmarks/worker_cost.py --async          # the same through the asyncio loop
    python3 benchmarks/worker_cost.py --callgrind      # instructions per message, under valgrind
    PYTHONPATH=/path/to/other/tree python3 benchmarks/worker_cost.py   # another tree's worker

Drives the real serve loop (``SyncLoop``, or ``AsyncLoop`` with ``--async``) of a no-op app in this
process, over a socketpair pre-filled with ``--messages`` Deliver records (``--batch`` per
datagram, as the agent sends them; 32-byte payloads, MQTT 3.1.1) and a Stop; the Ready and the
Dones it sends stay queued on the other end and are counted afterwards. So it measures the
worker's per-message path (read, decode, the hang watch, the handler call, the Done, its
batching and ``sendmsg``), but not its wake-ups: the whole backlog is there from the start.

A figure per message is the difference between a run of ``--messages`` and a run of none,
divided by ``--messages``: start-up (imports, boot, ``Ready``) cancels out. ``--callgrind`` runs
both under ``valgrind --tool=callgrind`` (instructions do not depend on the machine's load; about
a minute) with ``PYTHONHASHSEED=0``. The buffers of a socketpair hold about 14,000 such
deliveries, so ``--messages`` stays at or below 10,000; the async loop may send a datagram per
Done (``[workers] concurrency`` 1), so it runs 1,000 unless told.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable

from procmqtt import Message, Worker
from procmqtt.config.loader import from_mapping
from procmqtt.ipc import channel
from procmqtt.ipc.shared import SharedState
from procmqtt.worker.aio import AsyncLoop
from procmqtt.worker.sync import SyncLoop

MAX_MESSAGES = 10_000


class Noop(Worker):
    def on_message(self, message: Message) -> None:
        pass


class AsyncNoop(Worker):
    async def on_message(self, message: Message) -> None:
        pass


def one_run(messages: int, batch: int, use_async: bool, qos: int) -> tuple[float, float]:
    """Seconds, elapsed and of CPU (user and system: the kernel's side of each ``sendmsg`` and
    ``recvmsg``, which callgrind does not see), of one worker's life over ``messages`` deliveries.

    The deliveries are encoded and the Dones counted in forked children, so that under callgrind
    (which counts each process apart) this process's count is the worker's alone.
    """
    agent_end, inbound = channel.pair()
    upstream, agent_up = channel.pair()
    in_child(lambda: _fill(agent_end, messages, batch, qos))
    config = from_mapping({"workers": {"count": 1}}, "worker_cost")
    kind = AsyncLoop if use_async else SyncLoop
    loop = kind(AsyncNoop if use_async else Noop, 0, 1, config, inbound, upstream, SharedState(1))
    start, cpu = time.perf_counter(), time.process_time()
    code = loop.run()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    loop.signals.close()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    done = in_child(lambda: _count_dones(agent_up))
    if code != 0 or done != messages:
        sys.exit(f"the worker exited {code} after {done} Done(s) for {messages} deliveries")
    for s in (agent_end, inbound, upstream, agent_up):
        s.close()
    return elapsed, cpu


def in_child(func: Callable[[], int]) -> int:
    """``func()`` run in a forked child; what it returns (a count) comes back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, str(func()).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return int(answer)


def _fill(sock: socket.socket, messages: int, batch: int, qos: int) -> int:
    payload = b"x" * 32
    queue: deque[channel.Encoded] = deque()
    for i in range(1, messages + 1):
        queue.append(channel.encode_parts(channel.Deliver(i, "bench/w1", payload, qos, False, False)))
        if len(queue) == batch or i == messages:
            channel.send_many(sock, queue, block=False) or sys.exit("the inbound socketpair is full")
    channel.send(sock, channel.Stop(), block=False) or sys.exit("the inbound socketpair is full")
    return messages


def _count_dones(sock: socket.socket) -> int:
    sock.setblocking(False)
    done = 0
    while True:
        try:
            records = channel.receive(sock)
        except BlockingIOError:
            return done
        done += sum(isinstance(r, channel.Done) for r in records or ())


def callgrind(args: argparse.Namespace) -> None:
    """Instructions per message: a run of ``--messages`` and one of none, each under callgrind."""
    counts = []
    for messages in (0, args.messages):
        with tempfile.TemporaryDirectory() as tmp:
            command = [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out.%p",
                sys.executable,
                __file__,
                "--once",
                f"--messages={messages}",
                f"--batch={args.batch}",
                f"--qos={args.qos}",
                *(["--async"] if args.use_async else []),
            ]
            env = {**os.environ, "PYTHONHASHSEED": "0"}
            proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
            _, stderr = proc.communicate()
            found = re.search(rf"^=={proc.pid}== Collected : (\d+)", stderr, re.MULTILINE)  # not its children's
            if proc.returncode != 0 or found is None:
                sys.exit(f"valgrind failed or gave no instruction count:\n{stderr}")
            counts.append(int(found.group(1)))
    per = (counts[1] - counts[0]) / args.messages
    kind = "async" if args.use_async else "sync"
    print(f"{kind} loop: {per:,.0f} instructions per message (callgrind, {args.messages} messages, batch {args.batch})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, help="deliveries per run (at most 10,000; default 10,000, async 1,000)")
    parser.add_argument("--batch", type=int, default=16, help="deliveries per datagram")
    parser.add_argument("--qos", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--runs", type=int, default=7, help="runs of each size; the best counts")
    parser.add_argument("--async", dest="use_async", action="store_true", help="the asyncio loop")
    parser.add_argument("--callgrind", action="store_true", help="instructions per message under valgrind")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)  # one run (callgrind's child)
    args = parser.parse_args()
    if args.messages is None:
        args.messages = 1_000 if args.use_async else MAX_MESSAGES
    if not 0 < args.messages <= MAX_MESSAGES and not args.once:
        parser.error(f"--messages must be 1 to {MAX_MESSAGES}")
    if args.callgrind:
        callgrind(args)
        return
    if args.once:
        one_run(args.messages, args.batch, args.use_async, args.qos)
        return
    empty = [one_run(0, args.batch, args.use_async, args.qos) for _ in range(args.runs)]
    full = [one_run(args.messages, args.batch, args.use_async, args.qos) for _ in range(args.runs)]
    per, per_cpu = ((min(f[i] for f in full) - min(e[i] for e in empty)) / args.messages * 1e6 for i in (0, 1))
    print(
        f"{'async' if args.use_async else 'sync'} loop: {per:.2f} µs per message, {per_cpu:.2f} µs of CPU "
        f"(best of {args.runs} runs of {args.messages}, batch {args.batch}; load {os.getloadavg()[0]:.2f})"
    )


if __name__ == "__main__":
    main()
