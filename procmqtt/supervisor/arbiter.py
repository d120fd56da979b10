"""The supervisor: forks the agent and the workers, restarts what dies, stops everything in order.

Modelled on gunicorn's arbiter. Signal handlers only queue the signal; ``run()`` shows one whole
pass in order: signals, reaping, then either reconciling the process count or driving the stop.
The supervisor never touches the broker and never blocks on a channel. Operations signals act
through the same pass: SIGHUP reloads (``reload``), SIGTTIN/SIGTTOU change the worker count
(``scale``), and ``reconcile`` then starts whatever the new state lacks.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from procmqtt import logs
from procmqtt.agent.loop import Agent
from procmqtt.backoff import Backoff
from procmqtt.config import Config, default_client_id, reload
from procmqtt.errors import ExitCode, ProcmqttError
from procmqtt.ipc import channel, poller
from procmqtt.ipc.shared import MAX_SLOTS, SharedState
from procmqtt.ipc.signals import SignalQueue
from procmqtt.supervisor import proctitle
from procmqtt.worker.base import Worker, uses_asyncio
from procmqtt.worker.main import serve
from procmqtt.worker.routes import with_route_subscriptions

if TYPE_CHECKING:
    from procmqtt.dev.embedded import EmbeddedBroker

STOP_MARGIN = 5.0
"""Seconds past ``graceful_timeout`` before the supervisor SIGKILLs what is left."""
STABLE_AFTER = 5.0
"""A child that lived this long resets its restart backoff."""
CRASH_LOOP = 5
"""A worker slot whose process died this many times in a row before handling anything stops procmqtt."""
AGENT_CRASH_LOOP = 3
"""An agent that failed this many times in a row within ``STABLE_AFTER`` of starting stops procmqtt.
Failed: an exception or a non-zero exit code or signal, except SIGKILL (an operator, a test, or the
OOM killer; the restart backoff handles those)."""
LAST_ERROR_MAX = 500
"""Characters of a crashed child's exception message kept for the supervisor's log line."""
DUMP_GRACE = 0.5
"""Seconds between asking a hung worker for its stack (SIGUSR1) and SIGKILL."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_OPERATIONS_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)
_SUPERVISOR_ONLY = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
"""Children ignore these: sent to the whole process group (a closed terminal), only the supervisor acts."""

Loader = Callable[[], tuple[type[Worker], Config]]
"""Loads the app and the configuration again, as ``procmqtt run`` did; raises ``ProcmqttError``."""

BROKER_SLOT = -2
"""The embedded broker's slot (``--broker embedded``); the agent is -1, workers 0 .. N-1."""


@dataclass
class Child:
    role: str  # "agent", "worker" or "broker"
    slot: int  # the worker's id; -1 for the agent, -2 for the embedded broker
    generation: int  # unique per fork, so the agent can tell a replacement from a stale record
    pid: int
    started: float
    agent_end: socket.socket | None = None  # a worker's channel, the end the agent uses
    kill_at: float = 0.0  # hung: SIGKILL at this time (after the stack dump)
    revision: int = 0  # which loaded app and configuration it was forked from (SIGHUP adds one)
    retiring: bool = False  # asked to stop gracefully, for a reload or one worker fewer


