"""The ``celeriac`` command line (also ``python -m celeriac``), shaped like Celery's.

``celeriac [-A APP] [-b URL] [--result-backend URL] [--workdir DIR] COMMAND ...``

Bad input ends with one line on stderr and status 2 (usage) before anything starts;
runtime failures (broker unreachable, an error inside the app module) give status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import pprint
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard

from celeriac import cli_beat, cli_flower

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
#: Celery couldn't create the pidfile (sysexits' EX_CANTCREAT), as ``celery worker`` exits.
EX_CANTCREAT = 73

#: Celery ``worker`` options celeriac does not have: ``(flags, takes a value)``. Each is
#: parsed (so the error names it) and refused before anything starts.
UNSUPPORTED_WORKER_OPTIONS: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("-S", "--statedb"), True),
)
UNSUPPORTED_HELP = {
    "--statedb": "celeriac keeps revoked task ids in memory only",
}


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


def _concurrency(value: str) -> int | str | None:
    """``-c``: a whole number >= 1, or Celery 5.7's ``auto`` (the CPUs this process may
    use); nothing: ``worker_concurrency``, else the CPUs (None). Celery 5.7 also reads 0
    as "the default"; celeriac refuses it, as a typo should not start a surprise pool."""
    text = value.strip()
    if text.lower() == "auto":
        return "auto"
    if not text:
        return None
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number (nor 'auto')") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or 'auto'), not {number}")
    return number


def _umask(value: str) -> int:
    from celeriac.worker.options import parse_umask

    try:
        return parse_umask(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _start_method(value: str) -> str:
    from celeriac.worker.options import START_METHODS

    name = value.strip().lower()
    if name not in START_METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown start method {value!r} (choose from {', '.join(START_METHODS)})"
        )
    return name


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


def _autoscale(value: str) -> tuple[int, int]:
    """Celery's ``--autoscale``: ``MAX,MIN`` or ``MAX`` (the larger is the maximum)."""
    parts = value.split(",")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"{value!r}: give MAX,MIN or MAX (two numbers at most)")
    try:
        numbers = sorted((int(part) for part in parts), reverse=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not MAX,MIN (whole numbers)") from None
    most, least = numbers[0], numbers[1] if len(numbers) == 2 else 0
    if least < 0 or most < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: MAX must be at least 1 and MIN at least 0")
    return most, least


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
        help="tasks run at once: child processes (prefork) or threads (default, or 0: "
        "worker_concurrency, else the CPUs this process may use; 'auto': those CPUs "
        "whatever worker_concurrency says; solo runs one at a time)",
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
        "--events",
        action="store_true",
        help="send task events (task-received, -started, -succeeded, -failed, ...) for "
        "monitors such as Flower and 'celeriac events' (worker_send_task_events); worker "
        "events (online, heartbeat, offline) are sent without it",
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
        "--disable-prefetch",
        action="store_true",
        default=None,
        help="Redis: take a message from the broker only when a pool slot is free to "
        "run it, whatever --prefetch-multiplier says (worker_disable_prefetch). As in "
        "Celery, other brokers ignore it with a warning",
    )
    worker.add_argument(
        "--pool-start-method",
        type=_start_method,
        default=None,
        metavar="METHOD",
        help="how prefork children start: fork (the default, the only one celeriac has; "
        "spawn is refused)",
    )
    worker.add_argument(
        "-I",
        "--include",
        action="append",
        default=None,
        metavar="MODULES",
        help="comma-separated modules to import at start, e.g. the modules of more "
        "tasks (repeatable; one that cannot be imported stops the start)",
    )
    worker.add_argument(
        "-O",
        "--optimization",
        dest="optimization",
        choices=("default", "fair"),
        default=None,
        help="scheduling profile (in Celery 5 both hand a task only to an idle child). "
        "Accepted, no effect: the threads pool starts a task on whichever thread is free, "
        "but each prefork child prefetches its own share of messages (the prefetch "
        "multiplier) and runs them in turn (use --prefetch-multiplier 1 for long tasks)",
    )
    worker.add_argument(
        "-f",
        "--logfile",
        default=None,
        metavar="FILE",
        help="log to FILE instead of stderr (reopened when moved, for logrotate). Expands "
        "%%n (node name), %%h (node host), %%d (domain), %%p (full node name), "
        "%%i (prefork child index, 0 in the main process), %%I (-index, or nothing)",
    )
    worker.add_argument(
        "--pidfile",
        default=None,
        metavar="FILE",
        help="write the worker's pid to FILE, removed on exit; refuse to start when FILE "
        "names a running process (a stale one is replaced). Expands %%n, %%h, %%d, %%p",
    )
    worker.add_argument(
        "-D",
        "--detach",
        action="store_true",
        help="start the worker as a daemon (in the background, detached from the terminal) "
        "and return; give -f and --pidfile to find its log and stop it",
    )
    worker.add_argument(
        "--executable",
        default=None,
        metavar="PYTHON",
        help="with -D: the Python that runs the daemon (default: this one)",
    )
    worker.add_argument(
        "--uid",
        default=None,
        metavar="USER",
        help="once the app is loaded, run as this user (name or number), with its "
        "primary group unless --gid is given. Needs root",
    )
    worker.add_argument(
        "--gid",
        default=None,
        metavar="GROUP",
        help="once the app is loaded, run as this group (name or number). Needs root",
    )
    worker.add_argument(
        "--umask",
        type=_umask,
        default=None,
        metavar="UMASK",
        help="umask of the files the worker creates (log file, pidfile, ...), in octal "
        "with a leading 0: 022, 077",
    )
    worker.add_argument(
        "--purge",
        "--discard",
        dest="purge",
        action="store_true",
        help="erase every message of the consumed queues before starting (no undo)",
    )
    worker.add_argument(
        "--without-heartbeat",
        action="store_true",
        help="send no worker events (online, heartbeat, offline): monitors then show the "
        "worker offline",
    )
    worker.add_argument(
        "--heartbeat-interval",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="seconds between worker-heartbeat events (default: 2)",
    )
    worker.add_argument(
        "--without-mingle",
        action="store_true",
        help="send no start-up hello to other workers (their revoked task ids are then not "
        "learnt; theirs are still answered)",
    )
    worker.add_argument(
        "--without-gossip",
        action="store_true",
        help="do not follow other workers' events (accepted: celeriac never does)",
    )
    worker.add_argument(
        "--autoscale",
        type=_autoscale,
        default=None,
        metavar="MAX,MIN",
        help="celeriac does not resize the pool by load yet: runs a fixed pool of MAX "
        "(overriding -c) and logs a warning",
    )
    unsupported = worker.add_argument_group(
        "Celery options celeriac does not support yet (giving one is an error)"
    )
    for flags, takes_value in UNSUPPORTED_WORKER_OPTIONS:
        dest = flags[-1].lstrip("-").replace("-", "_")
        help_text = UNSUPPORTED_HELP[flags[-1]]
        if takes_value:
            unsupported.add_argument(*flags, dest=dest, metavar="VALUE", help=help_text)
        else:
            unsupported.add_argument(
                *flags, dest=dest, action="store_true", default=None, help=help_text
            )

    cli_beat.add_worker_options(worker)
    _add_remote_parsers(commands)
    _add_tool_parsers(commands)
    cli_beat.add_parser(commands, _add_global_options, _loglevel)
    multi = commands.add_parser("multi", help="start and stop detached workers", add_help=False)
    multi.add_argument("multi_argv", nargs=argparse.REMAINDER)
    cli_flower.add_parser(commands, _add_global_options)

    help_cmd = commands.add_parser(
        "help", help="show this help, or a command's help", add_help=False
    )
    help_cmd.add_argument("topic", nargs="?", metavar="COMMAND")
    return parser


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


