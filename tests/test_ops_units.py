"""Unit tests of the operations parts, in process: reload decisions, app re-import, pid file, log file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from harness import wait_until

from procmqtt import logs
from procmqtt.cli.app import reload_app
from procmqtt.config import MAX_SLOTS, Config, MetricsConfig, Secret, from_mapping
from procmqtt.config.reload import Changes, adoptable, compare
from procmqtt.errors import AppError, ConfigError, ExitCode
from procmqtt.ipc import channel
from procmqtt.supervisor.arbiter import Supervisor
from procmqtt.supervisor.children import Child
from procmqtt.supervisor.operations import subscription_records
from procmqtt.supervisor.pidfile import PidFile, is_supervisor_command
from procmqtt.worker.base import Worker


def config(
    topics: dict[str, int] | None = None, mqtt: dict | None = None, workers: dict | None = None, app: dict | None = None
) -> Config:
    return from_mapping(
        {
            "mqtt": {**(mqtt or {}), "topics": {f: {"qos": q} for f, q in (topics or {}).items()}},
            "workers": workers or {},
            "app": app or {},
        }
    )


# --- what a reload changes ------------------------------------------------------------------------


@pytest.mark.unit
def test_topic_changes_become_subscribe_and_unsubscribe_records():
    old = config({"a/#": 1, "b/#": 1, "c/#": 0})
    new = config({"b/#": 1, "c/#": 1, "d/+": 2})
    changes = compare(old, new)
    assert changes.agent == () and changes.needs_restart == ()
    assert subscription_records(changes) == [
        channel.Unsubscribe("a/#"),
        channel.Subscribe("c/#", 1),
        channel.Subscribe("d/+", 2),
    ]
    assert changes.describe() == "subscribe c/# (qos 1), d/+ (qos 2); unsubscribe a/#"


@pytest.mark.unit
def test_same_config_changes_nothing():
    changes = compare(config({"a/#": 1}, app={"x": 1}), config({"a/#": 1}, app={"x": 1}))
    assert changes == Changes()
    assert changes.describe() == "no subscription or connection change"


@pytest.mark.parametrize(
    "key, value",
    [
        ("host", "elsewhere"),
        ("port", 1884),
        ("client_id", "other"),
        ("keepalive", 30),
        ("protocol", "5"),
        ("username", "svc"),
        ("password", "new-secret"),
        ("share_group", "group-xyz"),
    ],
)
@pytest.mark.unit
def test_connection_settings_restart_the_agent_and_never_show_values(key, value):
    changes = compare(config({"a/#": 1}), config({"a/#": 1}, mqtt={key: value}))
    assert changes.agent == (f"[mqtt] {key}",)
    assert str(value) not in changes.describe().replace(f"[mqtt] {key}", "")


@pytest.mark.unit
def test_worker_side_settings_need_no_new_agent():
    old = config(mqtt={"publish_buffer": 10}, workers={"count": 2, "timeout": 5, "max_messages": 0}, app={"a": 1})
    new = config(mqtt={"publish_buffer": 20}, workers={"count": 4, "timeout": 9, "max_messages": 100}, app={"a": 2})
    assert compare(old, new) == Changes()


@pytest.mark.unit
def test_agent_side_worker_settings_restart_the_agent():
    changes = compare(config(), config(workers={"prefetch": 4, "on_error": "retry"}))
    assert changes.agent == ("[workers] prefetch", "[workers] on_error")


@pytest.mark.unit
def test_sections_a_reload_cannot_apply_are_kept_and_reported():
    old = config()
    new = replace(config(app={"v": 2}), metrics=MetricsConfig(port=9999))
    assert compare(old, new).needs_restart == ("[metrics]",)
    kept = adoptable(old, new)
    assert kept.metrics == old.metrics and kept.app == {"v": 2}


@pytest.mark.unit
def test_secret_compares_by_value():
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")


# --- the app imported again ----------------------------------------------------------------------

APP = """
from procmqtt import Worker
VERSION = {version!r}
class App(Worker):
    def on_message(self, message):
        pass
