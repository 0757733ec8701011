"""The ``celeriac`` command line (also ``python -m celeriac``), shaped like Celery's.

``celeriac [-A APP] [-b URL] [--result-backend URL] [--workdir DIR] COMMAND ...``

Bad input ends with one line on stderr and status 2 (usage) before anything starts;
runtime failures (broker unreachable, an error inside the app module) give status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard

if TYPE_CHECKING:
    from celeriac.app import Celeriac

PROG = "celeriac"
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
#: No worker answered a remote-control command (Celery's exit status, sysexits' 69).
EX_UNAVAILABLE = 69

POOL_CHOICES = ("prefork", "solo", "threads")
POOL_ALIASES = {"processes": "prefork"}
PLANNED_POOLS = ("eventlet", "gevent")
LOGLEVELS = ("debug", "info", "warning", "error", "critical")


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


class AppError(Exception):
    """The app module failed while importing: reported with its traceback, status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``celeriac worker: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- argument types ------------------------------------------------------------------


def _loglevel(value: str) -> str:
    name = value.strip().lower()
    if name == "warn":
        name = "warning"
    if name == "fatal":
        name = "critical"
    if name not in LOGLEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {value!r} (choose from {', '.join(LOGLEVELS)})"
        )
    return name


def _concurrency(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if number != number or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {value}")
    return number


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _multiplier(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (unbounded) or more, not {number}")
    return number


def _pool(value: str) -> str:
    name = value.strip().lower()
    name = POOL_ALIASES.get(name, name)
    if name in PLANNED_POOLS:
        raise argparse.ArgumentTypeError(
            f"pool {value!r} is not available in celeriac yet; "
            f"use -P prefork (the default), -P threads or -P solo"
        )
    if name not in POOL_CHOICES:
        raise argparse.ArgumentTypeError(
            f"unknown pool {value!r} (choose from {', '.join(POOL_CHOICES)})"
        )
    return name


# -- parser --------------------------------------------------------------------------


def build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description=(
            "celeriac: a Celery-compatible distributed task queue with a Rust core. "
            "Run 'celeriac COMMAND --help' for a command's options."
        ),
        epilog="Example: celeriac -A tasks worker --loglevel=info",
    )
    _add_global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, required=True
    )

    worker = commands.add_parser(
        "worker",
        help="start a worker that runs the app's tasks",
        description="Start a worker: consume the queues and run the app's tasks.",
        epilog="Example: celeriac -A tasks worker -l info -Q celery,images -c 4 -P threads",
    )
    _add_global_options(worker, suppress=True)
    worker.add_argument(
        "-l",
        "--loglevel",
        type=_loglevel,
        default="warning",
        metavar="LEVEL",
        help=f"logging level: {', '.join(LOGLEVELS)} (default: warning)",
    )
    worker.add_argument(
        "-c",
        "--concurrency",
        type=_concurrency,
        default=None,
        metavar="N",
        help="tasks run at once: child processes (prefork) or threads (default: "
        "worker_concurrency, else the CPUs this process may use; solo runs one at a time)",
    )
    worker.add_argument(
        "-P",
        "--pool",
        type=_pool,
        default=None,
        metavar="POOL",
        help="execution pool: prefork (default: forked child processes), threads, or solo "
        "(tasks run in the worker's own thread)",
    )
    worker.add_argument(
        "--max-tasks-per-child",
        type=_positive,
        default=None,
        metavar="N",
        help="prefork: replace a child after it ran N tasks (worker_max_tasks_per_child)",
    )
    worker.add_argument(
        "--max-memory-per-child",
        type=_positive,
        default=None,
        metavar="KIB",
        help="prefork: replace a child whose resident memory passes KIB kilobytes after a "
        "task (worker_max_memory_per_child)",
    )
    worker.add_argument(
        "--time-limit",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="prefork: hard time limit of every task (task_time_limit)",
    )
    worker.add_argument(
        "--soft-time-limit",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="prefork: soft time limit of every task (task_soft_time_limit)",
    )
    worker.add_argument(
        "-Q",
        "--queues",
        action="append",
        default=None,
        metavar="QUEUES",
        help="comma-separated queues to consume (default: task_default_queue, 'celery')",
    )
    worker.add_argument(
        "-X",
        "--exclude-queues",
        action="append",
        default=None,
        metavar="QUEUES",
        help="comma-separated queues not to consume",
    )
    worker.add_argument(
        "-n",
        "--hostname",
        default="celery@%h",
        metavar="NAME",
        help="node name (default: celery@%%h). Expands %%h (hostname), %%n (name), %%d (domain)",
    )
    worker.add_argument(
        "-E",
        "--task-events",
        action="store_true",
        help="send task events (accepted; celeriac does not send events yet)",
    )
    worker.add_argument(
        "--prefetch-multiplier",
        type=_multiplier,
        default=None,
        metavar="N",
        help="messages prefetched per concurrency slot (default: "
        "worker_prefetch_multiplier, 4; 0 = unbounded)",
    )
    worker.add_argument(
        "-O",
        dest="optimization",
        choices=("default", "fair"),
        default=None,
        help="scheduling optimization (accepted for Celery compatibility; "
        "celeriac always schedules fairly)",
    )

    inspect = commands.add_parser(
        "inspect",
        help="ask the workers something (remote control; Redis brokers for now)",
        description="Ask running workers and print their replies.",
        epilog="Example: celeriac -A tasks inspect ping",
    )
    _add_global_options(inspect, suppress=True)
    inspect.add_argument("method", choices=INSPECT_METHODS, metavar="METHOD",
                         help="one of: " + ", ".join(INSPECT_METHODS))  # fmt: skip
    _add_control_options(inspect)

    control = commands.add_parser(
        "control",
        help="tell the workers to do something (remote control; Redis brokers for now)",
        description="Send a command to running workers and print their replies.",
        epilog="Example: celeriac -A tasks control rate_limit tasks.add 10/m",
    )
    _add_global_options(control, suppress=True)
    control.add_argument("method", choices=CONTROL_METHODS, metavar="METHOD",
                         help="one of: " + ", ".join(CONTROL_METHODS))  # fmt: skip
    control.add_argument("arguments", nargs="*", metavar="ARG",
                         help="rate_limit: TASK_NAME RATE (e.g. tasks.add 10/m)")  # fmt: skip
    _add_control_options(control)

    help_cmd = commands.add_parser(
        "help", help="show this help, or a command's help", add_help=False
    )
    help_cmd.add_argument("topic", nargs="?", metavar="COMMAND")
    return parser


