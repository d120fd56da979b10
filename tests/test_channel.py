"""The record channels: round trips, descriptor passing, and writers SIGKILLed mid-send."""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque

import pytest

from procmqtt.ipc import channel
from procmqtt.message import EMPTY, Outcome, Properties

FULL = Properties(
    user_properties=(("a", "1"), ("ü", "ß"), ("a", "2"), ("", "")),
    content_type="application/json",
    response_topic="procmqtt/reply/x/3",
    correlation_data=b"\x00\xffcorr",
    message_expiry=0,
    payload_format_indicator=0,
)


def roundtrip(record: channel.Record) -> channel.Record:
    a, b = channel.pair()
    with a, b:
        channel.send(a, record)
        got = channel.receive(b)
    assert got is not None and len(got) == 1
    return got[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "record",
    [
        channel.Deliver(2**60, "a/b/ü", b"\x00\xff" * 10, 1, True, False),
        channel.Deliver(1, "t", b"", 0, False, True),
        channel.Published(7, 0),
        channel.Done(123456789),
        channel.Done(5, Outcome.FAILED, 0.25),
        channel.Done(6, Outcome.RETRY, 0.5, 2.5),
        channel.Done(7, Outcome.RETRY, 0.5, -1.0),
        channel.Retire(3, 17),
        channel.WorkerExited(1023, 2**32 - 1),
        channel.Ready(1023, 2**31),
        channel.Publish(3, 99, 42, "out/x", b"payload", 2, True),
        channel.Deliver(9, "v5/none", b"p", 1, False, False, EMPTY),
        channel.Deliver(9, "v5/full", b"\x00p", 2, True, True, FULL),
        channel.Deliver(9, "v5/some", b"", 1, False, False, Properties(content_type="", message_expiry=2**32 - 1)),
        channel.Deliver(9, "v5/corr", b"x", 1, False, False, Properties(correlation_data=b"")),
        channel.Publish(3, 99, 42, "out/x", b"payload", 1, False, Properties(user_properties=(("k", "v"),))),
        channel.Publish(3, 99, 42, "ask/x", b"?", 1, False, Properties(correlation_data=b"c", message_expiry=5), True),
        channel.Reply("procmqtt/reply/c/1", b"answer", 1, False, Properties(correlation_data=b"c")),
        channel.Reply("procmqtt/reply/c/1", b"", 0, True, EMPTY),
        channel.Subscribe("$share/g/a/+/#", 1),
        channel.Unsubscribe("a/#"),
        channel.Stop(),
        channel.StopAgent(),
        channel.Restarts("SIGKILL", 3),
        channel.Restarts("exit_1", 2**40),
        channel.AgentStarted(),
        channel.Sync(1023, 2**31, 2**63 - 1),
        channel.SyncAck(0),
        channel.SyncAck(42, (1, 7, 41)),
        channel.SyncAck(2**40, tuple(range(1, 60_001))),  # a whole publish_buffer: through the memory file
        channel.Holding(0, 1),
        channel.Holding(1023, 2**31, ((2**63 - 1, "a/b"), (7, ""), (8, "é/" + "x" * 65_000))),
    ],
)
@pytest.mark.unit
def test_records_round_trip(record):
    assert roundtrip(record) == record


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_an_mqtt311_delivery_costs_one_byte_more_than_before():
    """The properties flag is the only addition to a 3.1.1 delivery: head 14 -> 15 bytes."""
    plain = channel.encode(channel.Deliver(1, "t/1", b"12345", 1, False, False))
    assert len(plain) == 15 + 3 + 5
    assert len(channel.encode(channel.Deliver(1, "t/1", b"12345", 1, False, False, EMPTY))) == len(plain)


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_large_properties_travel_through_the_memory_file():
    many = Properties(user_properties=tuple((f"name-{i}", "v" * 1000) for i in range(300)))
    record = channel.Deliver(1, "big/props", os.urandom(1000), 1, False, False, many)
    assert len(channel.encode(record)) > channel.INLINE_MAX
    assert roundtrip(record) == record


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [channel.INLINE_MAX - 100, channel.INLINE_MAX + 1, 5 * 1024 * 1024])
@pytest.mark.unit
def test_large_records_travel_whole(size):
    payload = os.urandom(size)
    got = roundtrip(channel.Publish(1, 1, 1, "big", payload, 1, False))
    assert isinstance(got, channel.Publish) and got.payload == payload


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_worker_up_carries_a_working_socket():
    agent_end, worker_end = channel.pair()
    up = roundtrip(channel.WorkerUp(2, 5, agent_end))
    assert isinstance(up, channel.WorkerUp) and (up.slot, up.generation) == (2, 5)
    agent_end.close()  # the received descriptor is an independent reference
    channel.send(up.sock, channel.Stop())
    assert channel.receive(worker_end) == [channel.Stop()]
    up.sock.close()
    assert channel.receive(worker_end) is None  # end of file once every holder closed


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_batches_keep_order_and_split_at_the_datagram_limit():
    a, b = channel.pair()
    with a, b:
        queue = deque(channel.encode(channel.Done(i)) for i in range(10))
        queue.append(channel.encode(channel.Publish(0, 0, 1, "big", b"x" * 200_000, 1, False)))
        queue.extend(channel.encode(channel.Done(i)) for i in range(10, 20))
        assert channel.send_many(a, queue) and not queue
        got = []
        while len(got) < 21:
            batch = channel.receive(b)
            assert batch
            got.extend(batch)
        assert [r.delivery_id for r in got if isinstance(r, channel.Done)] == list(range(20))
        assert isinstance(got[10], channel.Publish) and len(got[10].payload) == 200_000


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_large_payloads_are_gathered_not_joined_and_arrive_whole_in_order():
    """Issue 16: a large payload stays its own buffer until ``sendmsg`` gathers it; small records
    around it are still batched, several large ones share a datagram, and one past INLINE_MAX
    still goes through a memory file."""
    big = [os.urandom(size) for size in (channel.GATHER_MIN, 20_000, 30_000, 300_000)]
    parts = channel.encode_parts(channel.Deliver(7, "t/big", big[1], 1, False, False, FULL))
    assert isinstance(parts, tuple) and parts[1] is big[1]  # the payload itself, not a copy
    assert b"".join(parts) == channel.encode(channel.Deliver(7, "t/big", big[1], 1, False, False, FULL))
    assert isinstance(channel.encode_parts(channel.Done(1)), bytes)
    queue: deque[channel.Encoded] = deque()
    for i, payload in enumerate(big):
        queue.append(channel.encode_parts(channel.Done(i)))
        queue.append(channel.encode_parts(channel.Deliver(i, f"t/{i}", payload, 1, False, bool(i % 2))))
        queue.append(channel.encode_parts(channel.Reply(f"r/{i}", payload, 0, False, EMPTY)))
    a, b = channel.pair()
    with a, b:
        assert channel.send_many(a, queue) and not queue
        got: list[channel.Record] = []
        datagrams = 0
        while len(got) < 12:
            batch = channel.receive(b)
            assert batch
            got.extend(batch)
            datagrams += 1
    assert datagrams < 12  # batched, not one datagram per record
    for i, payload in enumerate(big):
        done, deliver, reply = got[3 * i : 3 * i + 3]
        assert done == channel.Done(i)
        assert deliver == channel.Deliver(i, f"t/{i}", payload, 1, False, bool(i % 2))
        assert reply == channel.Reply(f"r/{i}", payload, 0, False, EMPTY)


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_a_bad_record_in_a_memory_file_is_a_channel_error():
    """The memory file is mapped while its records are decoded; a record that fails to decode is
    still reported as ChannelError (not a BufferError from unmapping under a live view)."""
    body = b"\xfe" + b"x" * (channel.INLINE_MAX + 10)
    a, b = channel.pair()
    with a, b:
        channel._send_datagram(a, [struct.pack("!I", len(body)), body], 4 + len(body), [], True)
        with pytest.raises(channel.ChannelError, match="unknown record kind 254"):
            channel.receive(b)
        channel.send(a, channel.Stop())
        assert channel.receive(b) == [channel.Stop()]  # the channel carries on


