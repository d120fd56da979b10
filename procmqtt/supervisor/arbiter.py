"""The supervisor: forks the agent and the workers, restarts what dies, stops everything in order.

Modelled on gunicorn's arbiter. Signal handlers only queue the signal; ``run()`` shows one whole
pass in order: signals, reaping, then either reconciling the process count or driving the stop.
The supervisor never touches the broker and never blocks on a channel. Operations signals act
through the same pass: SIGHUP reloads (``reload``), SIGTTIN/SIGTTOU change the worker count
(``scale``), and ``reconcile`` then starts whatever the new state lacks. Those operations and the
stop live in ``operations.py``; forking each child in ``spawning.py``; the record of each child and
its last words in ``children.py``.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import deque

from procmqtt import logs
from procmqtt.backoff import Backoff
from procmqtt.config import Config, default_client_id
from procmqtt.errors import ExitCode
from procmqtt.ipc import channel, poller
from procmqtt.ipc.shared import SharedState
from procmqtt.ipc.signals import SignalQueue
from procmqtt.supervisor import proctitle
from procmqtt.supervisor.children import (
    AGENT_CRASH_LOOP,
    CRASH_LOOP,
    SIDECAR_SLOT,
    STABLE_AFTER,
    Child,
    Sidecar,
    describe_exit,
    kill,
    read_last_error,
    restart_cause,
)
from procmqtt.supervisor.operations import Loader, Operations
from procmqtt.supervisor.spawning import Spawning
from procmqtt.worker.base import Worker, uses_asyncio
from procmqtt.worker.routes import with_route_subscriptions

DUMP_GRACE = 0.5
"""Seconds between asking a hung worker for its stack (SIGUSR1) and SIGKILL."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_OPERATIONS_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)


