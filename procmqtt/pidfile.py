"""``--pid FILE``: the supervisor's pid, for init scripts, logrotate and ``kill -HUP $(cat FILE)``.

Written before anything is forked, removed when the supervisor exits. A file left behind by a
procmqtt that was SIGKILLed is stale and simply replaced; one that names a live procmqtt stops the
new one with exit code 2, so two copies never consume with one client id.
"""

from __future__ import annotations

import os

from .errors import ConfigError


class PidFile:
    """Runs in the supervisor only (forked children never reach ``remove``: they leave with ``_exit``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = 0

    def create(self) -> None:
        """Write our pid; raises ``ConfigError`` when the file names another live procmqtt."""
        pid = os.getpid()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            except OSError as exc:
                raise ConfigError(f"--pid {self.path}: cannot create: {exc.strerror}") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{pid}\n")
            self.pid = pid
            return
        raise ConfigError(f"--pid {self.path}: another process keeps creating this file")

    def remove(self) -> None:
        """Remove the file if it still holds our pid (a newer procmqtt may have taken it over)."""
        if self.pid and _read_pid(self.path) == self.pid:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.pid = 0

    def _clear_stale(self) -> None:
        other = _read_pid(self.path)
        if other is not None and _is_running_procmqtt(other):
            raise ConfigError(f"--pid {self.path}: procmqtt is already running with pid {other}; stop it "
                              f"first (or delete {self.path} if that process is not procmqtt)")
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"--pid {self.path}: cannot replace the stale file: {exc.strerror}") from None


def _read_pid(path: str) -> int | None:
    """The pid in ``path``; None when missing, empty or not a number (a stale or foreign file)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_running_procmqtt(pid: int) -> bool:
    """Alive and a procmqtt: a pid reused by an unrelated process makes the file stale, not live.

    Our own pid is never "another procmqtt": in a container procmqtt is pid 1 on every start, and
    the file may survive on a volume.
    """
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    if not os.path.isdir("/proc"):
        return True  # cannot tell which program it is: assume the worst
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"procmqtt" in f.read()  # empty for a zombie
    except FileNotFoundError:
        return False  # exited meanwhile
    except OSError:
        return True  # cannot tell: assume the worst
