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
    run.add_argument("--broker", metavar="URL",
                     help="mqtt://[user@]host[:port], overrides [mqtt]; or 'embedded': a private mosquitto "
                          "on a free loopback port, started and stopped with the app (local development)")
    run.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    demo = commands.add_parser("demo", help="see procmqtt work: a private broker, an app, a stream, a live view",
                               description="Start a private mosquitto, run the demo app on N workers, publish "
                                           "a steady stream to it and show a live view, then a summary.")
    demo.add_argument("-w", "--workers", type=int, default=4, metavar="N", help="worker processes (default 4)")
    demo.add_argument("--seconds", type=float, default=10.0, metavar="S",
                      help="how long to stream (default 10; Ctrl-C stops earlier)")
    demo.add_argument("--rate", type=float, default=200.0, metavar="MSGS",
                      help="messages per second (default 200)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"run": _run, "demo": _demo}
    if args.command not in commands:
        _parser().print_help(sys.stderr)
        return ExitCode.USAGE
    return commands[args.command](args)


def _run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    log = logs.get()
    try:
        from .app import load_app
        from .supervisor import Supervisor

        broker = None
        if args.broker == "embedded":
            from .embedded import EmbeddedBroker
            broker = EmbeddedBroker()  # finds the binary and a port; starts below, after every check
            args.broker = broker.url
        config = config_mod.with_overrides(config_mod.load(args.config), workers=args.workers,
                                           broker=args.broker)
        app = load_app(args.app)
        if broker is not None:
            broker.start()
    except ProcmqttError as exc:
        print(f"procmqtt: error: {exc}", file=sys.stderr)
        if exc.__cause__ is not None:
            log.debug("cause", exc_info=exc.__cause__)
        return exc.exit_code
    if not config.mqtt.topics:
        log.warning("no [mqtt.topics] configured; the app receives only what it subscribes to at runtime")
    try:
        return Supervisor(app, args.app, config, broker=broker).run()
    finally:
        if broker is not None:
            broker.stop()


def _demo(args: argparse.Namespace) -> int:
    from .demo import Demo

    try:
        return Demo(workers=args.workers, seconds=args.seconds, rate=args.rate).run()
    except ProcmqttError as exc:
        print(f"procmqtt: error: {exc}", file=sys.stderr)
        return exc.exit_code


def entry() -> None:
    """Console-script entry point."""
    logging.captureWarnings(True)
    sys.exit(main())