class Supervisor(Operations, Spawning):
    """Runs in the process ``procmqtt run`` started; constructing it has no side effects.

    Its methods run in the supervisor process, except what ``_fork`` calls in a new child (said
    there). Reload, scale, stop and give-up are in ``Operations`` (``operations.py``).
    """

    def __init__(
        self,
        app: type[Worker],
        app_spec: str,
        config: Config,
        metrics_listener: socket.socket | None = None,
        *,
        health_listener: socket.socket | None = None,
        sidecar: Sidecar | None = None,
        loader: Loader | None = None,
    ) -> None:
        """``metrics_listener``: the ``[metrics]`` socket (``metrics.listen``), handed to every agent;
        ``health_listener`` likewise for ``[health]`` (``health.listen``).
        ``sidecar``: a process already started (``--broker embedded``); restarted like a child, stopped last.
        ``loader``: what SIGHUP calls to load the app and the configuration again."""
        self.app = app
        self.sidecar = sidecar
        self.loader = loader
        self.revision = 0
        self.revisions = itertools.count(1)
        self.previous: tuple[int, type[Worker], Config] | None = None  # what a failed reload goes back to
        self.app_spec = app_spec
        self.config = with_route_subscriptions(config, app)  # routes subscribe like [mqtt.topics]
        self.client_id = config.mqtt.client_id or default_client_id(app_spec)
        self.log = logs.get("supervisor")
        self.children: dict[int, Child] = {}
        self.generations = itertools.count(1)
        self.restart_at: dict[int, float] = {}  # slot (-1: agent) -> earliest restart time
        self.backoffs: dict[int, Backoff] = {}
        self.quick_deaths: dict[int, int] = {}  # slot -> deaths in a row before handling anything
        self.control: deque[channel.Record] = deque()  # records for the agent, sent without blocking
        self.metrics_listener = metrics_listener
        self.health_listener = health_listener
        self.restarts: dict[str, int] = {}  # worker restarts by cause, for the agent's metrics
        self.stopping = False
        self.stop_deadline = 0.0
        self.workers_signalled = False
        self.exit_code = ExitCode.OK

    # --- the main loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped; returns the exit code for ``procmqtt run``."""
        self.setup()
        try:
            while True:
                self.shared.beat(time.monotonic())  # /livez: the loop runs (agent/health.py)
                self.handle_signals()
                self.reap_children()
                self.murder_hung_workers()
                if self.stopping:
                    self.stop_sidecar_last()
                    if not self.children:
                        break
                    self.drive_stop()
                else:
                    self.reconcile()
                self.flush_control()
                self.sleep()
        finally:
            self.teardown()
        self.log.info("stopped (exit code %d)", self.exit_code)
        return self.exit_code

    def setup(self) -> None:
        self.pid = os.getpid()
        proctitle.set_title("supervisor", self.app_spec)
        self.state_dir = tempfile.mkdtemp(prefix="procmqtt-")
        self.shared = SharedState()
        self.upstream_agent, self.upstream_writers = channel.pair()
        # Blocking mode is shared by every process holding the socket: the workers block on a full
        # channel, the supervisor never does (it sends with MSG_DONTWAIT).
        self.signals = SignalQueue([*_STOP_SIGNALS, signal.SIGQUIT, signal.SIGCHLD, *_OPERATIONS_SIGNALS])
        m, w = self.config.mqtt, self.config.workers
        self.log.info(
            "procmqtt starting %s: %d worker(s), broker %s:%d, client id %s",
            self.app_spec,
            w.count,
            m.host,
            m.port,
            self.client_id,
        )
        if w.concurrency > 1 and not uses_asyncio(self.app):
            self.log.warning(
                "[workers] concurrency = %d has no effect: %s has no async handlers, so each "
                "worker handles one message at a time",
                w.concurrency,
                self.app.__name__,
            )
        if self.sidecar is not None and self.sidecar.pid is not None:
            self.children[self.sidecar.pid] = Child(
                "sidecar",
                SIDECAR_SLOT,
                next(self.generations),
                self.sidecar.pid,
                time.monotonic(),
                label=self.sidecar.name,
            )

    def teardown(self) -> None:
        self.signals.close()
        for child in self.children.values():  # only after an internal error
            kill(child.pid, signal.SIGKILL)
        for child in self.children.values():
            if child.agent_end is not None:
                child.agent_end.close()
        self.upstream_agent.close()
        self.upstream_writers.close()
        for listener in (self.metrics_listener, self.health_listener):
            if listener is not None:
                listener.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def sleep(self) -> None:
        now = time.monotonic()
        wake = [now + 1.0, *self.restart_at.values()]
        if self.stopping:
            wake.append(self.stop_deadline)
        wake += [c.kill_at for c in self.children.values() if c.kill_at]
        if self.control:
            wake.append(now + 0.05)
        poller.wait([self.signals], [], max(0.0, min(wake) - now))

    # --- signals -------------------------------------------------------------------------------

    def handle_signals(self) -> None:
        for signum in self.signals.pop():
            name = signal.Signals(signum).name
            if signum == signal.SIGCHLD:
                continue  # reaping happens every pass
            if signum == signal.SIGQUIT or (signum in _STOP_SIGNALS and self.stopping):
                self.log.warning("%s: stopping now", name)
                self.kill_all()
            elif signum in _STOP_SIGNALS:
                self.begin_stop(f"{name} received")
            elif signum == signal.SIGUSR1:  # logrotate; to a child, SIGUSR1 means "dump your stack"
                if logs.reopen():
                    self.log.info("SIGUSR1: log file reopened")
            elif self.stopping:
                self.log.warning("%s ignored: stopping", name)
            elif signum == signal.SIGHUP:
                self.reload()
            else:
                self.scale(+1 if signum == signal.SIGTTIN else -1)

    # --- children ------------------------------------------------------------------------------

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self.child_exited(child, os.waitstatus_to_exitcode(status))

    def child_exited(self, child: Child, code: int) -> None:
        if child.agent_end is not None:
            child.agent_end.close()
        if child.role == "worker":  # the agent must not wait for an end of file a grandchild can withhold
            self.control.append(channel.WorkerExited(child.slot, child.generation))
        name = child.name
        how = describe_exit(code)
        error = read_last_error(self.state_dir, child.pid, self.log)
        if error:
            how += f" ({error})"
        if child.role == "sidecar" and self.sidecar is not None:
            how += self.sidecar.reaped(code)
        if self.stopping:
            self.log.log(logging.INFO if code == 0 else logging.WARNING, "%s (pid %d) %s", name, child.pid, how)
            return
        if child.role == "agent" and code == ExitCode.AUTH:
            self.give_up(child, ExitCode.AUTH, "the broker refused the credentials; see the agent's error above")
            return
        if child.role == "agent" and code == ExitCode.USAGE:  # the broker lacks what [mqtt] asks (share_group)
            self.give_up(
                child, ExitCode.USAGE, "the broker cannot do what the configuration asks; see the agent's error above"
            )
            return
        if child.role == "agent" and self.crash_looping(child, code):
            self.give_up(
                child,
                ExitCode.APP,
                f"the agent failed {AGENT_CRASH_LOOP} times in a row within "
                f"{STABLE_AFTER:g}s of starting; the last one {how}",
            )
            return
        if child.role == "worker" and code == ExitCode.APP:
            self.give_up(child, ExitCode.APP, f"worker {child.slot} failed to boot; see the traceback above")
            return
        if child.role == "worker" and self.crash_looping(child, code):
            self.give_up(
                child,
                ExitCode.APP,
                f"worker {child.slot} died {CRASH_LOOP} times in a row within "
                f"{STABLE_AFTER:g}s of starting, before handling any message",
            )
            return
        if child.role == "worker" and child.slot >= self.config.workers.count:
            self.log.info(
                "worker %d (pid %d) stopped; %d worker(s) now", child.slot, child.pid, self.config.workers.count
            )
            return
        if child.role == "worker":
            self.count_restart(child, code)
        if code == 0 and child.role != "sidecar":  # recycled, reloaded, or asked to leave: replace it at once
            self.log.info("%s (pid %d) exited; replacing it", name, child.pid)
            return
        backoff = self.backoffs.setdefault(child.slot, Backoff(base=0.5, cap=10.0))
        if time.monotonic() - child.started >= STABLE_AFTER:
            backoff.reset()
        delay = backoff.next()
        self.restart_at[child.slot] = time.monotonic() + delay
        self.log.warning("%s (pid %d) %s; restarting in %.1fs", name, child.pid, how, delay)

    def count_restart(self, child: Child, code: int) -> None:
        """Tell the agent the running total for this cause: exit_<code>, a signal name, recycled, hung, reload."""
        cause = restart_cause(child, code)
        self.restarts[cause] = self.restarts.get(cause, 0) + 1
        self.control.append(channel.Restarts(cause, self.restarts[cause]))

    def crash_looping(self, child: Child, code: int) -> bool:
        """Count deaths that look like a broken boot, not a poison message or an outside kill.

        A worker's count only deaths before it handled anything (a poison message is the agent's
        business: ``max_attempts``). The agent has no such marker; an agent that keeps failing soon
        after start meets the same fault each time (a file it reads, a message the broker resends).
        """
        early = code != 0 and time.monotonic() - child.started < STABLE_AFTER
        if child.role == "agent":
            early = early and code != -signal.SIGKILL
        else:
            early = early and self.shared.finished(child.slot) == 0 and self.shared.busy_since(child.slot) == 0
        self.quick_deaths[child.slot] = self.quick_deaths.get(child.slot, 0) + 1 if early else 0
        return self.quick_deaths[child.slot] >= (AGENT_CRASH_LOOP if child.role == "agent" else CRASH_LOOP)

    def murder_hung_workers(self) -> None:
        """A worker past ``[workers] timeout`` on one message: dump its stack, then SIGKILL it."""
        timeout = self.config.workers.timeout
        now = time.monotonic()
        for child in self.children.values():
            if child.kill_at:
                if now >= child.kill_at:
                    kill(child.pid, signal.SIGKILL)
                continue
            if child.role != "worker" or not timeout:
                continue
            busy = self.shared.busy_since(child.slot)
            if busy and now - busy > timeout:
                self.log.error(
                    "worker %d (pid %d) has spent %.1fs on one message (timeout %gs); its stack "
                    "follows, then it is killed",
                    child.slot,
                    child.pid,
                    now - busy,
                    timeout,
                )
                kill(child.pid, signal.SIGUSR1)  # faulthandler writes every thread's stack to stderr
                child.kill_at = now + DUMP_GRACE

    def reconcile(self) -> None:
        """Start whatever is missing and due: the agent, then each worker slot.

        While a reload restarts the agent, new workers wait for the new agent: the old one, stopping,
        would stop them at once.
        """
        now = time.monotonic()
        running = {c.slot for c in self.children.values()}
        agent_leaving = any(c.role == "agent" and c.retiring for c in self.children.values())
        sidecar = (SIDECAR_SLOT,) if self.sidecar is not None else ()
        for slot in (*sidecar, -1, *range(self.config.workers.count)):
            if slot >= 0 and agent_leaving:
                break
            if slot not in running and now >= self.restart_at.get(slot, 0.0):
                self.restart_at.pop(slot, None)
                if slot == SIDECAR_SLOT:
                    self.spawn_sidecar()
                elif slot == -1:
                    self.spawn_agent()
                else:
                    self.spawn_worker(slot)

    # --- talking to the agent --------------------------------------------------------------------

    def flush_control(self) -> None:
        """Send the queued records to the agent without blocking; what does not fit waits a pass."""
        while self.control:
            record = self.control[0]
            if isinstance(record, channel.WorkerUp) and record.sock.fileno() == -1:
                self.control.popleft()  # that worker is already gone
                continue
            try:
                if not channel.send(self.upstream_writers, record, block=False):
                    return  # the agent is busy or down; try again next pass
            except OSError as exc:
                self.log.error("cannot reach the agent: %s", exc)
                return
            self.control.popleft()
