"""``--pid FILE``: the supervisor's pid, for init scripts, logrotate and ``kill -HUP $(cat FILE)``.

Written before anything is forked, removed when the supervisor exits. A file left behind by a
procmqtt that was SIGKILLed is stale and simply replaced; one that names a live procmqtt supervisor
stops the new one with exit code 2, so two copies never consume with one client id. A file that
is not a pid file (anything but one number) is never deleted: a typo in ``--pid`` must not cost
the user a file.
"""

from __future__ import annotations

import os
import re
import stat

from procmqtt.errors import ConfigError

MAX_PID_FILE_BYTES = 32
"""A pid and a newline are at most 8 bytes on Linux; anything larger is some other file."""

SUPERVISOR_TITLE = b"procmqtt: supervisor ["
"""How ``proctitle.set_title`` names the supervisor (with the optional setproctitle)."""

_PID_TEXT = re.compile(rb"\s*(\d*)\s*")  # empty: created, then killed before the pid was written
_INTERPRETER = re.compile(r"(python|pypy)[\d.]*")  # python3, python3.11, pypy3


class PidFile:
    """Runs in the supervisor only (forked children never reach ``remove``: they leave with ``_exit``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = 0

    def create(self) -> None:
        """Write our pid; raises ``ConfigError`` when the file names another live procmqtt or is not
        a pid file."""
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
        if other is None:
            raise ConfigError(
                f"--pid {self.path}: exists and is not a pid file (it holds more than a "
                "process id); not replaced: check the path, or delete the file"
            )
        if other and _is_running_procmqtt(other):
            raise ConfigError(
                f"--pid {self.path}: procmqtt is already running with pid {other}; stop it "
                f"first (or delete {self.path} if that process is not procmqtt)"
            )
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"--pid {self.path}: cannot replace the stale file: {exc.strerror}") from None


def _read_pid(path: str) -> int | None:
    """The pid in ``path``; 0 when it is gone or empty (stale, safe to replace); None when it is
    not a pid file: not a regular file, or anything but one number."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_PID_FILE_BYTES:
            return None  # never open a FIFO or a device to look inside; never follow a symlink
        with open(path, "rb") as f:
            text = f.read(MAX_PID_FILE_BYTES + 1)
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    match = _PID_TEXT.fullmatch(text)
    if match is None:
        return None
    return int(match.group(1) or 0)


def _is_running_procmqtt(pid: int) -> bool:
    """Alive and a procmqtt supervisor: a pid reused by an unrelated process makes the file stale.

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
            return is_supervisor_command(f.read().split(b"\0"))  # empty for a zombie
    except FileNotFoundError:
        return False  # exited meanwhile
    except OSError:
        return True  # cannot tell: assume the worst


def is_supervisor_command(argv: list[bytes]) -> bool:
    """Whether a command line (``/proc/PID/cmdline`` split at NUL) is a ``procmqtt run`` supervisor.

    The argv's shape, not a substring: the process title set by the optional setproctitle
    ("procmqtt: supervisor [APP]"), else what starts one without it: ``python [options] -m procmqtt
    run ...``, or the console script ``[python] .../procmqtt run ...``. ``tail -f procmqtt-notes.txt``,
    ``procmqtt status`` or an editor on ``procmqtt/cli.py`` are not one.
    """
    if not argv or not argv[0]:
        return False
    if argv[0].startswith(SUPERVISOR_TITLE):
        return True
    rest = _procmqtt_arguments([arg.decode(errors="replace") for arg in argv if arg])
    return rest is not None and rest[:1] == ["run"]


def _procmqtt_arguments(args: list[str]) -> list[str] | None:
    """The arguments given to procmqtt by this command line, or None if it does not run procmqtt."""
    name = os.path.basename(args[0])
    if name == "procmqtt":
        return args[1:]
    if not _INTERPRETER.fullmatch(name):
        return None
    i = 1
    while i < len(args):  # the interpreter's options, up to the module or the script
        arg = args[i]
        if arg in ("-W", "-X", "--check-hash-based-pycs"):  # an option with a separate value
            i += 2
        elif arg == "-m":
            return args[i + 2 :] if args[i + 1 : i + 2] == ["procmqtt"] else None
        elif arg.startswith("-m"):
            return args[i + 1 :] if arg == "-mprocmqtt" else None
        elif arg.startswith("-c") or arg == "-":
            return None
        elif not arg.startswith("-"):  # the script: the console script when it is named procmqtt
            return args[i + 1 :] if os.path.basename(arg) == "procmqtt" else None
        else:
            i += 1
    return None
