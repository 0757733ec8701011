"""``celeriac purge``, ``call`` and ``result``: the one-shot commands on queues and tasks."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any

from celeriac.cli.common import (
    EX_FAILURE,
    EX_OK,
    AppError,
    UsageError,
    add_global_options,
    plural,
    prepare_app,
    seconds,
)


def add_parsers(commands: Any) -> None:
    purge = commands.add_parser(
        "purge",
        help="erase all messages from the task queues",
        description="Erase all messages from all known task queues. There is no undo.",
        epilog="Example: celeriac -A tasks purge -f -Q celery",
    )
    add_global_options(purge, suppress=True)
    purge.add_argument("-f", "--force", action="store_true", help="don't prompt for verification")
    purge.add_argument("-Q", "--queues", action="append", metavar="QUEUES",
                       help="comma separated list of queue names to purge")  # fmt: skip
    purge.add_argument("-X", "--exclude-queues", action="append", metavar="QUEUES",
                       help="comma separated list of queue names not to purge")  # fmt: skip

    call = commands.add_parser(
        "call",
        help="call a task by name",
        description="Send a task message by name and print the task id.",
        epilog="Example: celeriac -A tasks call tasks.add --args '[1, 2]'",
    )
    add_global_options(call, suppress=True)
    call.add_argument("name", metavar="TASK_NAME")
    call.add_argument("-a", "--args", type=_json_array, default=None, metavar="JSON",
                      help="positional arguments (a JSON array)")  # fmt: skip
    call.add_argument("-k", "--kwargs", type=_json_object, default=None, metavar="JSON",
                      help="keyword arguments (a JSON object)")  # fmt: skip
    call.add_argument("--eta", type=_iso8601, default=None, metavar="ISO8601",
                      help="scheduled time (ISO 8601)")  # fmt: skip
    call.add_argument("--countdown", type=float, default=None, metavar="SECONDS",
                      help="eta in seconds from now")  # fmt: skip
    call.add_argument("--expires", type=_iso8601_or_float, default=None, metavar="WHEN",
                      help="expiry time (ISO 8601) or seconds from now")  # fmt: skip
    call.add_argument("--serializer", default=None, help="task serializer (json)")
    call.add_argument("--queue", default=None, help="custom queue name")
    call.add_argument("--exchange", default=None, help="custom exchange name")
    call.add_argument("--routing-key", default=None, help="custom routing key")

    result = commands.add_parser(
        "result",
        help="print the return value of a task",
        description="Print the return value (or the traceback) of the task with this id.",
        epilog="Example: celeriac -A tasks result 5f1c...",
    )
    add_global_options(result, suppress=True)
    result.add_argument("task_id", metavar="TASK_ID")
    result.add_argument("-t", "--task", default=None, help="name of task (if custom backend)")
    result.add_argument("--traceback", action="store_true", help="show traceback instead")
    result.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                        help="give up waiting after SECONDS (celeriac; default: wait)")  # fmt: skip


def _json_array(value: str) -> list[Any]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not JSON: {exc}") from None
    if not isinstance(parsed, list):
        raise argparse.ArgumentTypeError(f"{value!r} is not a JSON array")
    return parsed


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"{value!r} is not a JSON object")
    return parsed


def _iso8601(value: str) -> datetime.datetime:
    try:
        return datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 date/time") from None


def _iso8601_or_float(value: str) -> datetime.datetime | float:
    try:
        return float(value)
    except ValueError:
        return _iso8601(value)


def _queue_names(values: Sequence[str] | None) -> list[str]:
    return [name.strip() for value in values or () for name in value.split(",") if name.strip()]


def cmd_purge(ns: argparse.Namespace) -> int:
    from celeriac.control import open_mailbox

    app = prepare_app(ns)
    queues = set(_queue_names(ns.queues)) or set(app.queues)
    names = queues - set(_queue_names(ns.exclude_queues))
    count = len(names)
    if not names:
        return EX_OK
    headline = plural(count, "queue")
    if not ns.force:
        question = (
            f"WARNING:This will remove all tasks from {headline}: {', '.join(sorted(names))}.\n"
            "         There is no undo for this operation!\n\n"
            "(to skip this prompt use the -f option)\n"
            "Are you sure you want to delete all tasks? [y/N]: "
        )
        try:
            answer = input(question)
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("Aborted!", file=sys.stderr)
            return EX_FAILURE
    try:
        mailbox = open_mailbox(app)
    except ValueError as exc:  # a broker URL the mailbox cannot use
        raise UsageError(f"purge: {exc}") from None
    except Exception as exc:
        raise AppError(f"cannot reach the broker: {exc}") from None
    try:
        messages = sum(mailbox.purge(name) for name in sorted(names))
    finally:
        mailbox.close()
    if messages:
        print(
            f"Purged {messages} {plural(messages, 'message')} from {count} known task {headline}."
        )
    else:
        print(f"No messages purged from {count} {headline}.")
    return EX_OK


def cmd_call(ns: argparse.Namespace) -> int:
    app = prepare_app(ns)
    options = {
        key: value
        for key, value in (
            ("countdown", ns.countdown),
            ("eta", ns.eta),
            ("expires", ns.expires),
            ("serializer", ns.serializer),
            ("queue", ns.queue),
            ("exchange", ns.exchange),
            ("routing_key", ns.routing_key),
        )
        if value is not None
    }
    try:
        result = app.send_task(ns.name, args=ns.args, kwargs=ns.kwargs, **options)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        raise AppError(f"cannot send the task: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            app.close()
    print(result.id)
    return EX_OK


def cmd_result(ns: argparse.Namespace) -> int:
    app = prepare_app(ns)
    if ns.task:
        task = app.tasks.get(ns.task)
        if task is None:
            raise UsageError(f"--task {ns.task!r}: no such task in the app")
    result = app.AsyncResult(ns.task_id)
    try:
        value = result.traceback if ns.traceback else result.get(timeout=ns.timeout)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_FAILURE
    print(value)
    return EX_OK