def _prepare_app(ns: argparse.Namespace, include: Sequence[str] = ()) -> Celeriac:
    """Load the app (``-A``, ``-b``, ``--result-backend``) and import its modules, and
    the ``include`` ones (the worker's ``-I``), added to its ``include`` setting."""
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
    for name in include:
        try:
            _import(name)
        except ModuleNotFoundError:
            raise UsageError(
                f"argument -I/--include: module {name!r} not found "
                f"(looked in {os.getcwd()} and sys.path)"
            ) from None
        except AppError as exc:
            raise AppError(f"argument -I/--include: {exc}") from exc.__cause__
    if include:  # as Celery: part of the app's modules from now on (inspect conf)
        known = tuple(app.conf["include"])
        app.conf.include = known + tuple(name for name in include if name not in known)
    app.finalize()
    return app


def _cmd_worker(ns: argparse.Namespace) -> int:
    from celeriac import signals
    from celeriac.signals import setup_worker_logging
    from celeriac.worker import Worker, WorkerError, WorkerOptions
    from celeriac.worker.log import LogSettings, parse_loglevel, redirect_stdouts, setup_logging
    from celeriac.worker.log import logger as worker_logger
    from celeriac.worker.options import (
        Pidfile,
        PidfileLocked,
        drop_privileges,
        expand_nodename,
        is_module_name,
        node_format,
        resolve_identity,
        split_names,
    )

    for flags, _ in UNSUPPORTED_WORKER_OPTIONS:
        if getattr(ns, flags[-1].lstrip("-").replace("-", "_"), None) is not None:
            raise UsageError(
                f"{'/'.join(flags[:2])} is not supported by celeriac yet: "
                f"{UNSUPPORTED_HELP[flags[-1]]}"
            )
    try:
        nodename = expand_nodename(ns.hostname)
    except ValueError as exc:
        raise UsageError(f"argument -n/--hostname: {exc}") from None
    pidfile_path = logfile_path = None
    for flag, template in (("-f/--logfile", ns.logfile), ("--pidfile", ns.pidfile)):
        if template is None:
            continue
        try:
            path = node_format(template, nodename)
        except ValueError as exc:
            raise UsageError(f"argument {flag}: {exc}") from None
        folder = os.path.dirname(os.path.abspath(path))
        if not path.strip() or os.path.isdir(path):
            raise UsageError(f"argument {flag}: {path!r} is not a file name")
        if not os.path.isdir(folder):
            problem = "is not a directory" if os.path.exists(folder) else "does not exist"
            raise UsageError(f"argument {flag}: the directory {folder} {problem}")
        if flag == "--pidfile":
            pidfile_path = path
        else:
            logfile_path = path
    queues = split_names(ns.queues)
    excluded = split_names(ns.exclude_queues)
    if ns.queues is not None and not queues:
        raise UsageError("argument -Q/--queues: no queue names given")
    include = split_names(ns.include)
    if ns.include is not None and not include:
        raise UsageError("argument -I/--include: no module names given")
    for name in include:
        if not is_module_name(name):
            raise UsageError(f"argument -I/--include: {name!r} is not a module name")
    try:
        identity = resolve_identity(ns.uid, ns.gid)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    level = parse_loglevel(ns.loglevel)
    concurrency = ns.concurrency
    if ns.autoscale is not None:
        concurrency = ns.autoscale[0]  # Celery too ignores -c with --autoscale
    if ns.umask is not None:
        os.umask(ns.umask)  # before any file is made (the app's, the log file, ...)
    app = _prepare_app(ns, include)
    if ns.detach:
        return _detach_worker(ns, logfile_path, pidfile_path)
    if identity.uid is not None or identity.gid is not None:
        # As Celery: the app is loaded as the starting user, the rest runs as the new one.
        try:
            drop_privileges(identity)
        except OSError as exc:
            option = "--uid" if identity.uid is not None else "--gid"
            wanted = ", ".join(
                f"{what} {value}"
                for what, value in (("uid", identity.uid), ("gid", identity.gid))
                if value is not None
            )
            raise UsageError(
                f"argument {option}: cannot switch to {wanted}: {exc.strerror or exc}"
            ) from None
    options = WorkerOptions(
        hostname=ns.hostname,
        concurrency=concurrency,
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
        logfile=ns.logfile,
        pidfile=pidfile_path,
        purge=ns.purge,
        heartbeat=not ns.without_heartbeat,
        heartbeat_interval=ns.heartbeat_interval,
        mingle=not ns.without_mingle,
        gossip=not ns.without_gossip,
        include=include,
        pool_start_method=ns.pool_start_method,
        disable_prefetch=ns.disable_prefetch,
    )
    try:
        worker = Worker(app, options)
    except WorkerError as exc:
        raise UsageError(str(exc)) from None
    try:
        log_settings = LogSettings.from_conf(app.conf)
        setup_worker_logging(
            lambda: setup_logging(level, ns.logfile, worker.nodename, settings=log_settings),
            level,
            ns.logfile,
            log_settings.log_format,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(
            f"argument -f/--logfile: cannot write {exc.filename}: {exc.strerror}"
        ) from None
    if worker.disable_prefetch_ignored:  # as Celery, which warns the same way
        worker_logger.warning(
            "--disable-prefetch (worker_disable_prefetch) works on Redis brokers only; "
            "ignored on %s.",
            app.broker_url_masked,
        )
    if ns.autoscale is not None:
        most, least = ns.autoscale
        worker_logger.warning(
            "--autoscale=%d,%d: celeriac does not resize the pool by load yet; "
            "running a fixed pool of %d (the maximum).",
            most,
            least,
            worker.concurrency,
        )
    pidfile = None
    if pidfile_path is not None:
        pidfile = Pidfile(pidfile_path)
        try:
            pidfile.acquire()
        except PidfileLocked as exc:
            print(
                f"{PROG} worker: error: the pidfile {exc.path} exists and names process "
                f"{exc.pid}, which is running: is this worker already running? "
                "(remove the file if not)",
                file=sys.stderr,
            )
            return EX_CANTCREAT
        except OSError as exc:
            raise UsageError(
                f"argument --pidfile: cannot write {pidfile.path}: {exc.strerror or exc}"
            ) from None
        if pidfile.replaced:
            worker_logger.warning(
                "Replaced the stale pidfile %s (%s).", pidfile.path, pidfile.replaced
            )
        worker.pidfile = pidfile
    # As Celery: once logging is set up, before --purge and the banner.
    signals.celeryd_after_setup.send(sender=worker.nodename, instance=worker, conf=app.conf)
    embedded_beat = cli_beat.start_embedded(ns, app) if ns.beat else None
    try:
        if options.purge:
            _purge_queues(app, worker.queues)
        redirect_stdouts(log_settings)
        return worker.run()
    finally:
        if embedded_beat is not None:
            cli_beat.stop_embedded(embedded_beat)
        if pidfile is not None:
            pidfile.release()


def _detach_worker(ns: argparse.Namespace, logfile: str | None, pidfile: str | None) -> int:
    from celeriac.worker.daemon import check_before_detaching, detach
    from celeriac.worker.options import PidfileLocked

    try:
        check_before_detaching(logfile, pidfile)
    except PidfileLocked as exc:
        print(
            f"{PROG} worker: error: the pidfile {exc.path} exists and names process "
            f"{exc.pid}, which is running: is this worker already running?",
            file=sys.stderr,
        )
        return EX_CANTCREAT
    except OSError as exc:
        raise UsageError(f"argument -f/--logfile: cannot write {logfile}: {exc.strerror}") from None
    if logfile is None:
        print(f"{PROG} worker: warning: -D without -f: the worker's log is lost", file=sys.stderr)
    detach(ns.raw_args, executable=ns.executable, logfile=logfile)
    return EX_OK


def _purge_queues(app: Celeriac, queues: list[str]) -> None:
    """``worker --purge``: erase the messages of the queues about to be consumed."""
    from celeriac.control import _mailbox
    from celeriac.worker.worker import _scrub

    def clean(exc: Exception) -> str:
        return _scrub(str(exc), app.broker_url, app.broker_url_masked)

    try:
        mailbox = _mailbox(app)
    except ValueError as exc:
        raise UsageError(f"--purge: {clean(exc)}") from None
    except Exception as exc:
        raise AppError(f"--purge: cannot reach the broker: {clean(exc)}") from None
    try:
        count = sum(mailbox.purge(name) for name in queues)
    except Exception as exc:
        raise AppError(
            f"--purge: cannot erase the queues {', '.join(queues)}: {clean(exc)}"
        ) from None
    finally:
        mailbox.close()
    if count:  # as Celery: a line on stdout, only when something was erased
        print(
            f"purge: discarded {count} {_plural(count, 'message')} "
            f"from {_plural(len(queues), 'queue')} {', '.join(queues)}.",
            flush=True,
        )


# -- remote control, as Celery's ``inspect``/``control``/``status`` -----------------


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


def _add_remote_parsers(commands: Any) -> None:
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
        _add_global_options(sub, suppress=True)
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
    _add_global_options(status, suppress=True)
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


def _say_reply(reply: Mapping[str, Any], show_body: bool) -> None:
    for node, answer in reply.items():
        status, text = _pretty(answer)
        print(f"->  {node}: {status}")
        if show_body and text:
            print(_indent(text, 4))


def _cmd_remote(ns: argparse.Namespace) -> int:
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
    app = _prepare_app(ns)
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
            _say_reply(reply, show_body=kind != "status")
    if kind == "control":
        return EX_OK
    count = len(replies)
    print(f"\n{count} node{'s' if count != 1 else ''} online.")
    return EX_OK


# -- purge, call, result, events -----------------------------------------------------


def _add_tool_parsers(commands: Any) -> None:
    purge = commands.add_parser(
        "purge",
        help="erase all messages from the task queues",
        description="Erase all messages from all known task queues. There is no undo.",
        epilog="Example: celeriac -A tasks purge -f -Q celery",
    )
    _add_global_options(purge, suppress=True)
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
    _add_global_options(call, suppress=True)
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
    _add_global_options(result, suppress=True)
    result.add_argument("task_id", metavar="TASK_ID")
    result.add_argument("-t", "--task", default=None, help="name of task (if custom backend)")
    result.add_argument("--traceback", action="store_true", help="show traceback instead")
    result.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="give up waiting after SECONDS (celeriac; default: wait)")  # fmt: skip

    events = commands.add_parser(
        "events",
        help="dump the workers' events as they happen",
        description="Print every event (worker and task) as it happens, like "
        "'celery events --dump'. Stop with Ctrl-C.",
        epilog="Example: celeriac -A tasks events --dump",
    )
    _add_global_options(events, suppress=True)
    events.add_argument("-d", "--dump", action="store_true",
                        help="dump events to stdout (the only mode celeriac has)")  # fmt: skip


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


