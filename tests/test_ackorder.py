"""QoS 1 acknowledgements in arrival order (``procmqtt/agent/ackorder.py``): on its own, then
through the agent against a broker that records the order of the PUBACKs it gets."""

from __future__ import annotations

import threading

import pytest
from harness import Procmqtt, records, wait_until, write_config
from hostile_broker import PUBACK, Connection, HostileBroker, publish
from hypothesis import given, settings
from hypothesis import strategies as st

from procmqtt.agent.ackorder import AckOrder


def _order(hold: float = 0.1) -> tuple[AckOrder, list[int]]:
    sent: list[int] = []
    return AckOrder(sent.append, hold=hold), sent


@pytest.mark.unit
def test_a_later_acknowledgement_waits_for_the_earlier_ones() -> None:
    acks, sent = _order()
    acks.arrived([1, 2, 3, 4], epoch=1)
    acks.ack(2, 1, now=0.0)
    acks.ack(4, 1, now=0.01)
    assert sent == []
    assert acks.due() == pytest.approx(0.1)
    acks.ack(1, 1, now=0.02)
    assert sent == [1, 2]  # 4 still waits for 3
    acks.ack(3, 1, now=0.03)
    assert sent == [1, 2, 3, 4]
    assert acks.due() is None and not acks.order and not acks.waiting and not acks.done


@pytest.mark.unit
def test_held_acknowledgements_go_out_after_the_hold_and_the_stuck_one_leaves_the_order() -> None:
    acks, sent = _order()
    acks.arrived([1, 2, 3, 4], epoch=1)
    acks.ack(2, 1, now=0.0)
    acks.ack(4, 1, now=0.05)
    acks.expire(0.09, 1, online=True)
    assert sent == []
    acks.expire(0.1, 1, online=True)
    assert sent == [2, 4]  # 1 and 3 held them up: they no longer order anything
    acks.ack(3, 1, now=0.2)
    acks.ack(1, 1, now=0.3)
    assert sent == [2, 4, 3, 1]
    assert acks.due() is None and not acks.order and not acks.waiting


@pytest.mark.unit
def test_only_the_ids_ahead_of_held_ones_leave_the_order() -> None:
    acks, sent = _order()
    acks.arrived([1, 2, 3, 4], epoch=1)
    acks.ack(2, 1, now=0.0)
    acks.expire(0.2, 1, online=True)
    assert sent == [2]
    acks.ack(4, 1, now=0.3)  # 3 is still ahead of it in the order
    assert sent == [2]
    acks.ack(3, 1, now=0.3)
    assert sent == [2, 3, 4]


@pytest.mark.unit
def test_held_acknowledgements_of_a_lost_connection_are_dropped_never_sent() -> None:
    acks, sent = _order()
    acks.arrived([1, 2], epoch=1)
    acks.ack(2, 1, now=0.0)
    acks.expire(0.01, 1, online=False)  # the connection went: the broker sends 1 and 2 again
    acks.expire(1.0, 2, online=True)
    assert sent == [] and acks.due() is None
    acks.arrived([7, 8], epoch=2)
    acks.ack(7, 2, now=1.1)
    assert sent == [7]


@pytest.mark.unit
def test_stopping_sends_what_is_held_and_orders_nothing_after() -> None:
    acks, sent = _order()
    acks.arrived([1, 2, 3], epoch=1)
    acks.ack(3, 1, now=0.0)
    acks.stop(1, online=True)
    assert sent == [3]
    acks.arrived([4, 5], epoch=1)
    acks.ack(5, 1, now=0.1)
    acks.ack(1, 1, now=0.1)
    assert sent == [3, 5, 1]


@pytest.mark.unit
def test_stopping_offline_drops_what_is_held() -> None:
    acks, sent = _order()
    acks.arrived([1, 2], epoch=1)
    acks.ack(2, 1, now=0.0)
    acks.stop(1, online=False)
    assert sent == []


@pytest.mark.unit
def test_an_id_not_taken_in_goes_out_at_once() -> None:
    acks, sent = _order()
    acks.arrived([1], epoch=1)
    acks.ack(9, 1, now=0.0)
    assert sent == [9]


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(
    mids=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    data=st.data(),
)
def test_every_acknowledgement_goes_out_once_in_order_unless_it_waited_too_long(mids, data) -> None:
    """Random arrivals (ids may repeat, as a broken broker could send them), acknowledged in a
    random order at random times: each goes out exactly once; without expiry, in arrival order."""
    acks, sent = _order(hold=1.0)
    acks.arrived(mids, epoch=1)
    finish = data.draw(st.permutations(range(len(mids))))
    expired = False
    now = 0.0
    for index in finish:
        now += data.draw(st.sampled_from([0.0, 0.3, 0.7]))
        acks.ack(mids[index], 1, now=now)
        before = len(sent)
        acks.expire(now, 1, online=True)
        expired = expired or len(sent) != before
    acks.expire(now + 10, 1, online=True)
    assert sorted(sent) == sorted(mids)
    if not expired:
        assert sent == mids
    assert not acks.done and not acks.held and acks.due() is None


@pytest.mark.timeout(40)
@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5"])
def test_the_agent_acknowledges_in_arrival_order_when_workers_finish_out_of_order(tmp_path, runs, v5) -> None:
    """The first message's handler is slow, the seven after it go round robin to both workers, so
    the other worker finishes its share first. Before, their PUBACKs went out first, and Mosquitto
    2.0 (which refills its in-flight window by the acknowledged message's position) slowed to one
    message per round trip (docs/performance.md, "Issue 16: W6")."""

    go = threading.Event()
    mids = list(range(10, 18))

    def after_subscribe(conn: Connection) -> None:
        go.wait(20)
        conn.send(b"".join(publish(b"ord/a", str(i + 1).encode(), 1, mid, v5) for i, mid in enumerate(mids)))

    broker = HostileBroker(v5=v5, after_subscribe=after_subscribe)
    try:
        rec = tmp_path / "records"
        rec.mkdir()
        cfg = write_config(
            tmp_path / "procmqtt.toml",
            None,  # type: ignore[arg-type]
            topics={"ord/#": 1},
            app={"record_dir": str(rec), "slow": 0.03, "slow_number": 1},
            mqtt='protocol = "5"' if v5 else "",
            workers_toml='dispatch = "round_robin"',
            port=broker.port,
        )
        run = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg, "--log-level", "DEBUG")
        runs.append(run)
        run.wait_for_log(r"worker 1 ready", 15)
        run.wait_for_log(r"worker 0 ready", 15)
        go.set()
        wait_until(lambda: len(records(rec)) >= len(mids), 15, "every message handled")
        wait_until(lambda: len(broker.acks(PUBACK)) >= len(mids), 10, "every message acknowledged")
        workers = {r["payload"]: r["worker"] for r in records(rec)}
        assert len(set(workers.values())) == 2, workers  # both workers took a share
        assert broker.acks(PUBACK) == mids
        assert run.stop() == 0
    finally:
        broker.close()
