"""Process titles, so ``ps`` and ``top`` tell the supervisor, the agent and each worker apart."""

from __future__ import annotations

from collections.abc import Callable

setproctitle: Callable[[str], None] | None
try:
    from setproctitle import setproctitle
except ImportError:  # the optional extra "proctitle" is not installed: keep the plain command line
    setproctitle = None


def set_title(role: str, app_spec: str) -> None:
    """``procmqtt: worker 2 [app:Class]``; called once per process, in that process.

    Built only from the role and APP: never from the configuration or the command line, which may
    hold a broker URL or other things ``ps`` should not show to every user.
    """
    if setproctitle is not None:
        setproctitle(f"procmqtt: {role} [{app_spec}]")
