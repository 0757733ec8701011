"""``celeriac [-A APP] [-b URL] [--result-backend URL] [--workdir DIR] COMMAND ...``: the
parser of every command, and the dispatch to the module of its family.

Bad input ends with one line on stderr and status 2 (usage) before anything starts;
runtime failures (broker unreachable, an error inside the app module) give status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from celeriac.cli import beat, events, flower, remote, tasks, worker
from celeriac.cli.common import (
    EX_FAILURE,
    EX_OK,
    EX_USAGE,
    PROG,
    AppError,
    Parser,
    UsageError,
    add_global_options,
    version,
)

#: The commands that take the parsed command line only.
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "worker": worker.cmd_worker,
    "beat": beat.cmd_beat,
    "inspect": remote.cmd_remote,
    "control": remote.cmd_remote,
    "status": remote.cmd_remote,
    "purge": tasks.cmd_purge,
    "call": tasks.cmd_call,
    "result": tasks.cmd_result,
    "events": events.cmd_events,
}


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description=(
            "celeriac: a Celery-compatible distributed task queue with a Rust core. "
            "Run 'celeriac COMMAND --help' for a command's options."
        ),
        epilog="Example: celeriac -A tasks worker --loglevel=info",
    )
    add_global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=Parser, required=True
    )
    worker.add_parser(commands)
    remote.add_parsers(commands)
    tasks.add_parsers(commands)
    events.add_parser(commands)
    beat.add_parser(commands)
    multi = commands.add_parser("multi", help="start and stop detached workers", add_help=False)
    multi.add_argument("multi_argv", nargs=argparse.REMAINDER)
    flower.add_parser(commands)

    help_cmd = commands.add_parser(
        "help", help="show this help, or a command's help", add_help=False
    )
    help_cmd.add_argument("topic", nargs="?", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``celeriac`` and ``python -m celeriac``; returns the exit status."""
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    ns, passed_on = parser.parse_known_args(args)  # only flower takes options unknown here
    if passed_on and ns.command != "flower":
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    ns.raw_args = args  # the worker's -D starts the same command line detached
    for name in ("app", "broker", "result_backend", "workdir"):
        if not hasattr(ns, name):
            setattr(ns, name, None)
    prog = f"{PROG} {ns.command}"
    if ns.command == "help":
        if ns.topic == "flower":  # its --help is Flower's own
            return flower.print_help()
        if ns.topic and ns.topic != "help":
            parser.parse_args([ns.topic, "--help"])
        parser.print_help()
        return EX_OK
    try:
        if ns.workdir:
            try:
                os.chdir(ns.workdir)
            except OSError as exc:
                raise UsageError(f"--workdir {ns.workdir!r}: {exc.strerror}") from None
        if ns.command == "multi":
            from celeriac.cli import multi

            return multi.main(ns.multi_argv, _global_args(ns))
        if ns.command == "flower":
            return flower.cmd_flower(ns, passed_on)
        if ns.command in _COMMANDS:
            return _COMMANDS[ns.command](ns)
        raise UsageError(f"unknown command {ns.command!r}")
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EX_USAGE
    except AppError as exc:
        cause = exc.__cause__
        if cause is not None:
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EX_FAILURE
    except KeyboardInterrupt:
        return EX_FAILURE


def _global_args(ns: argparse.Namespace) -> list[str]:
    """``-A``/``-b``/... given before ``multi``, passed on to each worker."""
    pairs = (("--app", ns.app), ("--broker", ns.broker), ("--result-backend", ns.result_backend))
    return [f"{flag}={value}" for flag, value in pairs if value]


def run() -> NoReturn:
    sys.exit(main())
