"""The agent's loop in real operation: descriptors above 1023, and a client id used twice."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import (
    ROOT,
    Procmqtt,
    publish_all,
    publisher,
    records,
    wait_until,
    write_config,
)


class FdHogProcmqtt(Procmqtt):
    """``procmqtt run`` through tests/fdhog.py: every descriptor it opens is above 1023."""

    def __init__(self, directory: Path, app: str, config: str) -> None:
        self.log_path = directory / f"procmqtt-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process, as in Procmqtt
        self.proc = subprocess.Popen(
            [sys.executable, "tests/fdhog.py", "run", app, "-c", config],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def _socket_fds(pid: int) -> list[int]:
    fds = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if entry.readlink().name.startswith("socket:"):
                fds.append(int(entry.name))
        except OSError:
            pass
    return fds


@pytest.mark.timeout(60)
def test_descriptors_above_1023_deliver_and_the_agent_does_not_spin(tmp_path, broker, runs):
    """select() refuses descriptors >= 1024: the agent swallowed its ValueError and spun at 100 %
    CPU, delivering nothing; workers crashed in select."""
    rec = tmp_path / "records"
    rec.mkdir()
    cfg = write_config(tmp_path / "procmqtt.toml", broker, topics={"fd/#": 1}, app={"record_dir": str(rec)})
    run = FdHogProcmqtt(tmp_path, "tests/apps.py:Recorder", cfg)
    runs.append(run)
    run.ready()
    run.wait_for_log(r"started worker", count=2)
    agent = run.pids("agent")[-1]
    assert min(_socket_fds(agent)) > 1023, "the wrapper did not push the agent's sockets above 1023"
    for pid in run.pids("worker").values():
        assert min(_socket_fds(pid)) > 1023
    publish_all(publisher(broker), [(f"fd/{i}", str(i).encode()) for i in range(200)])
    wait_until(lambda: len(records(rec)) >= 200, 20, "200 messages handled")
    before = _cpu_seconds(agent)
    time.sleep(2)
    used = _cpu_seconds(agent) - before
    assert used < 0.5, f"the idle agent used {used:.2f}s of CPU in 2s"
    assert run.stop() == 0


@pytest.mark.timeout(60)
def test_two_instances_with_one_client_id_back_off_and_say_so_once(tmp_path, broker, runs):
    """Each instance's CONNECT takes the session over from the other; with the backoff reset on
    every CONNACK both reconnected ~1,000 times a second, forever, without a hint."""
    rec = tmp_path / "records"
    rec.mkdir()
    cfg = write_config(tmp_path / "procmqtt.toml", broker, topics={"dup/#": 1}, app={"record_dir": str(rec)})
    first = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg)
    runs.append(first)
    first.ready()
    second = Procmqtt(tmp_path, "tests/apps.py:Recorder", cfg)
    runs.append(second)
    warning = r"WARNING .*another client is probably using the client id 'test-test_two_instances"
    for run in (first, second):
        run.wait_for_log(warning, timeout=15)
    time.sleep(4)
    connects = [run.log().count("INFO connected to") for run in (first, second)]
    print("connections in ~6 s:", connects)
    assert sum(connects) <= 30, connects
    for run in (first, second):
        assert len(re.findall(warning, run.log())) == 1
        assert run.stop() == 0


@pytest.mark.unit
def test_poller_wait_takes_descriptors_above_1023_and_reports_eof_and_closed():
    import os
    import socket

    from procmqtt.ipc import poller

    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1500))
    try:
        assert poller.wait([high], [], 0) == ([], [])
        b.send(b"x")
        assert poller.wait([high], [high], 0) == ([high], [high])
        b.close()
        high.recv(1)
        assert poller.wait([high], [], 0) == ([high], [])  # end of file reads as readable, as with select
        high.close()
        with pytest.raises(poller.ClosedUnderUs):
            poller.wait([high], [], 0)
    finally:
        a.close()


@pytest.mark.unit
def test_a_kept_poller_follows_what_each_pass_waits_on():
    """The agent's loop keeps one poll object across passes (``poller.Poller``): a socket dropped
    from the list, a descriptor number reused by a new socket, a writer that comes and goes and a
    socket closed under it must all read as ``poller.wait`` reads them."""
    import os
    import socket

    from procmqtt.ipc import poller

    kept = poller.Poller()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        assert kept.wait([a, c], [], 0) == ([], [])
        b.send(b"x")
        d.send(b"y")
        assert kept.wait([a, c], [c], 0) == ([a, c], [c])
        assert kept.wait([a], [], 0) == ([a], [])  # c left the list: not reported although readable
        assert kept.wait([a, c], [], 0) == ([a, c], [])  # and back
        number = a.fileno()
        a.close()
        b.close()
        with pytest.raises(poller.ClosedUnderUs):
            kept.wait([a, c], [], 0)
        e, f = socket.socketpair()  # a new socket may get the closed one's descriptor number
        reused = socket.socket(fileno=os.dup2(e.fileno(), number)) if e.fileno() != number else e
        try:
            assert kept.wait([reused, c], [], 0) == ([c], [])  # the new socket, nothing to read yet
            f.send(b"z")
            assert kept.wait([reused, c], [reused], 0) == ([reused, c], [reused])
        finally:
            for s in {reused, e, f}:
                s.close()
    finally:
        for s in (a, b, c, d):
            s.close()
