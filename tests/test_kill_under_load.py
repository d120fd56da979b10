"""Workers SIGKILLed again and again while they publish payloads of up to several MB."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time

import pytest
from harness import Procmqtt, Subscriber, publish_all, publisher, records, start, wait_until, write_config

from procmqtt.ipc.ring import RING_MAX


@pytest.mark.timeout(120)
def test_sigkilled_publishing_workers_never_corrupt_or_wedge_the_publish_channel(tmp_path, broker, runs):
    cfg = write_config(tmp_path / "big.toml", broker, topics={"burst/#": 1}, workers=3)
    run = Procmqtt(tmp_path, "tests/apps.py:BigPublisher", cfg)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=3)
    agent = run.pids("agent")[-1]
    out = Subscriber(broker, "big/out", qos=0)
    done = Subscriber(broker, "big/done", qos=1)
    pub = publisher(broker)

    kills = 0
    end = time.monotonic() + 6.0
    while time.monotonic() < end:
        pub.publish("burst/10", b"load", qos=1)
        workers = list(run.pids("worker").values())
        if workers:
            os.kill(random.choice(workers), signal.SIGKILL)
            kills += 1
        time.sleep(0.1)
    during = len(out.payloads())

    # Afterwards the same agent still serves every worker: a marker burst completes end to end.
    wait_until(lambda: len(run.pids("worker")) == 3, 20, "all three workers replaced")
    pub.publish("burst/5", b"final", qos=1)
    wait_until(lambda: b"final" in done.payloads(), 30, "the final burst to complete")
    corrupt = sum(hashlib.sha1(p[20:]).digest() != p[:20] for p in out.payloads())
    sizes = [len(p) - 20 for p in out.payloads()]
    print(f"kills={kills} published_during_kills={during} total={len(sizes)} largest={max(sizes)} corrupt={corrupt}")
    assert kills >= 12  # restarts back off (0, 0.5, 1, 2 s...), which caps the rate
    assert corrupt == 0
    assert during > 0 and max(sizes) >= 2_000_000
    assert run.pids("agent").get(-1) == agent, "the agent died or was replaced"
    assert "Traceback" not in run.log()
    out.close()
    done.close()
    assert run.stop() == 0


_RING_SIZES = (4_096, 20_000, 65_536, 130_000)  # 256 KiB, 1, 2 and 4 MiB rings (``ring_size``)


def _ring_payloads(count: int) -> tuple[list[tuple[str, bytes]], set[str]]:
    """``count`` payloads large enough for the workers' rings, growing through the drain (a
    quarter at each of ``_RING_SIZES``), so every worker's ring is replaced by larger ones while
    workers or the agent are killed; and their SHA-1s."""
    sizes = [_RING_SIZES[i * len(_RING_SIZES) // count] for i in range(count)]
    items = [(f"load/{i % 10}", b"%08d" % i + os.urandom(n - 8)) for i, n in enumerate(sizes)]
    return items, {hashlib.sha1(p).hexdigest() for _, p in items}


def _ring_mapped(run) -> bool:
    """Some worker maps its agent's ring (``ipc/ring.py``): the drain goes through it."""
    for pid in run.pids("worker").values():
        try:
            with open(f"/proc/{pid}/maps") as f:
                if "procmqtt-ring" in f.read():
                    return True
        except OSError:
            pass
    return False


def _ring_sizes(run) -> list[int]:
    """The size of every ring the workers map now."""
    sizes = []
    for pid in run.pids("worker").values():
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "procmqtt-ring" in line:
                    start, end = line.split()[0].split("-")
                    sizes.append(int(end, 16) - int(start, 16))
    return sizes


def _done_shas(record_dir) -> list[str]:
    return [r["sha"] for r in records(record_dir) if r["topic"].startswith("load/")]


@pytest.mark.timeout(150)
def test_sigkilled_workers_mid_drain_of_large_payloads_lose_and_corrupt_nothing(tmp_path, broker, runs):
    """The ring: a worker killed while its ring holds payloads; what it held goes to the others, whole."""
    run, rec = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=3, app={"delay": 0.004})
    items, expected = _ring_payloads(1_500)
    publish_all(publisher(broker), items, timeout=60)
    wait_until(lambda: _ring_mapped(run), 30, "a worker to map its ring")
    kills = 0
    while len(set(_done_shas(rec))) < len(expected) * 0.8 and kills < 40:
        workers = list(run.pids("worker").values())
        if workers:
            os.kill(random.choice(workers), signal.SIGKILL)
            kills += 1
        wait_until(lambda: len(run.pids("worker")) == 3, 20, "the worker replaced")
        time.sleep(0.15)
    wait_until(lambda: expected <= set(_done_shas(rec)), 90, "every payload handled")
    done = _done_shas(rec)
    print(f"kills={kills} done={len(done)} distinct={len(set(done))}")
    assert kills >= 3
    assert set(done) == expected  # nothing lost, nothing corrupt (a torn payload has another SHA-1)
    assert "Traceback" not in run.log()
    assert run.stop() == 0


@pytest.mark.timeout(150)
def test_sigkilled_agent_mid_drain_of_large_payloads_loses_and_corrupts_nothing(tmp_path, broker, runs):
    """The ring: a new agent makes new rings; workers that held the old one read the new one right."""
    run, rec = start(runs, tmp_path, broker, topics={"load/#": 1}, workers=2, app={"delay": 0.002})
    items, expected = _ring_payloads(1_500)
    publish_all(publisher(broker), items, timeout=60)
    for n, threshold in enumerate((300, 800), start=2):
        wait_until(lambda t=threshold: len(records(rec)) >= t, 60, f"{threshold} handled")
        assert _ring_mapped(run)
        os.kill(run.pids("agent")[-1], signal.SIGKILL)
        run.wait_for_log(r"started agent", count=n)
    wait_until(lambda: expected <= set(_done_shas(rec)), 90, "every payload handled")
    assert set(_done_shas(rec)) == expected
    # The last agent's rings grew past the 2 MiB of the 64 KiB payloads it started with; the
    # workers map only the newest.
    assert _ring_sizes(run) == [RING_MAX, RING_MAX]
    assert "Traceback" not in run.log()
    assert run.stop() == 0