def _plural(count: int, word: str) -> str:
    return word if count == 1 else f"{word}s"


def _cmd_purge(ns: argparse.Namespace) -> int:
    from celeriac.control import _mailbox

    app = _prepare_app(ns)
    queues = set(_queue_names(ns.queues)) or set(app.queues)
    names = queues - set(_queue_names(ns.exclude_queues))
    count = len(names)
    if not names:
        return EX_OK
    headline = _plural(count, "queue")
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
        mailbox = _mailbox(app)
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
            f"Purged {messages} {_plural(messages, 'message')} from {count} known task {headline}."
        )
    else:
        print(f"No messages purged from {count} {headline}.")
    return EX_OK


def _cmd_call(ns: argparse.Namespace) -> int:
    app = _prepare_app(ns)
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


def _cmd_result(ns: argparse.Namespace) -> int:
    app = _prepare_app(ns)
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


_HUMAN_TYPES = {
    "worker-offline": "shutdown",
    "worker-online": "started",
    "worker-heartbeat": "heartbeat",
}


class EventDumper:
    """Formats events as ``celery events --dump`` prints them."""

    def __init__(self, out: Any = None) -> None:
        self.out = out
        self.task_names: dict[str, str] = {}

    def say(self, message: str) -> None:
        print(message, file=self.out or sys.stdout, flush=True)

    def on_event(self, event: dict[str, Any]) -> None:
        event = dict(event)
        event.pop("local_received", None)
        try:
            stamp = datetime.datetime.fromtimestamp(
                float(event.pop("timestamp")), datetime.timezone.utc
            )
        except (KeyError, TypeError, ValueError, OverflowError):
            stamp = datetime.datetime.now(datetime.timezone.utc)
        kind = str(event.pop("type", "")).lower()
        hostname = event.pop("hostname", "?")
        human = _HUMAN_TYPES.get(kind, kind.replace("-", " "))
        if kind.startswith("task-"):
            uuid = str(event.pop("uuid", ""))
            if kind in ("task-received", "task-sent"):
                task = (
                    f"{event.pop('name', None)}({uuid}) args={event.pop('args', None)} "
                    f"kwargs={event.pop('kwargs', None)}"
                )
                self.task_names[uuid] = task
                if len(self.task_names) > 0xFFF:
                    self.task_names.pop(next(iter(self.task_names)))
            else:
                task = self.task_names.get(uuid, "")
            fields = ", ".join(f"{key}={event[key]}" for key in sorted(event))
            sep = ":" if fields else ""
            self.say(f"{hostname} [{stamp}] {human}{sep} {task} {fields}")
            return
        fields = ", ".join(f"{key}={event[key]}" for key in sorted(event))
        sep = ":" if fields else ""
        self.say(f"{hostname} [{stamp}] {human}{sep} {fields}")