"""


@pytest.mark.unit
def test_reload_app_imports_a_file_app_afresh(tmp_path):
    path = tmp_path / "reloadable_file_app.py"
    path.write_text(APP.format(version="one"))
    first = reload_app(f"{path}:App")
    path.write_text(APP.format(version="number two"))  # another size: no stale bytecode
    second = reload_app(f"{path}:App")
    assert sys.modules[first.__module__].VERSION == "number two"
    assert second is not first and first.on_message.__globals__["VERSION"] == "one"


@pytest.mark.unit
def test_reload_app_imports_a_package_afresh_and_restores_it_on_error(tmp_path, monkeypatch):
    pkg = tmp_path / "reloadable_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("NAME = 'first'\n")
    (pkg / "app.py").write_text(
        "from procmqtt import Worker\nfrom .helpers import NAME\n"
        "class App(Worker):\n    name = NAME\n\n"
        "    def on_message(self, message):\n        pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        first = reload_app("reloadable_pkg.app:App")
        assert first.name == "first"
        (pkg / "helpers.py").write_text("NAME = 'second one'\n")
        assert reload_app("reloadable_pkg.app:App").name == "second one"  # helpers reloaded too
        running = sys.modules["reloadable_pkg.app"]
        (pkg / "helpers.py").write_text("NAME = (\n")
        with pytest.raises(AppError, match="SyntaxError"):
            reload_app("reloadable_pkg.app:App")
        assert sys.modules["reloadable_pkg.app"] is running  # the running code is untouched
    finally:
        for name in [n for n in sys.modules if n.startswith("reloadable_pkg")]:
            del sys.modules[name]


@pytest.mark.unit
def test_reload_app_never_drops_procmqtt_itself():
    import procmqtt.worker.base

    with pytest.raises(AppError):
        reload_app("procmqtt.worker.base:NoSuchClass")
    assert sys.modules["procmqtt.worker.base"] is procmqtt.worker.base and "procmqtt" in sys.modules


# --- pid file ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_pid_file_written_and_removed(tmp_path):
    path = tmp_path / "p.pid"
    pidfile = PidFile(str(path))
    pidfile.create()
    assert path.read_text() == f"{os.getpid()}\n"
    pidfile.remove()
    assert not path.exists()


def test_stale_pid_files_are_replaced(tmp_path):
    path = tmp_path / "p.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    for stale in (f"{dead.pid}\n", "", f" {dead.pid} ", str(os.getpid())):  # ours: pid 1 again in a container
        path.write_text(stale)
        pidfile = PidFile(str(path))
        pidfile.create()
        assert path.read_text() == f"{os.getpid()}\n"
        pidfile.remove()


@pytest.mark.parametrize(
    "content", [b"garbage\n", b"12 34\n", b"1234\nmore notes\n", b"x" * 4096, b"\x00\x01", b"-5\n"]
)
@pytest.mark.unit
def test_a_file_that_is_not_a_pid_file_is_never_deleted(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^--pid {path}: exists and is not a pid file .*not replaced"):
        PidFile(str(path)).create()
    assert path.read_bytes() == content


@pytest.mark.unit
def test_a_pid_path_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block startup forever
    link = tmp_path / "link.pid"
    link.symlink_to(tmp_path / "target")
    (tmp_path / "target").write_text("1\n")
    for path in (fifo, link, tmp_path):
        with pytest.raises(ConfigError, match="exists and is not a pid file"):
            PidFile(str(path)).create()
    assert (tmp_path / "target").read_text() == "1\n" and link.is_symlink()


@pytest.mark.parametrize(
    "argv, supervisor",
    [
        (["procmqtt: supervisor [app:A]"], True),  # the title, with setproctitle
        ([sys.executable, "-m", "procmqtt", "run", "app:A", "-w", "4"], True),
        (["python3", "-u", "-X", "dev", "-m", "procmqtt", "run", "app:A"], True),
        (["/usr/bin/python3.11", "-mprocmqtt", "run", "app:A"], True),
        (["/srv/venv/bin/python3", "/srv/venv/bin/procmqtt", "run", "app:A", "--pid", "/run/p.pid"], True),
        (["/srv/venv/bin/procmqtt", "run", "app:A"], True),
        (["tail", "-f", "procmqtt-notes.txt"], False),  # issue 11: this blocked every start
        (["vim", "procmqtt/cli/main.py"], False),
        (["procmqtt: agent [app:A]"], False),
        (["procmqtt: worker 2 [app:A]"], False),
        ([sys.executable, "-m", "procmqtt", "status"], False),
        ([sys.executable, "-m", "procmqtt", "check", "app:A"], False),
        (["/srv/venv/bin/procmqtt", "demo"], False),
        ([sys.executable, "-c", "import time; time.sleep(30)", "procmqtt", "run"], False),
        ([sys.executable, "-m", "pytest", "-m", "procmqtt", "run"], False),
        ([sys.executable, "myscript.py", "-m", "procmqtt", "run"], False),
        (["bash", "-c", "procmqtt run app:A"], False),
        ([], False),
        ([""], False),
    ],
)
@pytest.mark.unit
def test_supervisor_command_lines(argv, supervisor):
    assert is_supervisor_command([arg.encode() for arg in argv]) is supervisor


def _fake_procmqtt(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """A process whose command line is ``python -m procmqtt ARGS`` but which only sleeps."""
    package = tmp_path / "fake" / "procmqtt"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("import time\ntime.sleep(30)\n")
    return subprocess.Popen([sys.executable, "-m", "procmqtt", *args], cwd=tmp_path / "fake")


@pytest.mark.parametrize("kind", ["supervisor", "tail", "status"])
def test_a_live_pid_refuses_the_start_only_when_it_is_a_procmqtt_supervisor(tmp_path, kind):
    path = tmp_path / "p.pid"
    (tmp_path / "procmqtt-notes.txt").write_text("notes\n")
    if kind == "tail":  # a pid reused by something else makes the file stale, whatever its arguments say
        other = subprocess.Popen(["tail", "-f", str(tmp_path / "procmqtt-notes.txt")], stdout=subprocess.DEVNULL)
    else:
        args = ("run", "app:A", "--pid", str(path)) if kind == "supervisor" else ("status",)
        other = _fake_procmqtt(tmp_path, *args)
    try:  # right after exec the kernel shows an empty or the parent's command line for a moment
        wait_until(lambda: Path(f"/proc/{other.pid}/cmdline").read_bytes().count(b"\0") > 2, 5, "the command line")
        path.write_text(f"{other.pid}\n")
        if kind == "supervisor":
            with pytest.raises(ConfigError, match=rf"--pid .*p\.pid: procmqtt is already running with pid {other.pid}"):
                PidFile(str(path)).create()
            assert path.read_text() == f"{other.pid}\n"
        else:
            PidFile(str(path)).create()
            assert path.read_text() == f"{os.getpid()}\n"
    finally:
        other.kill()
        other.wait()


@pytest.mark.unit
def test_remove_leaves_a_file_another_process_took_over(tmp_path):
    path = tmp_path / "p.pid"
    pidfile = PidFile(str(path))
    pidfile.create()
    path.write_text("12345\n")
    pidfile.remove()
    assert path.read_text() == "12345\n"


@pytest.mark.unit
def test_pid_file_in_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--pid .*/nope/p\.pid: cannot create: No such file or directory"):
        PidFile(str(tmp_path / "nope" / "p.pid")).create()


# --- log file ------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved


@pytest.mark.unit
def test_log_file_follows_a_rename_and_reopen_says_so(tmp_path, restore_logging):
    path = tmp_path / "procmqtt.log"
    logs.setup("INFO")
    logs.to_file(str(path))
    log = logs.get("test")
    log.info("before rotation")
    os.rename(path, tmp_path / "procmqtt.log.1")
    assert logs.reopen() is True
    log.info("after rotation")
    assert "before rotation" in (tmp_path / "procmqtt.log.1").read_text()
    new = path.read_text()
    assert "after rotation" in new and "before rotation" not in new
    assert "[supervisor] INFO after rotation" in new  # the same format as on stderr


@pytest.mark.unit
def test_reopen_without_a_log_file_does_nothing(restore_logging):
    logs.setup("INFO")
    assert logs.reopen() is False


@pytest.mark.unit
def test_unwritable_log_file_is_a_clear_error(tmp_path, restore_logging):
    logs.setup("INFO")
    with pytest.raises(ConfigError, match=r"--log-file .*/nope/x\.log: cannot open: No such file or directory"):
        logs.to_file(str(tmp_path / "nope" / "x.log"))


def test_run_refuses_a_bad_log_file_before_starting(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "procmqtt",
            "run",
            "tests/apps.py:Recorder",
            "--log-file",
            str(tmp_path / "nope" / "x.log"),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("cannot open: No such file or directory")
    assert "Traceback" not in result.stderr


# --- the supervisor's decisions, one call at a time (no processes) -------------------------------


class _App(Worker):
    def on_message(self, message: object) -> None:
        pass


class _NewApp(_App):
    pass


def supervisor(**workers: int) -> Supervisor:
    sup = Supervisor(_App, "tests:App", config({"a/#": 1}, workers=workers or {"count": 2}))
    for pid, (role, slot) in enumerate([("agent", -1), *(("worker", s) for s in range(sup.config.workers.count))]):
        sup.children[1000 + pid] = Child(role, slot, generation=10 + pid, pid=1000 + pid, started=0.0)
    return sup


@pytest.mark.unit
def test_sigttou_retires_the_highest_slot_and_never_goes_below_one():
    sup = supervisor(count=2)
    sup.scale(-1)
    assert sup.config.workers.count == 1
    assert list(sup.control) == [channel.Retire(1, 12)]
    sup.scale(-1)
    assert sup.config.workers.count == 1 and len(sup.control) == 1


@pytest.mark.unit
def test_sigttin_is_not_limited_by_the_publish_buffer_only_by_the_slots():
    """The agent queues publishes past paho's 16-bit message ids (outbox.py): no cap on workers."""
    sup = Supervisor(_App, "tests:App", config(mqtt={"publish_buffer": 30_000}, workers={"count": MAX_SLOTS - 1}))
    sup.scale(+1)
    assert sup.config.workers.count == MAX_SLOTS
    sup.scale(+1)
    assert sup.config.workers.count == MAX_SLOTS


