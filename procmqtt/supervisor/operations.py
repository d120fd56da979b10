"""What the supervisor's signals ask for: reload (SIGHUP), scale (SIGTTIN/SIGTTOU), stop
(SIGTERM/SIGINT gracefully, SIGQUIT or a second one at once), and giving up on a child that cannot work.

A mixin of ``Supervisor`` (``arbiter.py``), kept apart so the arbiter reads as one pass. Every
method runs in the supervisor process, inside that pass: it changes the supervisor's state and
queues records for the agent (``control``); it never forks and never waits. ``reconcile`` then
starts whatever the new state lacks.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from procmqtt.config import MAX_SLOTS, Config, default_client_id, reload
from procmqtt.config.reload import Changes
from procmqtt.errors import ExitCode, ProcmqttError
from procmqtt.ipc import channel
from procmqtt.supervisor.children import Child, kill
from procmqtt.worker.base import Worker
from procmqtt.worker.routes import with_route_subscriptions

if TYPE_CHECKING:
    from procmqtt.supervisor.children import Sidecar

Loader = Callable[[], tuple[type[Worker], Config]]
"""Loads the app and the configuration again, as ``procmqtt run`` did; raises ``ProcmqttError``."""

STOP_MARGIN = 5.0
"""Seconds past ``graceful_timeout`` before the supervisor SIGKILLs what is left."""


class Operations:
    """Reload, scale, stop and give up; mixed into ``Supervisor``, which sets these attributes."""

    app: type[Worker]
    app_spec: str
    config: Config
    client_id: str
    loader: Loader | None
    revision: int
    revisions: itertools.count[int]
    previous: tuple[int, type[Worker], Config] | None
    sidecar: Sidecar | None
    children: dict[int, Child]
    restart_at: dict[int, float]
    quick_deaths: dict[int, int]
    control: deque[channel.Record]
    stopping: bool
    stop_deadline: float
    workers_signalled: bool
    exit_code: ExitCode
    log: logging.Logger

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
        self.log.info(
            "reload: %s; %d worker(s), each replaced once it has finished what it holds",
            changes.describe(),
            config.workers.count,
        )
        self.app, self.config, self.revision = app, config, revision
        self.client_id = config.mqtt.client_id or default_client_id(self.app_spec)
        self.control.extend(subscription_records(changes))
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
        self.log.error(
            "%s; going back to the app and configuration from before the reload (fix them, then send SIGHUP again)",
            message,
        )
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
            self.control.append(
                channel.Retire(child.slot, child.generation) if child.role == "worker" else channel.StopAgent()
            )

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
        """Each pass while stopping: signal the workers if the agent is gone, SIGKILL at the deadline."""
        agent_alive = any(c.role == "agent" for c in self.children.values())
        if not agent_alive and not self.workers_signalled:
            # Without an agent no one tells the workers to stop; do it directly.
            self.workers_signalled = True
            for child in self.children.values():
                if child.role == "worker":
                    kill(child.pid, signal.SIGTERM)
        if time.monotonic() >= self.stop_deadline:
            self.log.error("graceful stop timed out; killing %d process(es)", len(self.children))
            self.kill_all()

    def stop_sidecar_last(self) -> None:
        """Once the agent and the workers are gone, stop the sidecar (the embedded broker outlives
        them so the agent can flush its publishes and acknowledgements)."""
        if self.sidecar is None or any(c.role != "sidecar" for c in self.children.values()):
            return
        for pid in [pid for pid, c in self.children.items() if c.role == "sidecar"]:
            del self.children[pid]
        self.sidecar.stop()
        self.log.info("%s stopped", self.sidecar.name)

    def kill_all(self) -> None:
        """SIGQUIT, a second SIGTERM/SIGINT, or the stop deadline: SIGKILL every child now."""
        self.stopping = True
        self.stop_deadline = time.monotonic() + STOP_MARGIN
        if self.exit_code == ExitCode.OK:
            self.exit_code = ExitCode.FORCED
        for child in self.children.values():
            kill(child.pid, signal.SIGKILL)

    def fatal(self, code: ExitCode, message: str) -> None:
        """Stop gracefully and leave with ``code``: something procmqtt cannot fix by restarting."""
        self.log.error("%s; stopping with exit code %d", message, code)
        self.exit_code = code
        self.begin_stop("fatal error")


def subscription_records(changes: Changes) -> list[channel.Record]:
    """What the running agent is sent for a reload's topic changes; it applies them to its
    subscriptions and to the broker, as it does a worker's ``self.subscribe``."""
    return [
        *(channel.Unsubscribe(f) for f in changes.unsubscribe),
        *(channel.Subscribe(s.topic_filter, s.qos) for s in changes.subscribe),
    ]
