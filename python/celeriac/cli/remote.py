"""``celeriac inspect``, ``control`` and ``status``: remote control of the workers, the
commands and replies shaped as Celery's command line has them.
"""

from __future__ import annotations

import argparse
import json
import pprint
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celeriac.cli.common import (
    EX_OK,
    EX_UNAVAILABLE,
    UsageError,
    add_global_options,
    prepare_app,
)


@dataclass(frozen=True)
class RemoteCommand:
    """How the command line builds a remote-control request (Celery's ``Panel.meta``):
    positional ``args`` as ``(name, type)``, then the rest into ``variadic``."""

    kind: str
    args: tuple[tuple[str, Callable[[str], Any]], ...] = ()
    variadic: str | None = None
    signature: str = ""
    #: Positional arguments that must be given.
    required: int = 0
    help: str = ""


def _strtobool(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (use true/false)")


_RATE_SIGNATURE = "<task_name> <rate_limit (e.g., 5/s | 5/m | 5/h)>"

#: The remote-control commands the CLI sends (celeriac and Celery workers answer them).
REMOTE_COMMANDS: dict[str, RemoteCommand] = {
    # inspect
    "active": RemoteCommand("inspect", help="List of tasks currently being executed."),
    "active_queues": RemoteCommand("inspect", help="List the task queues a worker consumes."),
    "clock": RemoteCommand("inspect", help="Get current logical clock value."),
    "conf": RemoteCommand(
        "inspect",
        (("with_defaults", _strtobool),),
        signature="[include_defaults=False]",
        help="List configuration.",
    ),
    "ping": RemoteCommand("inspect", help="Ping worker(s)."),
    "query_task": RemoteCommand(
        "inspect",
        variadic="ids",
        signature="[id1 [id2 [... [idN]]]]",
        help="Query for task information by id.",
    ),
    "registered": RemoteCommand(
        "inspect",
        variadic="taskinfoitems",
        signature="[attr1 [attr2 [... [attrN]]]]",
        help="List of registered tasks.",
    ),
    "report": RemoteCommand("inspect", help="Information about the installation."),
    "reserved": RemoteCommand("inspect", help="List of currently reserved tasks."),
    "revoked": RemoteCommand("inspect", help="List of revoked task-ids."),
    "scheduled": RemoteCommand("inspect", help="List of currently scheduled ETA/countdown tasks."),
    "stats": RemoteCommand("inspect", help="Request worker statistics/information."),
    # control
    "add_consumer": RemoteCommand(
        "control",
        (("queue", str), ("exchange", str), ("exchange_type", str), ("routing_key", str)),
        signature="<queue> [exchange [type [routing_key]]]",
        required=1,
        help="Tell worker(s) to consume from task queue by name.",
    ),
    "autoscale": RemoteCommand(
        "control",
        (("max", int), ("min", int)),
        signature="[max [min]]",
        help="Modify autoscale settings.",
    ),
    "cancel_consumer": RemoteCommand(
        "control",
        (("queue", str),),
        signature="<queue>",
        required=1,
        help="Tell worker(s) to stop consuming from task queue by name.",
    ),
    "disable_events": RemoteCommand("control", help="Tell worker(s) to stop sending task events."),
    "enable_events": RemoteCommand("control", help="Tell worker(s) to send task events."),
    "heartbeat": RemoteCommand("control", help="Tell worker(s) to send event heartbeat now."),
    "pool_grow": RemoteCommand(
        "control", (("n", int),), signature="[N=1]", help="Grow pool by n processes."
    ),
    "pool_shrink": RemoteCommand(
        "control", (("n", int),), signature="[N=1]", help="Shrink pool by n processes."
    ),
    "pool_restart": RemoteCommand("control", help="Restart execution pool."),
    "rate_limit": RemoteCommand(
        "control",
        (("task_name", str), ("rate_limit", str)),
        signature=_RATE_SIGNATURE,
        required=2,
        help="Tell worker(s) to modify the rate limit for a task by type.",
    ),
    "revoke": RemoteCommand(
        "control",
        variadic="task_id",
        signature="[id1 [id2 [... [idN]]]]",
        required=1,
        help="Revoke task by task id (or list of ids).",
    ),
    "shutdown": RemoteCommand("control", help="Shutdown worker(s)."),
    "terminate": RemoteCommand(
        "control",
        (("signal", str),),
        variadic="task_id",
        signature="<signal> [id1 [id2 [... [idN]]]]",
        required=2,
        help="Terminate task by task id (or list of ids).",
    ),
    "time_limit": RemoteCommand(
        "control",
        (("task_name", str), ("soft", float), ("hard", float)),
        signature="<task_name> <soft_secs> [hard_secs]",
        required=2,
        help="Tell worker(s) to modify the time limit for task by type.",
    ),
}


def _remote_names(kind: str) -> list[str]:
    return sorted(name for name, spec in REMOTE_COMMANDS.items() if spec.kind == kind)


def remote_arguments(method: str, given: Sequence[str]) -> dict[str, Any]:
    """The request's ``arguments`` from the words after the command, as Celery's CLI
    builds them; ``UsageError`` for too few/many or a value of the wrong type."""
    spec = REMOTE_COMMANDS[method]
    usage = f"Command {method!r} takes arguments: {spec.signature}"
    if len(given) < spec.required:
        raise UsageError(usage)
    if len(given) > len(spec.args) and spec.variadic is None:
        raise UsageError(usage)
    arguments: dict[str, Any] = {}
    for (name, convert), word in zip(spec.args, given, strict=False):
        try:
            arguments[name] = convert(word)
        except ValueError:
            raise UsageError(f"{method}: {name} {word!r} is not valid ({usage})") from None
    if spec.variadic is not None:
        arguments[spec.variadic] = list(given[len(spec.args) :])
    return arguments


def _add_remote_options(parser: argparse.ArgumentParser, *, json_only: bool = False) -> None:
    parser.add_argument(
        "-t", "--timeout", type=float, default=1.0, metavar="SECONDS",
        help="timeout in seconds waiting for reply (default: 1.0)",
    )  # fmt: skip
    parser.add_argument(
        "-d", "--destination", default=None, metavar="NODES",
        help="comma separated list of destination node names (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "-j", "--json", action="store_true", help="use json as output format"
    )  # fmt: skip


def add_parsers(commands: Any) -> None:
    """``inspect`` and ``control`` (one shape, two command tables) and ``status``."""
    for kind, verb, example in (
        ("inspect", "ask the workers something", "inspect ping"),
        ("control", "tell the workers to do something", "control rate_limit tasks.add 10/m"),
    ):
        names = _remote_names(kind)
        sub = commands.add_parser(
            kind,
            help=f"{verb} (remote control)",
            description=f"Send the {kind} COMMAND to the workers and print their replies. "
            "Commands: " + ", ".join(names) + ".",
            epilog=f"Example: celeriac -A tasks {example}",
        )
        add_global_options(sub, suppress=True)
        sub.add_argument("method", nargs="?", metavar="COMMAND", help="one of: " + ", ".join(names))
        sub.add_argument("arguments", nargs="*", metavar="ARG", help="the command's arguments")
        sub.add_argument("--list", action="store_true", help=f"list the {kind} commands and exit")
        _add_remote_options(sub)
    status = commands.add_parser(
        "status",
        help="show the workers that are online",
        description="Ping the workers and list those that answer.",
        epilog="Example: celeriac -A tasks status",
    )
    add_global_options(status, suppress=True)
    _add_remote_options(status)


def _pretty(answer: Any) -> tuple[str, str]:
    """``(status, text)`` of one node's reply, the way Celery's command line shows it."""
    if isinstance(answer, list):
        if not answer:
            return "OK", "- empty -"
        return "OK", "\n".join(f"* {item}" for item in answer)
    if isinstance(answer, dict):
        if "ok" in answer:
            return "OK", _indent(_pretty(answer["ok"])[1], 4)
        if "error" in answer:
            return "ERROR", _indent(_pretty(answer["error"])[1], 4)
        return "OK", json.dumps(answer, sort_keys=True, indent=4, default=repr)
    if isinstance(answer, str):
        return "OK", answer
    return "OK", pprint.pformat(answer)


def _indent(text: str, width: int) -> str:
    return "\n".join(" " * width + line for line in text.split("\n"))


def say_reply(reply: Mapping[str, Any], show_body: bool) -> None:
    for node, answer in reply.items():
        status, text = _pretty(answer)
        print(f"->  {node}: {status}")
        if show_body and text:
            print(_indent(text, 4))


def cmd_remote(ns: argparse.Namespace) -> int:
    """``inspect``/``control``/``status``: broadcast, then print the replies as
    Celery's command line does."""
    from celeriac.control import broadcast

    kind = ns.command
    if kind == "status":
        method, arguments = "ping", {}
    else:
        if ns.list:
            for name in _remote_names(kind):
                spec = REMOTE_COMMANDS[name]
                print(f"  {name} {spec.signature}".rstrip().ljust(40) + f"  {spec.help}")
            return EX_OK
        method = ns.method
        if not method:
            raise UsageError(
                f"missing the {kind} COMMAND (one of: {', '.join(_remote_names(kind))})"
            )
        if method not in REMOTE_COMMANDS or REMOTE_COMMANDS[method].kind != kind:
            raise UsageError(
                f"Command {method} not recognized. Available {kind} commands: "
                + ", ".join(_remote_names(kind))
            )
        arguments = remote_arguments(method, ns.arguments)
    if not ns.timeout > 0:
        raise UsageError("argument -t/--timeout: must be a positive number of seconds")
    destination = [n.strip() for n in (ns.destination or "").split(",") if n.strip()] or None
    app = prepare_app(ns)
    try:
        replies = broadcast(app, method, arguments, destination=destination, timeout=ns.timeout)
    except ValueError as exc:  # a broker URL the mailbox cannot use
        raise UsageError(str(exc)) from None
    except Exception as exc:
        print(
            "Error: Could not connect to the message broker. Please make sure your broker "
            "(e.g., RabbitMQ or Redis) is running and the connection settings are correct. "
            f"Reason: {exc}",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    if not replies:
        print("Error: No nodes replied within time constraint", file=sys.stderr)
        return EX_UNAVAILABLE
    if ns.json:
        flat: dict[str, Any] = {}
        for reply in replies:
            flat.update(reply)
        print(json.dumps(replies if kind == "control" else flat, default=repr))
        if kind != "status":
            return EX_OK
    else:
        for reply in replies:
            say_reply(reply, show_body=kind != "status")
    if kind == "control":
        return EX_OK
    count = len(replies)
    print(f"\n{count} node{'s' if count != 1 else ''} online.")
    return EX_OK


# -- purge, call, result, events -----------------------------------------------------
