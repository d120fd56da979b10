"""``procmqtt`` command line: parse, load, check, then hand over to the supervisor."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import __version__, config as config_mod, logs
from .errors import ExitCode, ProcmqttError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procmqtt",
        description="Run MQTT consumers on many CPU cores: one agent holds the connection, "
                    "N worker processes handle the messages.",
    )
    parser.add_argument("--version", action="version", version=f"procmqtt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="run an app", description="Run APP with N worker processes.")
    run.add_argument("app", metavar="APP", help="package.module:Class or path/to/file.py:Class")
    run.add_argument("-c", "--config", metavar="FILE",
                     help=f"TOML configuration (default: ./{config_mod.DEFAULT_PATH} when it exists)")
    run.add_argument("-w", "--workers", type=int, metavar="N", help="number of worker processes")
    run.add_argument("--broker", metavar="URL", help="mqtt://[user@]host[:port], overrides [mqtt]")
    run.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "run":
        _parser().print_help(sys.stderr)
        return ExitCode.USAGE
    logs.setup(args.log_level)
    log = logs.get()
    try:
        from .app import load_app
        from .routes import routes_of
        from .supervisor import Supervisor

        config = config_mod.with_overrides(config_mod.load(args.config), workers=args.workers,
                                           broker=args.broker)
        app = load_app(args.app)
    except ProcmqttError as exc:
        print(f"procmqtt: error: {exc}", file=sys.stderr)
        if exc.__cause__ is not None:
            log.debug("cause", exc_info=exc.__cause__)
        return exc.exit_code
    if not config.mqtt.topics and not routes_of(app):
        log.warning("no [mqtt.topics] configured; the app receives only what it subscribes to at runtime")
    return Supervisor(app, args.app, config).run()


def entry() -> None:
    """Console-script entry point."""
    logging.captureWarnings(True)
    sys.exit(main())
