"""Workers SIGKILLed again and again while they publish payloads of up to several MB."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time

import pytest
from harness import Procmqtt, Subscriber, publisher, wait_until, write_config


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
