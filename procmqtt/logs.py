"""One log format for every process, on stderr: every line carries time, level, role and pid.

``text`` is for people at a terminal; ``json`` (one object per line) is for log collectors. The
handler is installed once, in the supervisor; forked children inherit it and only change their
role (``set_role``), so the agent and the workers write the same format with no set-up of their own.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

LOGGER = "procmqtt"
FORMAT = "%(asctime)s [%(process)d] [%(role)s] %(levelname)s %(message)s"
FORMATS = ("text", "json")
DEFAULT_FORMAT = "text"

_role = "supervisor"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, role, pid, logger, message, exc_info.

    A traceback stays inside the object (``exc_info`` text), so every line parses on its own.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "role": getattr(record, "role", _role),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str = DEFAULT_FORMAT) -> None:
    """Install the stderr handler on the root logger; called once, in the supervisor, before fork."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    handler.addFilter(_RoleFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paho logs nothing unless given a logger; procmqtt reports its events itself.


def set_role(role: str) -> None:
    """Tag every later line of this process; called right after fork."""
    global _role
    _role = role


def get(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)


def to_file(path: str) -> None:
    """``--log-file``: every process logs to ``path`` instead of stderr, in the format ``setup`` chose.

    Called in the supervisor after ``setup``, before fork. ``WatchedFileHandler`` checks at each
    line whether the file was renamed or removed (logrotate) and then opens a new one, so the agent
    and the workers follow a rotation on their own; the supervisor also reopens on SIGUSR1
    (``reopen``). Raises ``ConfigError`` when the file cannot be opened.
    """
    from logging.handlers import WatchedFileHandler

    from procmqtt.errors import ConfigError

    try:
        handler = WatchedFileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--log-file {path}: cannot open: {exc.strerror}") from None
    root = logging.getLogger()
    handler.setFormatter(root.handlers[0].formatter if root.handlers else logging.Formatter(FORMAT))
    handler.addFilter(_RoleFilter())
    root.handlers[:] = [handler]


def reopen() -> bool:
    """SIGUSR1 (in the supervisor): reopen the log file if it was renamed or removed; False without one."""
    from logging.handlers import WatchedFileHandler

    files = [h for h in logging.getLogger().handlers if isinstance(h, WatchedFileHandler)]
    for handler in files:
        handler.reopenIfNeeded()
    return bool(files)