@pytest.mark.unit
def test_adopt_sends_subscription_changes_then_retires_workers_and_keeps_the_agent():
    sup = supervisor(count=2)
    sup.adopt(_NewApp, config({"b/#": 1}, workers={"count": 2}), 1)
    assert sup.app is _NewApp and sup.revision == 1
    assert list(sup.control) == [
        channel.Unsubscribe("a/#"),
        channel.Subscribe("b/#", 1),
        channel.Retire(0, 11),
        channel.Retire(1, 12),
    ]


@pytest.mark.unit
def test_adopt_with_a_connection_change_also_stops_the_agent_once():
    sup = supervisor(count=1)
    sup.adopt(_App, config({"a/#": 1}, mqtt={"port": 1999}, workers={"count": 1}), 1)
    sup.adopt(_App, config({"a/#": 1}, mqtt={"port": 2000}, workers={"count": 1}), 2)
    assert list(sup.control) == [channel.StopAgent(), channel.Retire(0, 11)]


@pytest.mark.unit
def test_a_reloaded_worker_that_cannot_boot_goes_back_an_old_one_is_fatal():
    sup = supervisor(count=1)
    sup.loader = lambda: (_NewApp, config({"a/#": 1}, workers={"count": 1}))
    sup.reload()
    new = Child("worker", 0, generation=99, pid=2000, started=0.0, revision=sup.revision)
    sup.give_up(new, ExitCode.APP, "worker 0 failed to boot")
    assert sup.app is _App and sup.revision == 0 and not sup.stopping
    old = Child("worker", 0, generation=100, pid=2001, started=0.0, revision=0)
    sup.give_up(old, ExitCode.APP, "worker 0 failed to boot")  # nothing left to go back to
    assert sup.stopping and sup.exit_code == ExitCode.APP


@pytest.mark.unit
def test_a_reload_that_cannot_load_changes_nothing():
    sup = supervisor(count=1)

    def broken() -> tuple[type[Worker], Config]:
        raise ConfigError("procmqtt.toml: not valid TOML")

    sup.loader = broken
    sup.reload()
    assert sup.app is _App and sup.revision == 0 and not sup.control and sup.previous is None
