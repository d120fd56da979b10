"""One log format for every process: time, pid, role, level, message, on stderr."""

from __future__ import annotations

import logging
import sys

LOGGER = "procmqtt"
FORMAT = "%(asctime)s [%(process)d] [%(role)s] %(levelname)s %(message)s"

_role = "supervisor"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


def setup(level: str = "INFO") -> None:
    """Install the stderr handler on the root logger; called once, in the supervisor."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
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
