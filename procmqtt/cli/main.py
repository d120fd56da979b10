"""``procmqtt`` command line: one small function per subcommand, chosen from ``COMMANDS``.

``run`` and ``check`` share one path up to the fork (resolve the configuration, import the app,
collect its routes), so ``check`` fails exactly where and how ``run`` would.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from procmqtt import __version__, logs
from procmqtt import config as config_mod
from procmqtt.agent import metrics
from procmqtt.errors import ConfigError, ExitCode, ProcmqttError

if TYPE_CHECKING:
    from procmqtt.dev.embedded import EmbeddedBroker
    from procmqtt.worker.base import Worker
    from procmqtt.worker.routes import Route

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT_ENV = "PROCMQTT_LOG_FORMAT"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procmqtt",
        description="Run MQTT consumers on many CPU cores: one agent holds the connection, "
        "N worker processes handle the messages.",
    )
    parser.add_argument("--version", action="version", version=f"procmqtt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run an app", description="Run APP with N worker processes.")
    _app_arguments(run)
    run.add_argument(
        "--print-config", action="store_true", help="print the effective configuration (secrets masked) and exit"
    )
    run.add_argument("--pid", metavar="FILE", help="write the supervisor's pid to FILE; removed at exit")
    run.add_argument(
        "--log-file",
        metavar="FILE",
        help="log to FILE instead of stderr; SIGUSR1 to the supervisor reopens it (logrotate)",
    )

    check = commands.add_parser(
        "check",
        help="check an app and its configuration without running it",
        description="Resolve the configuration as run would, import APP, list the subscriptions and "
        "what each reaches, and print the effective configuration (secrets masked). "
        "Never connects to the broker. Exit 0, or the error and exit code run would give.",
    )
    _app_arguments(check)
    check.add_argument(
        "--key-of",
        metavar="TOPIC",
        action="append",
        help='print only the order key TOPIC gets under [workers] order_key (dispatch = "ordered"); repeatable',
    )

    status = commands.add_parser(
        "status",
        help="show a running app's numbers",
        description="Read the [metrics] endpoint of a running procmqtt and print "
        "per-worker counts, msg/s, in-flight, failures and publishes.",
    )
    status.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"TOML configuration (default: ${config_mod.CONFIG_ENV}, else ./{config_mod.DEFAULT_PATH} when it exists)",
    )
    status.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS until Ctrl-C")

    demo = commands.add_parser(
        "demo",
        help="see procmqtt work: a private broker, an app, a stream, a live view",
        description="Start a private mosquitto, run the demo app on N workers, publish "
        "a steady stream to it and show a live view, then a summary.",
    )
    demo.add_argument("-w", "--workers", type=int, default=4, metavar="N", help="worker processes (default 4)")
    demo.add_argument(
        "--seconds", type=float, default=10.0, metavar="S", help="how long to stream (default 10; Ctrl-C stops earlier)"
    )
    demo.add_argument("--rate", type=float, default=200.0, metavar="MSGS", help="messages per second (default 200)")
    return parser


def _app_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of every subcommand that loads an app: APP and what overrides the configuration."""
    parser.add_argument("app", metavar="APP", help="package.module:Class or path/to/file.py:Class")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"TOML configuration (default: ${config_mod.CONFIG_ENV}, else ./{config_mod.DEFAULT_PATH} when it exists)",
    )
    parser.add_argument("-w", "--workers", type=int, metavar="N", help="number of worker processes")
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="mqtt://[user@]host[:port], overrides [mqtt]; or 'embedded': a private mosquitto "
        "on a free loopback port, started and stopped with the app (local development)",
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    parser.add_argument(
        "--log-format", choices=logs.FORMATS, help=f"text (default) or json, one object per line (env {LOG_FORMAT_ENV})"
    )


def _setup_logs(args: argparse.Namespace) -> None:
    fmt = args.log_format or os.environ.get(LOG_FORMAT_ENV) or logs.DEFAULT_FORMAT
    if fmt not in logs.FORMATS:
        expected = ", ".join(f'"{f}"' for f in logs.FORMATS)
        raise ConfigError(f"{LOG_FORMAT_ENV}: expected one of {expected}, got {fmt!r}")
    logs.setup(args.log_level, fmt)


