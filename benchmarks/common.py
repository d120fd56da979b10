"""What every benchmark peer shares: the handler workloads and how they report progress.

Every peer process records into its own small shared file, so the orchestrator counts handled
messages the same way for every peer without adding traffic to the broker.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

_STATS = struct.Struct("=qdd")  # handled, first handled (monotonic), last handled (monotonic)


class Progress:
    """One per process, created lazily in the process that handles messages."""

    def __init__(self, directory: str) -> None:
        fd = os.open(os.path.join(directory, f"{os.getpid()}.count"), os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, _STATS.size)
        self.mem = mmap.mmap(fd, _STATS.size)
        os.close(fd)
        self.count = 0
        self.first = 0.0
        self.lat_fd = -1
        self.directory = directory

    def handled(self) -> None:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self.first = now
        _STATS.pack_into(self.mem, 0, self.count, self.first, now)

    def latency(self, sent: float) -> None:
        if self.lat_fd < 0:
            self.lat_fd = os.open(
                os.path.join(self.directory, f"{os.getpid()}.lat"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
            )
        os.write(self.lat_fd, struct.pack("=dd", sent, time.monotonic() - sent))


_progress: Progress | None = None


def progress() -> Progress:
    global _progress
    if _progress is None or _progress.directory != os.environ["BENCH_DIR"]:
        _progress = Progress(os.environ["BENCH_DIR"])
    return _progress


def read_progress(directory: str) -> tuple[int, float, float]:
    """(handled, first, last) over every process of a peer."""
    total, first, last = 0, float("inf"), 0.0
    for name in os.listdir(directory):
        if name.endswith(".count"):
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read(_STATS.size)
            if len(data) == _STATS.size:
                n, a, b = _STATS.unpack(data)
                if n:
                    total, first, last = total + n, min(first, a), max(last, b)
    return total, first, last


WARMUP = 0.05
"""The share of a paced run's messages, the first published, whose latencies are left out. Every
peer, raw paho included, sees its first 15-20 messages arrive together about 20 ms after the first
was published (a start-up transient outside the consumer); kept in, they would be the p99 of a
2,000-message run, whoever the consumer."""


def read_latencies(directory: str, warmup: float = WARMUP) -> list[float]:
    """Every recorded latency but those of the first ``warmup`` share of messages, by publish time."""
    pairs: list[tuple[float, float]] = []
    for name in os.listdir(directory):
        if name.endswith(".lat"):
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
            pairs.extend(struct.iter_unpack("=dd", data[: len(data) // 16 * 16]))
    pairs.sort()
    return [latency for _, latency in pairs[int(len(pairs) * warmup) :]]


def spin(iterations: int) -> int:
    """The calibrated CPU burn shared by every peer (about 1 ms per call by default)."""
    x = 0
    for i in range(iterations):
        x += i * i
    return x


def calibrate(target_seconds: float = 0.001) -> int:
    n = 20_000
    while True:
        start = time.perf_counter()
        spin(n)
        took = time.perf_counter() - start
        if took > 0.05:
            return max(1, int(n * target_seconds / took))
        n *= 2


def handle(payload: bytes, reply: object | None = None) -> None:
    """The workload: what every peer runs for every message (from BENCH_WORKLOAD)."""
    workload = os.environ["BENCH_WORKLOAD"]
    if workload == "cpu":
        spin(int(os.environ["BENCH_SPIN"]))
    elif workload == "latency":
        progress().latency(struct.unpack_from("=d", payload)[0])
    elif workload == "mix":  # 1 ms, or 50 ms when byte 8 is set; then the latency from publish
        spin(int(os.environ["BENCH_SPIN"]) * (50 if payload[8] else 1))
        progress().latency(struct.unpack_from("=d", payload)[0])
    elif workload == "publish" and reply is not None:
        reply("bench/out", payload[:16])  # type: ignore[operator]
    progress().handled()