#: Remote-control commands the CLI can send (what celeriac workers answer today).
INSPECT_METHODS = ("ping", "registered", "active", "stats")
CONTROL_METHODS = ("rate_limit",)


def _add_control_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-t", "--timeout", type=float, default=1.0, metavar="SECONDS",
        help="how long to wait for replies (default: 1.0)",
    )  # fmt: skip
    parser.add_argument(
        "-d", "--destination", default=None, metavar="NODES",
        help="comma-separated node names to ask (default: all)",
    )  # fmt: skip


def _cmd_remote(ns: argparse.Namespace) -> int:
    """``inspect``/``control``: broadcast, then print one block per replying node the
    way Celery's command line does."""
    from celeriac import _core
    from celeriac.control import broadcast

    arguments: dict[str, Any] = {}
    if ns.command == "control" and ns.method == "rate_limit":
        if len(ns.arguments) != 2:
            raise UsageError("rate_limit takes two arguments: TASK_NAME RATE (e.g. 10/m)")
        arguments = {"task_name": ns.arguments[0], "rate_limit": ns.arguments[1]}
    if ns.timeout <= 0:
        raise UsageError("argument -t/--timeout: must be a positive number of seconds")
    destination = [n for n in (ns.destination or "").split(",") if n] or None
    app = _prepare_app(ns)
    try:
        replies = broadcast(app, ns.method, arguments, destination=destination, timeout=ns.timeout)
    except (ValueError, _core.OperationalError) as exc:
        raise AppError(str(exc)) from None
    if not replies:
        print("Error: No nodes replied within time constraint.", file=sys.stderr)
        return EX_UNAVAILABLE
    for reply in replies:
        for node, answer in reply.items():
            if isinstance(answer, dict) and set(answer) == {"error"}:
                print(f"->  {node}: ERROR\n        {answer['error']}")
            elif isinstance(answer, dict) and set(answer) == {"ok"}:
                print(f"->  {node}: OK\n        {answer['ok']}")
            else:
                text = json.dumps(answer, indent=4, sort_keys=True, default=repr)
                print(f"->  {node}: OK\n" + textwrap.indent(text, " " * 8))
    count = len(replies)
    print(f"\n{count} node{'s' if count != 1 else ''} online.")
    return EX_OK


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """``-A``/``-b``/... belong before the command, as in Celery; they are also
    accepted after it (hidden there) so ``celeriac worker -A tasks`` works too."""
    default = argparse.SUPPRESS if suppress else None

    def hide(text: str) -> str:
        return argparse.SUPPRESS if suppress else text

    parser.add_argument(
        "-A",
        "--app",
        default=default,
        metavar="APP",
        help=hide("the app: module (tasks), module:attribute (tasks:app) or module.attribute"),
    )
    parser.add_argument(
        "-b",
        "--broker",
        default=default,
        metavar="URL",
        help=hide("broker URL (overrides broker_url)"),
    )
    parser.add_argument(
        "--result-backend",
        default=default,
        metavar="URL",
        help=hide("result backend URL (overrides result_backend)"),
    )
    parser.add_argument(
        "--workdir",
        default=default,
        metavar="DIR",
        help=hide("change to this directory before loading the app"),
    )


