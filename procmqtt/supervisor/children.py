"""The supervisor's record of each child process, and what a dead child leaves behind.

A child that crashes with an exception writes one line (``write_last_error``, in the child, just
before it exits); the supervisor reads it when it reaps that child (``read_last_error``), so its
log line and a give-up name the error, not only an exit code. Everything else here runs in the
supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import traceback
from dataclasses import dataclass
from typing import Protocol

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

SIDECAR_SLOT = -2
"""The sidecar's slot (``--broker embedded``'s Mosquitto); the agent is -1, workers 0 .. N-1."""


class Sidecar(Protocol):
    """A process started before the supervisor and kept alive beside the agent and the workers,
    stopped last, once they are gone (the CLI hands ``--broker embedded``'s Mosquitto in as one).
    The supervisor restarts it like any child: its ``waitpid(-1)`` reaps it, so it owns it."""

    @property
    def name(self) -> str:
        """How log lines name it, e.g. "embedded broker"."""

    @property
    def pid(self) -> int | None:
        """The running process, or None."""

    def spawn(self) -> int:
        """Start it again (it died); returns the new pid without waiting for it to be ready."""

    def reaped(self, code: int) -> str:
        """The supervisor collected its exit status; returns what to add to the log line."""

    def stop(self) -> None:
        """Stop it for good; called once, after every other child is gone."""


@dataclass
class Child:
    role: str  # "agent", "worker" or "sidecar"
    slot: int  # the worker's id; -1 for the agent, -2 for the sidecar
    generation: int  # unique per fork, so the agent can tell a replacement from a stale record
    pid: int
    started: float
    agent_end: socket.socket | None = None  # a worker's channel, the end the agent uses
    kill_at: float = 0.0  # hung: SIGKILL at this time (after the stack dump)
    revision: int = 0  # which loaded app and configuration it was forked from (SIGHUP adds one)
    retiring: bool = False  # asked to stop gracefully, for a reload or one worker fewer
    label: str = ""  # a sidecar's name

    @property
    def name(self) -> str:
        """How log lines name it: "agent", "worker 3", or the sidecar's name."""
        return self.label or ("agent" if self.role == "agent" else f"worker {self.slot}")


def restart_cause(child: Child, code: int) -> str:
    """Why a worker is being replaced, for the restart metric: hung, reload, recycled, a signal name
    or exit_<code>."""
    if child.kill_at:
        return "hung"
    if child.retiring:
        return "reload"
    if code == 0:
        return "recycled"  # or a SIGTERM sent to that worker alone: both leave with code 0
    return signal.Signals(-code).name if code < 0 else f"exit_{code}"


def describe_exit(code: int) -> str:
    """``code`` as ``os.waitstatus_to_exitcode`` gives it (negative: killed by that signal)."""
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def last_error_path(state_dir: str, pid: int) -> str:
    return os.path.join(state_dir, f"last-error-{pid}")


def write_last_error(state_dir: str, exc: Exception) -> None:
    """In a crashing child: one line for the supervisor (exception type, message, where it was raised),
    so a give-up names the error, not only an exit code."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    message = str(exc).replace("\n", " ")
    if len(message) > LAST_ERROR_MAX:
        message = message[:LAST_ERROR_MAX] + "..."
    path = last_error_path(state_dir, os.getpid())
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{type(exc).__name__}: {message}{where}")
    os.replace(path + ".tmp", path)


def read_last_error(state_dir: str, pid: int, log: logging.Logger) -> str:
    """In the supervisor, once ``pid`` is reaped: what it wrote with ``write_last_error``, or ''."""
    path = last_error_path(state_dir, pid)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            error = f.read()
        os.unlink(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        log.warning("cannot read the last error of pid %d from %s: %s", pid, path, exc)
        return ""
    return error


def kill(pid: int, signum: int) -> None:
    """Signal a child that may have exited already."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
