"""``celeriac worker``: its options, their checks, and the start of the worker (in the
foreground, or detached with ``-D``), as ``celery worker``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from celeriac.cli import beat as beat_cli
from celeriac.cli.common import (
    EX_CANTCREAT,
    EX_OK,
    LOGLEVELS,
    PROG,
    AppError,
    UsageError,
    add_global_options,
    loglevel,
    plural,
    prepare_app,
    seconds,
)

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.worker import Worker

POOL_CHOICES = ("prefork", "solo", "threads")
POOL_ALIASES = {"processes": "prefork"}
PLANNED_POOLS = ("eventlet", "gevent")


#: Celery ``worker`` options celeriac does not have: ``(flags, takes a value)``. Each is
#: parsed (so the error names it) and refused before anything starts.
UNSUPPORTED_WORKER_OPTIONS: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("-S", "--statedb"), True),
)
UNSUPPORTED_HELP = {
    "--statedb": "celeriac keeps revoked task ids in memory only",
}


# -- argument types ------------------------------------------------------------------


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
# -- parser --------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    worker = commands.add_parser(
        "worker",
        help="start a worker that runs the app's tasks",
        description="Start a worker: consume the queues and run the app's tasks.",
        epilog="Example: celeriac -A tasks worker -l info -Q celery,images -c 4 -P threads",
    )
    add_global_options(worker, suppress=True)
    worker.add_argument(
        "-l",
        "--loglevel",
        type=loglevel,
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
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="prefork: hard time limit of every task (task_time_limit)",
    )
    worker.add_argument(
        "--soft-time-limit",
        type=seconds,
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
        help="comma-separated queues to consume (default: every queue of task_queues, else "
        "task_default_queue, 'celery')",
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
        type=seconds,
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

    beat_cli.add_worker_options(worker)


# -- the command ---------------------------------------------------------------------


def cmd_worker(ns: argparse.Namespace) -> int:
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
    app = prepare_app(ns, include)
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
    embedded_beat = beat_cli.start_embedded(ns, app) if ns.beat else None
    try:
        if options.purge:
            _purge_queues(app, worker.queues)
        redirect_stdouts(log_settings)
        return _serve(worker)
    finally:
        if embedded_beat is not None:
            beat_cli.stop_embedded(embedded_beat)
        if pidfile is not None:
            pidfile.release()


def _serve(worker: Worker) -> int:
    """prefork: the supervisor forks the children and watches them (each child serves
    with ``Worker.run``); the other pools serve in this process."""
    if worker.pool_name == "prefork":
        from celeriac.worker.prefork import Supervisor

        worker.init_fixups()
        return Supervisor(worker).run()
    return worker.run()


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
    from celeriac.control import open_mailbox
    from celeriac.worker.base import scrub_error

    def clean(exc: Exception) -> str:
        return scrub_error(str(exc), app.broker_url, app.broker_url_masked)

    try:
        mailbox = open_mailbox(app)
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
            f"purge: discarded {count} {plural(count, 'message')} "
            f"from {plural(len(queues), 'queue')} {', '.join(queues)}.",
            flush=True,
        )


# -- remote control, as Celery's ``inspect``/``control``/``status`` -----------------
