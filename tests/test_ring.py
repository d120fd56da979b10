"""The shared-memory ring per worker channel (``ipc/ring.py``): its allocator, property-tested; the
records that name it; the agent's and the worker's sides of it."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procmqtt.agent.workers import WorkerChannels
from procmqtt.ipc import channel
from procmqtt.ipc.ring import ALIGN, RING_FLOOR, RING_MAX, RING_MIN, Ring, RingReader, RingSpace, ring_size

pytestmark = pytest.mark.unit

SIZE = 64 * ALIGN

# A step: take a range of that many bytes, or give back the i-th range in use (modulo their number).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(1, SIZE + ALIGN)), st.tuples(st.just("give"), st.integers(0, 1000))
    ),
    max_size=200,
)


@given(steps)
@settings(max_examples=400, deadline=None)
def test_ranges_in_use_never_overlap_and_stay_inside_the_ring(ops: list[tuple[str, int]]) -> None:
    space = RingSpace(SIZE)
    held: list[int] = []  # offsets taken and not given back
    for op, n in ops:
        if op == "take":
            offset = space.take(n)
            if offset is not None:
                assert offset % ALIGN == 0 and offset >= 0 and offset + n <= SIZE
                held.append(offset)
        elif held:
            assert space.give_back(held.pop(n % len(held)))
        ranges = sorted(space.in_use())
        for (a, length), (b, _) in itertools.pairwise(ranges):
            assert a + length <= b, f"{ranges} overlap"
        assert all(a >= 0 and a + length <= SIZE for a, length in ranges)
        assert set(held) <= {a for a, _ in ranges}  # what is held is never free
    for offset in held:
        assert space.give_back(offset)
    assert space.in_use() == []
    assert space.take(SIZE) == 0  # empty again: the whole ring is free


@given(st.lists(st.integers(1, SIZE // 4), min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_given_back_in_order_the_ring_never_runs_out(lengths: list[int]) -> None:
    """A worker that finishes in order with at most three ranges out never finds the ring full."""
    space = RingSpace(SIZE)
    out: list[int] = []
    for n in lengths:
        if len(out) == 3:
            assert space.give_back(out.pop(0))
        offset = space.take(n)
        assert offset is not None
        out.append(offset)


@pytest.mark.parametrize("length", [0, SIZE + 1])
def test_a_range_too_large_is_refused(length: int) -> None:
    space = RingSpace(SIZE)
    assert space.take(SIZE + 1) is None
    if length:
        assert space.take(length) is None


def test_one_range_held_stops_the_others_from_passing_it() -> None:
    space = RingSpace(4 * ALIGN)
    first, second = space.take(ALIGN), space.take(ALIGN)
    assert first == 0 and second == ALIGN
    assert space.give_back(second)
    assert space.take(2 * ALIGN) == 2 * ALIGN  # to the end
    assert space.take(ALIGN) is None  # the first still held: no room behind it
    assert not space.give_back(second)  # twice: refused
    assert not space.give_back(3)  # unknown
    assert space.give_back(first)
    assert space.take(ALIGN) == 0  # wrapped


def test_a_payload_written_by_the_agent_is_read_by_the_worker_through_the_channel() -> None:
    agent_end, worker_end = channel.pair()
    ring = Ring(RING_MAX)
    try:
        assert channel.send(agent_end, channel.RingFile(ring.fd))
        ring.sent()
        payload = os.urandom(70_000)
        offset = ring.put(7, payload)
        assert offset is not None
        channel.send(agent_end, channel.DeliverAt(7, "t/x", offset, len(payload), 1, False, True))
        (attach,) = channel.receive(worker_end) or []
        assert isinstance(attach, channel.RingFile)
        reader = RingReader(attach.fd)
        (at,) = channel.receive(worker_end) or []
        assert at == channel.DeliverAt(7, "t/x", offset, len(payload), 1, False, True)
        assert isinstance(at, channel.DeliverAt)
        assert reader.read(at.offset, at.length) == payload
        with pytest.raises(ValueError):
            reader.read(RING_MAX - 10, 11)
        ring.free(7)
        assert ring.space.in_use() == []
        reader.close()
    finally:
        ring.close()
        agent_end.close()
        worker_end.close()


def _drain(sock: socket.socket) -> list[channel.Record]:
    out: list[channel.Record] = []
    while True:
        try:
            out += channel.receive(sock) or []
        except BlockingIOError:
            return out


def test_the_agent_sends_large_payloads_through_the_ring_and_frees_them_on_done() -> None:
    agent_end, worker_end = channel.pair()
    worker_end.setblocking(False)
    channels = WorkerChannels({0: (1, agent_end)}, 16)
    worker = channels.by_slot[0]
    big, small = os.urandom(RING_MIN), os.urandom(RING_MIN - 1)
    channels.deliver(worker, channel.Deliver(1, "t", big, 1, False, False))
    channels.deliver(worker, channel.Deliver(2, "t", small, 1, False, False))
    channels.flush([])
    records = _drain(worker_end)
    assert [type(r) for r in records] == [channel.RingFile, channel.DeliverAt, channel.Deliver]
    ring_file, at = records[0], records[1]
    assert isinstance(ring_file, channel.RingFile) and isinstance(at, channel.DeliverAt)
    reader = RingReader(ring_file.fd)
    assert reader.read(at.offset, at.length) == big
    assert worker.ring is not None and worker.ring.space.in_use()
    assert worker.ring.space.size == RING_FLOOR  # 16 payloads of 4 KiB, twice over: the least ring
    channels.done(2, 0)  # inline: nothing to free
    channels.done(1, 1)  # not from that slot (the ledger knew it elsewhere): nothing freed
    assert worker.ring.space.in_use()
    channels.done(1, 0)
    assert worker.ring.space.in_use() == [] and not channels.in_ring
    # The ring full (here: one range held, then more than the rest): inline, in the record.
    channels.deliver(worker, channel.Deliver(3, "t", big, 1, False, False))
    channels.deliver(worker, channel.Deliver(4, "t", bytes(RING_FLOOR - RING_MIN + 1), 1, False, False))
    channels.flush([])
    records = _drain(worker_end)
    assert [type(r) for r in records] == [channel.DeliverAt, channel.Deliver]
    # A worker gone: its ring goes with its channel.
    ring = worker.ring
    channels.remove(worker)
    assert worker.ring is None and not channels.in_ring and ring.fd == -1
    reader.close()
    worker_end.close()


def test_a_ring_is_sized_for_twice_the_window_of_its_payloads() -> None:
    assert ring_size(RING_MIN, 16) == RING_FLOOR
    assert ring_size(64 * 1024, 16) == 2 * 1024 * 1024
    assert ring_size(64 * 1024 + 1, 16) == RING_MAX
    assert ring_size(1024 * 1024, 16) == RING_MAX  # capped: four such payloads at once
    assert ring_size(64 * 1024, 1) == RING_FLOOR


def test_a_larger_payload_gets_a_larger_ring_once_no_record_names_the_old_one() -> None:
    """Payloads of 4 KiB, then 64 KiB, then 128 KiB, with a window of 4: the ring grows from 256 KiB
    to 512 KiB at once (nothing queued), stays while records naming it wait to be sent, and grows
    to 1 MiB on the next pass. The worker, switching rings as their records arrive, reads every
    payload intact; a Done for a payload of a replaced ring frees nothing in the new one."""
    agent_end, worker_end = channel.pair()
    worker_end.setblocking(False)
    channels = WorkerChannels({0: (1, agent_end)}, 4)
    worker = channels.by_slot[0]
    payloads = {i: os.urandom(n) for i, n in enumerate([4096, 65536, 131072, 131072], start=1)}
    got: dict[int, bytes] = {}
    sizes: list[int] = []
    reader: RingReader | None = None

    def worker_reads() -> None:
        nonlocal reader
        for record in _drain(worker_end):
            if isinstance(record, channel.RingFile):
                if reader is not None:
                    reader.close()
                reader = RingReader(record.fd)
            else:
                assert isinstance(record, channel.DeliverAt) and reader is not None
                got[record.delivery_id] = reader.read(record.offset, record.length)

    try:
        for batch in ([1], [2, 3], [4]):
            for i in batch:
                channels.deliver(worker, channel.Deliver(i, "t", payloads[i], 1, False, False))
            channels.flush([])
            assert worker.ring is not None
            sizes.append(worker.ring.space.size)
            worker_reads()
        assert sizes == [RING_FLOOR, 2 * RING_FLOOR, 4 * RING_FLOOR]
        assert got == payloads
        assert set(channels.in_ring) == {4}  # the replaced rings' ranges are forgotten
        channels.done(2, 0)
        assert worker.ring.space.in_use() and set(channels.in_ring) == {4}
        channels.done(4, 0)
        assert worker.ring.space.in_use() == [] and not channels.in_ring
    finally:
        if reader is not None:
            reader.close()
        agent_end.close()
        worker_end.close()


def _fill(sock: socket.socket) -> None:
    """Fill a non-blocking channel until the kernel takes no more."""
    sock.setblocking(False)
    while channel.send(sock, channel.Stop(), block=False):
        pass


def _kinds(sock: socket.socket) -> list[type]:
    """The kinds of record waiting on the worker's end, Stops (the filler) left out."""
    return [type(r) for r in _drain(sock) if not isinstance(r, channel.Stop)]