def _version() -> str:
    try:
        from celeriac import _core

        return str(_core.__version__)
    except ImportError:
        return "(extension not built)"


# -- loading the app -----------------------------------------------------------------


def _import(name: str) -> ModuleType:
    """Import ``name``; None-like failures become ``UsageError``/``AppError``."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == name or name.startswith(missing + "."):
            raise
        raise AppError(f"importing {name!r} failed: {exc}") from exc
    except Exception as exc:
        raise AppError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def _is_app(obj: Any) -> TypeGuard[Celeriac]:
    from celeriac.app import Celeriac

    return isinstance(obj, Celeriac)


def _from_module(module: ModuleType, spec: str) -> Celeriac:
    for attr in ("app", "celery"):
        found = getattr(module, attr, None)
        if _is_app(found):
            return found
    apps: dict[str, Celeriac] = {
        name: value for name, value in vars(module).items() if _is_app(value)
    }
    unique = {id(value): name for name, value in apps.items()}
    if len(unique) == 1:
        return next(iter(apps.values()))
    if not unique:
        raise UsageError(
            f"module {module.__name__!r} has no celeriac app: define 'app = Celeriac(...)' "
            f"in it, or name the attribute with -A {spec}:NAME"
        )
    names = ", ".join(sorted(apps))
    raise UsageError(f"module {module.__name__!r} has several apps ({names}); use -A {spec}:NAME")


def _resolve(obj: Any, path: str, spec: str) -> Any:
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"cannot find {path!r} in {spec!r}") from None
    return obj


def load_app(spec: str) -> Celeriac:
    """Find the app like Celery's ``-A``: ``tasks``, ``tasks:app``, ``tasks.app``,
    ``proj`` (package with ``proj.celery``). The current directory is importable."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    spec = spec.strip()
    if not spec:
        raise UsageError("the app name is empty (use -A MODULE, e.g. -A tasks)")
    module_name, colon, attr = spec.partition(":")
    if colon:
        try:
            module = _import(module_name)
        except ModuleNotFoundError:
            raise UsageError(_not_found(module_name, cwd)) from None
        found = _resolve(module, attr, spec) if attr else _from_module(module, module_name)
    else:
        try:
            module = _import(spec)
        except ModuleNotFoundError:
            head, dot, tail = spec.rpartition(".")
            if not dot:
                raise UsageError(_not_found(spec, cwd)) from None
            try:
                parent = _import(head)
            except ModuleNotFoundError:
                raise UsageError(_not_found(spec, cwd)) from None
            found = _resolve(parent, tail, spec)
        else:
            try:
                found = _from_module(module, spec)
            except UsageError:
                if not hasattr(module, "__path__"):
                    raise
                try:
                    sub = _import(f"{spec}.celery")
                except ModuleNotFoundError:
                    raise UsageError(
                        f"package {spec!r} has no celeriac app (nor a {spec}.celery module)"
                    ) from None
                found = _from_module(sub, f"{spec}.celery")
    if not _is_app(found):
        raise UsageError(f"{spec!r} is not a celeriac app (it is {type(found).__name__})")
    return found