def _cmd_events(ns: argparse.Namespace) -> int:
    app = _prepare_app(ns)
    dumper = EventDumper()
    try:
        next_events = _event_source(app)
    except ValueError as exc:
        raise UsageError(f"events: {exc}") from None
    except Exception as exc:
        raise AppError(f"cannot receive events: {exc}") from None
    dumper.say("-> evdump: starting capture...")
    try:
        while True:
            for event in next_events():
                dumper.on_event(event)
    except KeyboardInterrupt:
        return EX_OK


def _event_source(app: Celeriac) -> Callable[[], list[dict[str, Any]]]:
    """A function giving the next events (``[]`` after a second without any):
    celeriac's ``EventReceiver`` on SQLite; on Redis and AMQP a subscription of its own
    to ``celeryev``, as Celery's receiver (exclusive ``celeryev.<uuid>`` queue bound
    with ``#``, ``event_queue_ttl``/``event_queue_expires``)."""
    import uuid

    from celeriac import _core
    from celeriac.events import EventReceiver

    if app.broker_url.startswith("sqlite"):
        receiver = EventReceiver(app)
        return lambda: receiver.next_events(1.0)
    conf = app.conf
    expires, ttl = conf["event_queue_expires"], conf["event_queue_ttl"]
    mailbox = _core.Mailbox(
        app.broker_url,
        transport_options=app.transport_options(),
        connect_timeout=float(conf["broker_connection_timeout"] or 4.0),
        queue_expires=float(expires) if expires else None,
        queue_ttl=float(ttl) if ttl else None,
    )
    exchange = str(conf["event_exchange"] or "celeryev")
    prefix = str(conf.get("event_queue_prefix") or "celeryev")
    mailbox.subscribe(
        exchange,
        f"{prefix}.{uuid.uuid4()}",
        exchange_type="topic",
        routing_key="#",
        durable=True,
    )

    def next_events() -> list[dict[str, Any]]:
        got = mailbox.receive(1.0)
        if got is None:
            return []
        headers, body = got
        if headers is None:
            print(f"-> skipped an unreadable event message: {body}", file=sys.stderr)
            return []
        try:
            decoded = _core.loads(body)
        except Exception as exc:
            print(f"-> skipped an event message that is not JSON: {exc}", file=sys.stderr)
            return []
        items = decoded if isinstance(decoded, list) else [decoded]
        return [item for item in items if isinstance(item, dict) and "type" in item]

    return next_events


_TOOLS: dict[str, Callable[[argparse.Namespace], int]] = {
    "purge": _cmd_purge,
    "call": _cmd_call,
    "result": _cmd_result,
    "events": _cmd_events,
}


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
            return cli_flower.print_help()
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
        if ns.command == "multi":
            from celeriac import cli_multi

            return cli_multi.main(ns.multi_argv, _global_args(ns))
        if ns.command == "beat":
            return cli_beat.cmd_beat(ns)
        if ns.command == "flower":
            return cli_flower.cmd_flower(ns, passed_on)
        if ns.command in ("inspect", "control", "status"):
            return _cmd_remote(ns)
        if ns.command in _TOOLS:
            return _TOOLS[ns.command](ns)
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


if __name__ == "__main__":
    run()