def test_a_ring_whose_record_cannot_be_sent_waits_and_payloads_go_inline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's channel full when its first ring (or a larger one) is made: the memory file is
    closed, the payload goes inline, and the next payload tries again. A memory file that cannot be
    made leaves a worker without a ring inline for good, and one with a ring on the ring it has."""
    agent_end, worker_end = channel.pair()
    worker_end.setblocking(False)
    channels = WorkerChannels({0: (1, agent_end)}, 4)
    worker = channels.by_slot[0]
    small, large = os.urandom(RING_MIN), os.urandom(65536)
    try:
        _fill(agent_end)
        channels.deliver(worker, channel.Deliver(1, "t", small, 1, False, False))
        assert worker.ring is None and not worker.no_ring
        assert _kinds(worker_end) == []  # the worker reads its channel: room again
        channels.flush([])
        channels.deliver(worker, channel.Deliver(2, "t", small, 1, False, False))
        channels.flush([])
        assert _kinds(worker_end) == [channel.Deliver, channel.RingFile, channel.DeliverAt]
        assert worker.ring is not None and worker.ring.space.size == RING_FLOOR
        # A larger ring is due (64 KiB payloads, a window of 4: 512 KiB), but the channel is full.
        _fill(agent_end)
        channels.deliver(worker, channel.Deliver(3, "t", large, 1, False, False))
        assert worker.ring.space.size == RING_FLOOR and set(channels.in_ring) == {2, 3}  # it fitted there
        _drain(worker_end)
        channels.flush([])
        assert _kinds(worker_end) == [channel.DeliverAt]
        # No memory file can be made: a worker with a ring keeps using it.
        monkeypatch.setattr("procmqtt.agent.workers.Ring", _no_memory_file)
        channels.done(2, 0)
        channels.deliver(worker, channel.Deliver(4, "t", large, 1, False, False))
        assert worker.ring.space.size == RING_FLOOR and not worker.no_ring and 4 in channels.in_ring
        # ... and a worker without one stays inline.
        other_agent_end, other_worker_end = channel.pair()
        fresh = channels.add(1, 1, other_agent_end)
        channels.deliver(fresh, channel.Deliver(5, "t", small, 1, False, False))
        channels.deliver(fresh, channel.Deliver(6, "t", small, 1, False, False))
        assert fresh.ring is None and fresh.no_ring
        assert [r.getMessage() for r in caplog.records] == [
            "worker 1: no ring ([Errno 24] Too many open files); its large payloads go inline"
        ]  # said once, for the worker without a ring
        other_worker_end.close()
        channels.remove(fresh)
        channels.remove(worker)
    finally:
        worker_end.close()


def _no_memory_file(size: int) -> Ring:
    raise OSError(24, "Too many open files")
