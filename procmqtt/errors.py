"""Exit codes and the errors that map to them: one table, shared by every process."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of ``procmqtt``; documented in docs/operations.md."""

    OK = 0
    """Stopped gracefully."""
    FORCED = 1
    """Stopped forcibly (a second signal or the graceful timeout) or an internal error."""
    USAGE = 2
    """Bad command line, configuration, ``@route`` or handler return annotation."""
    APP = 3
    """The app could not be imported, is not a Worker subclass, or a worker failed to boot; a worker
    slot or the agent kept dying right after start (a crash loop)."""
    AUTH = 4
    """The broker refused our credentials."""


class ProcmqttError(Exception):
    """A user mistake with a one-line explanation; never shown as a traceback."""

    exit_code = ExitCode.FORCED


_CONTROL = {c: repr(chr(c))[1:-1] for c in (*range(32), 127) if chr(c) != "\t"}


class ConfigError(ProcmqttError):
    """A mistake in the command line, the environment or the configuration: exit 2, one line.

    The line quotes what the user gave (a key, a path, a variable's value); a newline or an escape
    sequence in it is shown escaped (``\\n``), so the message stays one line and cannot drive the
    terminal.
    """

    exit_code = ExitCode.USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message.translate(_CONTROL))


class AppError(ProcmqttError):
    exit_code = ExitCode.APP


class RouteError(AppError):
    """A ``@route`` that cannot work (bad filter, qos or parameter): a usage mistake, found at load."""

    exit_code = ExitCode.USAGE


class HandlerError(AppError):
    """A handler declared to return what procmqtt cannot honour (not None or an ``Outcome``): found at load."""

    exit_code = ExitCode.USAGE


class PublishBufferFull(RuntimeError):
    """``Worker.publish`` waited ``[mqtt] publish_timeout`` for room in the agent's publish buffer."""


class RequestFailed(RuntimeError):
    """``Worker.request`` could not publish its request (refused by the broker, or the agent gone)."""