class Supervisor:
    """Runs in the process ``procmqtt run`` started; constructing it has no side effects."""

    def __init__(self, app: type[Worker], app_spec: str, config: Config,
                 metrics_listener: socket.socket | None = None, *, broker: EmbeddedBroker | None = None,
                 loader: Loader | None = None) -> None:
        """``metrics_listener``: the ``[metrics]`` socket (``metrics.listen``), handed to every agent.
        ``broker``: an embedded broker already started; supervised like a child, stopped last.
        ``loader``: what SIGHUP calls to load the app and the configuration again."""
        self.app = app
        self.broker = broker
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
                self.handle_signals()
                self.reap_children()
                self.murder_hung_workers()
                if self.stopping:
                    self.stop_broker_last()
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
        self.log.info("procmqtt starting %s: %d worker(s), broker %s:%d, client id %s",
                      self.app_spec, w.count, m.host, m.port, self.client_id)
        if w.concurrency > 1 and not uses_asyncio(self.app):
            self.log.warning("[workers] concurrency = %d has no effect: %s has no async handlers, so each "
                             "worker handles one message at a time", w.concurrency, self.app.__name__)
        if self.broker is not None and self.broker.pid is not None:
            self.children[self.broker.pid] = Child("broker", BROKER_SLOT, next(self.generations),
                                                   self.broker.pid, time.monotonic())

    def teardown(self) -> None:
        self.signals.close()
        for child in self.children.values():  # only after an internal error
            _kill(child.pid, signal.SIGKILL)
        for child in self.children.values():
            if child.agent_end is not None:
                child.agent_end.close()
        self.upstream_agent.close()
        self.upstream_writers.close()
        if self.metrics_listener is not None:
            self.metrics_listener.close()
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
        name = {"agent": "agent", "broker": "embedded broker"}.get(child.role, f"worker {child.slot}")
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        error = self.last_error(child)
        if error:
            how += f" ({error})"
        if child.role == "broker" and self.broker is not None:
            how += self.broker.last_words()
            self.broker.reaped(code)
        if self.stopping:
            self.log.log(logging.INFO if code == 0 else logging.WARNING, "%s (pid %d) %s", name, child.pid, how)
            return
        if child.role == "agent" and code == ExitCode.AUTH:
            self.give_up(child, ExitCode.AUTH, "the broker refused the credentials; see the agent's error above")
            return
        if child.role == "agent" and self.crash_looping(child, code):
            self.give_up(child, ExitCode.APP, f"the agent failed {AGENT_CRASH_LOOP} times in a row within "
                                              f"{STABLE_AFTER:g}s of starting; the last one {how}")
            return
        if child.role == "worker" and code == ExitCode.APP:
            self.give_up(child, ExitCode.APP, f"worker {child.slot} failed to boot; see the traceback above")
            return
        if child.role == "worker" and self.crash_looping(child, code):
            self.give_up(child, ExitCode.APP, f"worker {child.slot} died {CRASH_LOOP} times in a row within "
                                              f"{STABLE_AFTER:g}s of starting, before handling any message")
            return
        if child.role == "worker" and child.slot >= self.config.workers.count:
            self.log.info("worker %d (pid %d) stopped; %d worker(s) now", child.slot, child.pid,
                          self.config.workers.count)
            return
        if child.role == "worker":
            self.count_restart(child, code)
        if code == 0 and child.role != "broker":  # recycled, reloaded, or asked to leave: replace it at once
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
        if child.kill_at:
            cause = "hung"
        elif child.retiring:
            cause = "reload"
        elif code == 0:
            cause = "recycled"  # or a SIGTERM sent to that worker alone: both leave with code 0
        else:
            cause = signal.Signals(-code).name if code < 0 else f"exit_{code}"
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

    def last_error(self, child: Child) -> str:
        """What a child that crashed with an exception wrote before it exited (``_fork``), or ''."""
        path = _last_error_path(self.state_dir, child.pid)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                error = f.read()
            os.unlink(path)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            self.log.warning("cannot read the last error of pid %d from %s: %s", child.pid, path, exc)
            return ""
        return error

    def murder_hung_workers(self) -> None:
        """A worker past ``[workers] timeout`` on one message: dump its stack, then SIGKILL it."""
        timeout = self.config.workers.timeout
        now = time.monotonic()
        for child in self.children.values():
            if child.kill_at:
                if now >= child.kill_at:
                    _kill(child.pid, signal.SIGKILL)
                continue
            if child.role != "worker" or not timeout:
                continue
            busy = self.shared.busy_since(child.slot)
            if busy and now - busy > timeout:
                self.log.error("worker %d (pid %d) has spent %.1fs on one message (timeout %gs); its stack "
                               "follows, then it is killed", child.slot, child.pid, now - busy, timeout)
                _kill(child.pid, signal.SIGUSR1)  # faulthandler writes every thread's stack to stderr
                child.kill_at = now + DUMP_GRACE

    def reconcile(self) -> None:
        """Start whatever is missing and due: the agent, then each worker slot.

        While a reload restarts the agent, new workers wait for the new agent: the old one, stopping,
        would stop them at once.
        """
        now = time.monotonic()
        running = {c.slot for c in self.children.values()}
        agent_leaving = any(c.role == "agent" and c.retiring for c in self.children.values())
        broker = (BROKER_SLOT,) if self.broker is not None else ()
        for slot in (*broker, -1, *range(self.config.workers.count)):
            if slot >= 0 and agent_leaving:
                break
            if slot not in running and now >= self.restart_at.get(slot, 0.0):
                self.restart_at.pop(slot, None)
                if slot == BROKER_SLOT:
                    self.spawn_broker()
                elif slot == -1:
                    self.spawn_agent()
                else:
                    self.spawn_worker(slot)

    def spawn_broker(self) -> None:
        """Restart the embedded broker on the same port; the agent's reconnect finds it there."""
        assert self.broker is not None
        pid = self.broker.spawn()
        self.children[pid] = Child("broker", BROKER_SLOT, next(self.generations), pid, time.monotonic())
        self.log.info("started embedded broker (pid %d) on %s", pid, self.broker.url)

    def spawn_agent(self) -> None:
        workers = {c.slot: (c.generation, c.agent_end) for c in self.children.values() if c.agent_end}
        keep = [self.upstream_agent, *(sock for _, sock in workers.values())]

        if self.metrics_listener is not None:
            keep.append(self.metrics_listener)
            # a new agent starts from zero; restart totals live here
            self.control.extend(channel.Restarts(cause, n) for cause, n in self.restarts.items())
        # the agent that was told to retire these may have died before it told them
        self.control.extend(channel.Retire(c.slot, c.generation) for c in self.children.values()
                            if c.role == "worker" and c.retiring)
        # a new agent inherits only live workers: exits not yet sent mean nothing to it
        self.control = deque(r for r in self.control if not isinstance(r, channel.WorkerExited))

        def main() -> int:
            agent = Agent(self.config, self.client_id, self.upstream_agent, workers,  # type: ignore[arg-type]
                          self.state_dir, self.pid, self.shared, self.metrics_listener)
            return agent.run()
        self._fork("agent", -1, main, keep)

    def spawn_worker(self, slot: int) -> None:
        self.shared.reset_slot(slot)
        agent_end, worker_end = channel.pair()
        generation = next(self.generations)

        def main() -> int:
            return serve(self.app, slot, generation, self.config, worker_end, self.upstream_writers, self.shared)
        child = self._fork(f"worker-{slot}", slot, main, [worker_end, self.upstream_writers],
                           generation=generation)
        worker_end.close()
        child.agent_end = agent_end
        self.control.append(channel.WorkerUp(slot, generation, agent_end))

    def _fork(self, role: str, slot: int, main: Callable[[], int], keep: list[socket.socket],
              generation: int | None = None) -> Child:
        generation = generation if generation is not None else next(self.generations)
        pid = os.fork()
        if pid == 0:  # child: never returns into the supervisor's code
            code: int = ExitCode.FORCED
            try:
                logs.set_role(role)
                proctitle.set_title(role.replace("-", " "), self.app_spec)
                self.signals.close()
                for signum in _SUPERVISOR_ONLY:
                    signal.signal(signum, signal.SIG_IGN)
                self._close_except(keep)
                code = main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else ExitCode.FORCED
            except Exception as exc:
                self.log.exception("%s crashed", role)
                try:
                    _write_last_error(self.state_dir, exc)
                except OSError as error:
                    self.log.warning("cannot leave the error for the supervisor: %s", error)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child = Child(role.split("-")[0], slot, generation, pid, time.monotonic(), revision=self.revision)
        self.children[pid] = child
        self.log.info("started %s (pid %d)", role.replace("-", " "), pid)
        return child

    def _close_except(self, keep: list[socket.socket]) -> None:
        """In a new child: drop the channel ends that belong to other processes."""
        owned = [self.upstream_agent, self.upstream_writers, self.metrics_listener,
                 *(c.agent_end for c in self.children.values() if c.agent_end)]
        for sock in owned:
            if sock is not None and sock not in keep:
                sock.close()

    # --- reload and scaling (SIGHUP, SIGTTIN, SIGTTOU) ------------------------------------------

    def reload(self) -> None:
        """SIGHUP: load the configuration and the app again and adopt them; on error, keep running."""
        if self.loader is None:
            self.log.warning("SIGHUP ignored: this supervisor has nothing to reload from")
            return
        self.log.info("SIGHUP: reloading the configuration and %s", self.app_spec)
        try:
            app, config = self.loader()
        except ProcmqttError as exc:
            self.log.error("reload failed; still running the previous configuration and app: %s", exc)
            return
        except Exception:  # a bug, not a user mistake: still no reason to stop consuming
            self.log.exception("reload failed; still running the previous configuration and app")
            return
        self.previous = (self.revision, self.app, self.config)
        self.adopt(app, config, next(self.revisions))

    def adopt(self, app: type[Worker], config: Config, revision: int) -> None:
        """Switch to ``app`` and ``config``: every worker is replaced gracefully (the new ones fork
        from ``app``), subscription changes go to the running agent, and the agent itself restarts
        gracefully only when a setting it reads at start changed (see ``reload.compare``)."""
        config = with_route_subscriptions(reload.adoptable(self.config, config), app)
        changes = reload.compare(self.config, config)
        self.log.info("reload: %s; %d worker(s), each replaced once it has finished what it holds",
                      changes.describe(), config.workers.count)
        self.app, self.config, self.revision = app, config, revision
        self.client_id = config.mqtt.client_id or default_client_id(self.app_spec)
        self.control.extend(changes.records())
        for child in list(self.children.values()):
            if child.role == "worker" or (child.role == "agent" and changes.agent):
                self.retire(child)
        for slot in [s for s in self.restart_at if s >= config.workers.count]:
            del self.restart_at[slot]

    def give_up(self, child: Child, code: ExitCode, message: str) -> None:
        """A process that cannot work: if the last reload started it, go back to what ran before
        that reload; otherwise stop procmqtt with ``code``."""
        if child.retiring:  # from code already given up on: its replacement runs the current code
            self.log.warning("%s; it was being replaced anyway", message)
            return
        if self.previous is None or child.revision != self.revision:
            self.fatal(code, message)
            return
        revision, app, config = self.previous
        self.previous = None
        self.log.error("%s; going back to the app and configuration from before the reload (fix them, "
                       "then send SIGHUP again)", message)
        self.quick_deaths.clear()
        self.adopt(app, config, revision)

    def scale(self, delta: int) -> None:
        """SIGTTIN / SIGTTOU: one worker more or fewer, never below one. The worker in the highest
        slot leaves gracefully: the agent gives it nothing more, it finishes what it holds."""
        name = "SIGTTIN" if delta > 0 else "SIGTTOU"
        count = self.config.workers.count + delta
        if count < 1:
            self.log.warning("SIGTTOU ignored: procmqtt keeps at least one worker")
            return
        if count > MAX_SLOTS:
            self.log.warning("SIGTTIN ignored: at most %d workers", MAX_SLOTS)
            return
        self.config = replace(self.config, workers=replace(self.config.workers, count=count))
        self.log.info("%s: %d worker(s)", name, count)
        self.restart_at.pop(count, None)
        for child in list(self.children.values()):
            if delta < 0 and child.role == "worker" and child.slot == count:
                self.retire(child)

    def retire(self, child: Child) -> None:
        """Stop one process gracefully through the agent. A worker is given nothing more, finishes
        what it holds and exits; the agent stops its workers, flushes and disconnects."""
        if not child.retiring:
            child.retiring = True
            self.control.append(channel.Retire(child.slot, child.generation) if child.role == "worker"
                                else channel.StopAgent())

    # --- talking to the agent --------------------------------------------------------------------

    def flush_control(self) -> None:
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

    # --- stopping ------------------------------------------------------------------------------

    def begin_stop(self, reason: str) -> None:
        """Graceful stop: the agent stops dispatching, workers finish, publishes flush."""
        if self.stopping:
            return
        self.stopping = True
        self.restart_at.clear()
        timeout = self.config.workers.graceful_timeout
        self.stop_deadline = time.monotonic() + timeout + STOP_MARGIN
        self.log.info("%s: stopping gracefully (up to %gs)", reason, timeout)
        self.control.append(channel.StopAgent())

    def drive_stop(self) -> None:
        agent_alive = any(c.role == "agent" for c in self.children.values())
        if not agent_alive and not self.workers_signalled:
            # Without an agent no one tells the workers to stop; do it directly.
            self.workers_signalled = True
            for child in self.children.values():
                if child.role == "worker":
                    _kill(child.pid, signal.SIGTERM)
        if time.monotonic() >= self.stop_deadline:
            self.log.error("graceful stop timed out; killing %d process(es)", len(self.children))
            self.kill_all()

    def stop_broker_last(self) -> None:
        """Once the agent and the workers are gone, stop the embedded broker (it outlives them so
        the agent can flush its publishes and acknowledgements)."""
        if self.broker is None or any(c.role != "broker" for c in self.children.values()):
            return
        for pid in [pid for pid, c in self.children.items() if c.role == "broker"]:
            del self.children[pid]
        self.broker.stop()
        self.log.info("embedded broker stopped")

    def kill_all(self) -> None:
        self.stopping = True
        self.stop_deadline = time.monotonic() + STOP_MARGIN
        if self.exit_code == ExitCode.OK:
            self.exit_code = ExitCode.FORCED
        for child in self.children.values():
            _kill(child.pid, signal.SIGKILL)

    def fatal(self, code: ExitCode, message: str) -> None:
        self.log.error("%s; stopping with exit code %d", message, code)
        self.exit_code = code
        self.begin_stop("fatal error")


def _last_error_path(state_dir: str, pid: int) -> str:
    return os.path.join(state_dir, f"last-error-{pid}")


def _write_last_error(state_dir: str, exc: Exception) -> None:
    """In a crashing child: one line for the supervisor (exception type, message, where it was raised),
    so a give-up names the error, not only an exit code."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    message = str(exc).replace("\n", " ")
    if len(message) > LAST_ERROR_MAX:
        message = message[:LAST_ERROR_MAX] + "..."
    path = _last_error_path(state_dir, os.getpid())
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{type(exc).__name__}: {message}{where}")
    os.replace(path + ".tmp", path)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
