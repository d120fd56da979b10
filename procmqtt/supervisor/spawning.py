"""Forking the supervisor's children: the one place code runs on both sides of a fork.

Mixed into ``Supervisor`` (``arbiter.py``), which sets the attributes declared here. ``spawn_*``
and ``_fork`` run in the supervisor; ``_run_child`` and what it calls run in the new child and
never return into the supervisor's code (gunicorn's lesson: setup in the child is its own step).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import NoReturn

from procmqtt import logs
from procmqtt.agent.loop import Agent
from procmqtt.config import Config
from procmqtt.errors import ExitCode
from procmqtt.ipc import channel
from procmqtt.ipc.shared import SharedState
from procmqtt.ipc.signals import SignalQueue
from procmqtt.supervisor import proctitle
from procmqtt.supervisor.children import SIDECAR_SLOT, Child, Sidecar, write_last_error
from procmqtt.worker.base import Worker
from procmqtt.worker.main import serve

SUPERVISOR_ONLY = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
"""Children ignore these: sent to the whole process group (a closed terminal), only the supervisor acts."""


class Spawning:
    """Starting the sidecar, the agent and the workers; mixed into ``Supervisor``."""

    app: type[Worker]
    app_spec: str
    config: Config
    client_id: str
    revision: int
    pid: int
    state_dir: str
    shared: SharedState
    signals: SignalQueue
    sidecar: Sidecar | None
    children: dict[int, Child]
    generations: itertools.count[int]
    control: deque[channel.Record]
    restarts: dict[str, int]
    upstream_agent: socket.socket
    upstream_writers: socket.socket
    metrics_listener: socket.socket | None
    health_listener: socket.socket | None
    log: logging.Logger

    def spawn_sidecar(self) -> None:
        """Restart the sidecar (the embedded broker comes back on its port; the agent's reconnect finds it)."""
        assert self.sidecar is not None
        pid = self.sidecar.spawn()
        self.children[pid] = Child(
            "sidecar", SIDECAR_SLOT, next(self.generations), pid, time.monotonic(), label=self.sidecar.name
        )
        self.log.info("started %s (pid %d)", self.sidecar.name, pid)

    def spawn_agent(self) -> None:
        """Fork the agent with every live worker's channel; ``main`` runs in the child."""
        workers = {c.slot: (c.generation, c.agent_end) for c in self.children.values() if c.agent_end}
        keep = [self.upstream_agent, *(sock for _, sock in workers.values())]

        keep += [s for s in (self.metrics_listener, self.health_listener) if s is not None]
        if self.metrics_listener is not None:
            # a new agent starts from zero; restart totals live here
            self.control.extend(channel.Restarts(cause, n) for cause, n in self.restarts.items())
        # the agent that was told to retire these may have died before it told them
        self.control.extend(
            channel.Retire(c.slot, c.generation) for c in self.children.values() if c.role == "worker" and c.retiring
        )
        # a new agent inherits only live workers: exits not yet sent mean nothing to it
        self.control = deque(r for r in self.control if not isinstance(r, channel.WorkerExited))

        def main() -> int:
            agent = Agent(
                self.config,
                self.client_id,
                self.upstream_agent,
                workers,
                self.state_dir,
                self.pid,
                self.shared,
                self.metrics_listener,
                self.health_listener,
            )
            return agent.run()

        self._fork("agent", -1, main, keep)

    def spawn_worker(self, slot: int) -> None:
        """Fork a worker for ``slot``; ``main`` runs in the child, the supervisor passes the agent's
        end of the new channel to the agent (``WorkerUp``)."""
        self.shared.reset_slot(slot)
        agent_end, worker_end = channel.pair()
        generation = next(self.generations)

        def main() -> int:
            return serve(self.app, slot, generation, self.config, worker_end, self.upstream_writers, self.shared)

        child = self._fork(f"worker-{slot}", slot, main, [worker_end, self.upstream_writers], generation=generation)
        worker_end.close()
        child.agent_end = agent_end
        self.control.append(channel.WorkerUp(slot, generation, agent_end))

    def _fork(
        self, role: str, slot: int, main: Callable[[], int], keep: list[socket.socket], generation: int | None = None
    ) -> Child:
        """Fork a child running ``main``; in the supervisor, record it and return its ``Child``."""
        generation = generation if generation is not None else next(self.generations)
        pid = os.fork()
        if pid == 0:
            self._run_child(role, main, keep)
        child = Child(role.split("-")[0], slot, generation, pid, time.monotonic(), revision=self.revision)
        self.children[pid] = child
        self.log.info("started %s (pid %d)", role.replace("-", " "), pid)
        return child

    def _run_child(self, role: str, main: Callable[[], int], keep: list[socket.socket]) -> NoReturn:
        """In the new child: its own setup, then ``main``; never returns into the supervisor's code."""
        code: int = ExitCode.FORCED
        try:
            logs.set_role(role)
            proctitle.set_title(role.replace("-", " "), self.app_spec)
            self.signals.close()
            for signum in SUPERVISOR_ONLY:
                signal.signal(signum, signal.SIG_IGN)
            self._close_except(keep)
            code = main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else ExitCode.FORCED
        except Exception as exc:
            self.log.exception("%s crashed", role)
            try:
                write_last_error(self.state_dir, exc)
            except OSError as error:
                self.log.warning("cannot leave the error for the supervisor: %s", error)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _close_except(self, keep: list[socket.socket]) -> None:
        """In a new child: drop the channel ends that belong to other processes."""
        owned = [
            self.upstream_agent,
            self.upstream_writers,
            self.metrics_listener,
            self.health_listener,
            *(c.agent_end for c in self.children.values() if c.agent_end),
        ]
        for sock in owned:
            if sock is not None and sock not in keep:
                sock.close()