def _not_found(name: str, cwd: str) -> str:
    return f"cannot load the app: module {name!r} not found (looked in {cwd} and sys.path)"


# -- commands ------------------------------------------------------------------------


def _prepare_app(ns: argparse.Namespace) -> Celeriac:
    spec = ns.app or os.environ.get("CELERIAC_APP") or os.environ.get("CELERY_APP")
    if not spec:
        raise UsageError("no app given: use -A/--app MODULE (e.g. celeriac -A tasks worker)")
    # As Celery does: through the environment (which wins over the app's settings,
    # and is seen by the app module while it loads), and on the app itself.
    overrides: dict[str, Any] = {}
    if ns.broker:
        os.environ["CELERY_BROKER_URL"] = overrides["broker_url"] = ns.broker
    if ns.result_backend:
        os.environ["CELERY_RESULT_BACKEND"] = overrides["result_backend"] = ns.result_backend
    app = load_app(spec)
    if overrides:
        app.conf.update(overrides)
    try:
        app.import_modules()
    except Exception as exc:
        raise AppError(f"importing the app's modules failed: {type(exc).__name__}: {exc}") from exc
    return app


def _cmd_worker(ns: argparse.Namespace) -> int:
    from celeriac.worker import Worker, WorkerError, WorkerOptions
    from celeriac.worker.log import parse_loglevel, setup_logging
    from celeriac.worker.options import expand_nodename, split_names

    try:
        expand_nodename(ns.hostname)
    except ValueError as exc:
        raise UsageError(f"argument -n/--hostname: {exc}") from None
    queues = split_names(ns.queues)
    excluded = split_names(ns.exclude_queues)
    if ns.queues is not None and not queues:
        raise UsageError("argument -Q/--queues: no queue names given")
    level = parse_loglevel(ns.loglevel)
    app = _prepare_app(ns)
    options = WorkerOptions(
        hostname=ns.hostname,
        concurrency=ns.concurrency,
        pool=ns.pool,
        queues=queues,
        exclude_queues=excluded,
        loglevel=level,
        prefetch_multiplier=ns.prefetch_multiplier,
        task_events=ns.task_events,
        max_tasks_per_child=ns.max_tasks_per_child,
        max_memory_per_child=ns.max_memory_per_child,
        time_limit=ns.time_limit,
        soft_time_limit=ns.soft_time_limit,
    )
    try:
        worker = Worker(app, options)
    except WorkerError as exc:
        raise UsageError(str(exc)) from None
    setup_logging(level)
    return worker.run()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``celeriac`` and ``python -m celeriac``; returns the exit status."""
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(args)
    for name in ("app", "broker", "result_backend", "workdir"):
        if not hasattr(ns, name):
            setattr(ns, name, None)
    prog = f"{PROG} {ns.command}"
    if ns.command == "help":
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
        if ns.command == "worker":
            return _cmd_worker(ns)
        if ns.command in ("inspect", "control"):
            return _cmd_remote(ns)
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


def run() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    run()