@pytest.mark.timeout(10)
@pytest.mark.unit
def test_full_channel_does_not_block_a_nonblocking_sender():
    a, b = channel.pair()
    with a, b:
        sent = 0
        while channel.send(a, channel.Publish(0, 0, sent, "t", b"x" * 20000, 0, False), block=False):
            sent += 1
            assert sent < 100_000
        assert sent > 0


def _writer(sock: socket.socket, seed: int) -> None:
    """Child: send self-checking records of mixed sizes until killed."""
    rng = random.Random(seed)
    sizes = (10, 3000, 40_000, 700_000, 3_000_000)
    n = 0
    while True:
        body = rng.randbytes(rng.choice(sizes))
        payload = hashlib.sha1(body).digest() + body
        channel.send(sock, channel.Publish(0, os.getpid() % 65536, n, "t", payload, 0, False))
        n += 1


def _spawn(sock: socket.socket) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            _writer(sock, os.getpid())
        finally:
            os._exit(0)
    return pid


@pytest.mark.timeout(60)
def test_writers_sigkilled_mid_send_never_corrupt_or_stall_the_channel():
    """Three writers share one channel; one is SIGKILLed every 30 ms, mid-send or not, until 50 kills,
    200 records and 20 large ones have been seen (about 4 s on an idle machine; a busy one takes longer)."""
    reader, shared = channel.pair()
    reader.setblocking(False)
    writers = [_spawn(shared) for _ in range(3)]
    kills = received = big = 0
    longest_wait = 0.0
    try:
        end = time.monotonic() + 40.0
        next_kill = time.monotonic() + 0.03
        last = time.monotonic()
        while time.monotonic() < end and not (kills >= 50 and received >= 200 and big >= 20):
            if time.monotonic() >= next_kill:
                victim = writers.pop(random.randrange(len(writers)))
                os.kill(victim, signal.SIGKILL)
                os.waitpid(victim, 0)
                writers.append(_spawn(shared))
                kills += 1
                next_kill = time.monotonic() + 0.03
            ready, _, _ = select.select([reader], [], [], 2.0)
            assert ready, "the reader stalled for 2 s with live writers"
            try:
                (record,) = channel.receive(reader)
            except BlockingIOError:
                continue
            now = time.monotonic()
            longest_wait, last = max(longest_wait, now - last), now
            assert isinstance(record, channel.Publish)
            digest, body = record.payload[:20], record.payload[20:]
            assert hashlib.sha1(body).digest() == digest, "corrupt record"
            received += 1
            big += len(body) > channel.INLINE_MAX
    finally:
        for pid in writers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        reader.close()
        shared.close()
    print(f"kills={kills} records={received} large={big} longest_gap={longest_wait * 1000:.0f}ms")
    assert kills >= 50 and received >= 200 and big >= 20


_CHURN = """
import resource, sys
from procmqtt.ipc import channel
channel._receive_view()  # a process's first receive
src, count = bytes(65536), int(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # payloads allocated and freed together, as a worker's or the agent's are
    held = [bytearray(src) for _ in range(count)]
    del held
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (50 * count))
"""


@pytest.mark.skipif(os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's dynamic mmap threshold")
@pytest.mark.parametrize("count", [8, 48], ids=["a worker's prefetch", "the agent's window and read-ahead"])
def test_freed_payloads_stay_with_the_process_instead_of_faulting_in_again(count: int) -> None:
    """glibc gave freed 64 KiB payloads back to the kernel and faulted them in again: about 12 page
    faults per payload here, 4-5 per message in a W6 worker (docs/performance.md, "Issue 16: W6").
    The agent holds more at once (3 MiB here): with 1 MiB kept it still faulted about 10 per payload."""
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, str(count)], capture_output=True, text=True, timeout=30, check=True
    )
    faults = float(out.stdout)
    assert faults < 1, f"{faults} page faults per 64 KiB payload"