def _embedded_broker(args: argparse.Namespace) -> EmbeddedBroker | None:
    """``--broker embedded``: find mosquitto and a free port, and put its URL in ``args.broker``.
    Nothing starts here; ``run`` starts it after every other check."""
    if args.broker != "embedded":
        return None
    from procmqtt.dev.embedded import EmbeddedBroker

    broker = EmbeddedBroker()
    args.broker = broker.url
    return broker


def _resolve(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.resolve(args.config, workers=args.workers, broker=args.broker)


def _prepare(args: argparse.Namespace) -> tuple[config_mod.Config, type[Worker], tuple[Route, ...]]:
    """Everything ``run`` does before it forks: configuration, app, routes. Raises ProcmqttError."""
    from procmqtt.cli.app import load_app
    from procmqtt.worker.base import uses_asyncio
    from procmqtt.worker.middleware import check_configured
    from procmqtt.worker.routes import routes_of

    config = _resolve(args)
    app = load_app(args.app)
    check_configured(app, config, is_async=uses_asyncio(app))
    return config, app, routes_of(app)


def run(args: argparse.Namespace) -> int:
    from procmqtt.cli.app import split_spec

    _setup_logs(args)
    split_spec(args.app)  # a malformed APP is a usage error (exit 2), with --print-config too
    broker = _embedded_broker(args)
    if args.print_config:
        from procmqtt.cli.check import render_config

        sys.stdout.write(render_config(_resolve(args), args.app))
        return ExitCode.OK
    if args.log_file:
        logs.to_file(args.log_file)
    config, app, routes = _prepare(args)
    metrics_listener = metrics.listen(config)  # before any fork: a port in use stops us here
    from procmqtt.supervisor.arbiter import Supervisor
    from procmqtt.supervisor.pidfile import PidFile

    pidfile = PidFile(args.pid) if args.pid else None
    if pidfile is not None:
        pidfile.create()  # a procmqtt already running with this file stops us here
    try:
        if broker is not None:
            broker.start()
        if not config.mqtt.topics and not routes:
            logs.get().warning(
                "no [mqtt.topics] configured and no routes; the app receives only what it subscribes to at runtime"
            )
        return Supervisor(app, args.app, config, metrics_listener, sidecar=broker, loader=_reloader(args)).run()
    finally:
        if broker is not None:
            broker.stop()
        if pidfile is not None:
            pidfile.remove()


def _reloader(args: argparse.Namespace) -> Callable[[], tuple[type[Worker], config_mod.Config]]:
    """What SIGHUP runs in the supervisor: the configuration resolved as at start, the app imported afresh."""

    def load() -> tuple[type[Worker], config_mod.Config]:
        from procmqtt.cli.app import reload_app
        from procmqtt.worker.base import uses_asyncio
        from procmqtt.worker.middleware import check_configured

        config = _resolve(args)
        app = reload_app(args.app)
        check_configured(app, config, is_async=uses_asyncio(app))
        return app, config

    return load


def check(args: argparse.Namespace) -> int:
    from procmqtt.cli.check import render_check, render_keys

    _setup_logs(args)
    _embedded_broker(args)  # check fails where run would (no mosquitto); the port is only an example
    config, app, routes = _prepare(args)
    if args.key_of:
        sys.stdout.write(render_keys(config, args.key_of))
        return ExitCode.OK
    sys.stdout.write(render_check(args.app, app, config, routes))
    return ExitCode.OK


def status(args: argparse.Namespace) -> int:
    from procmqtt.cli import status as status_mod

    if args.watch is not None and args.watch <= 0:
        raise ConfigError(f"--watch: expected a number of seconds > 0, got {args.watch:g}")
    return status_mod.main(config_mod.resolve(args.config), args.watch)


def demo(args: argparse.Namespace) -> int:
    from procmqtt.dev.demo import Demo

    return Demo(workers=args.workers, seconds=args.seconds, rate=args.rate).run()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": run,
    "check": check,
    "status": status,
    "demo": demo,
}
"""Subcommand -> function; each returns the exit code and may raise ProcmqttError."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = COMMANDS.get(args.command)
    if command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        return command(args)
    except ProcmqttError as exc:
        print(f"procmqtt: error: {exc}", file=sys.stderr)
        if exc.__cause__ is not None:
            logs.get().debug("cause", exc_info=exc.__cause__)
        return exc.exit_code


def entry() -> None:
    """Console-script entry point."""
    logging.captureWarnings(True)
    sys.exit(main())
