"""``celeriac beat``: the periodic task scheduler's command (Celery's ``celery beat``)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from celeriac.cli.common import (
    EX_CANTCREAT,
    EX_FAILURE,
    EX_OK,
    PROG,
    UsageError,
    add_global_options,
    loglevel,
    prepare_app,
)

if TYPE_CHECKING:
    from celeriac.beat import Beat
    from celeriac.worker.options import PidfileLocked

#: Schedulers that mean "the default": celeriac's shared-store scheduler.
DEFAULT_SCHEDULERS = frozenset(
    {"celery.beat:PersistentScheduler", "celery.beat.PersistentScheduler",
     "celeriac.beat:Beat"}
)  # fmt: skip


def add_parser(commands: Any) -> None:
    beat = commands.add_parser(
        "beat",
        help="start the periodic task scheduler",
        description="Send the periodic tasks of beat_schedule when they are due. Several "
        "beats (and workers with -B) may run at once: each run is sent once.",
        epilog="Example: celeriac -A proj beat -l info",
    )
    add_global_options(beat, suppress=True)
    beat.add_argument("-s", "--schedule", default=None, metavar="NAME",
                      help="the schedule's name in the shared store (Celery: its file; "
                      "default: beat_schedule_filename, celerybeat-schedule)")  # fmt: skip
    beat.add_argument("-S", "--scheduler", default=None, metavar="CLASS",
                      help="only Celery's default (celery.beat:PersistentScheduler) is "
                      "accepted: celeriac's scheduler keeps its state in the broker's "
                      "store")  # fmt: skip
    beat.add_argument("--max-interval", type=float, default=None, metavar="SECONDS",
                      help="longest sleep between two checks of the schedule (default: "
                      "beat_max_loop_interval, else 300)")  # fmt: skip
    beat.add_argument("-l", "--loglevel", type=loglevel, default="warning", metavar="LEVEL",
                      help="logging level (default: warning)")  # fmt: skip
    beat.add_argument("-f", "--logfile", default=None, metavar="FILE",
                      help="log to this file (default: stderr)")  # fmt: skip
    beat.add_argument("--pidfile", default=None, metavar="FILE",
                      help="write the pid here; refuse to start if it names a running "
                      "process")  # fmt: skip
    beat.add_argument("--detach", action="store_true", default=None,
                      help="run beat as a daemon, in the background (give -f and --pidfile "
                      "to find its log and stop it)")  # fmt: skip
    beat.add_argument("--executable", default=None, metavar="PYTHON",
                      help="with --detach: the Python that runs the daemon (default: this "
                      "one)")  # fmt: skip
    beat.add_argument("--exit-with-parent", type=int, default=None, help=argparse.SUPPRESS)


def add_worker_options(worker: argparse.ArgumentParser) -> None:
    """``worker -B`` and the beat options that go with it."""
    worker.add_argument(
        "-B", "--beat", action="store_true", help="also run beat (periodic tasks) beside it"
    )
    worker.add_argument(
        "-s", "--schedule", "--schedule-filename", dest="schedule", default=None,
        metavar="NAME", help="beat's schedule name (with -B)",
    )  # fmt: skip
    worker.add_argument(
        "--scheduler", default=None, metavar="CLASS", help="beat's scheduler (with -B)"
    )


def _check_file_option(flag: str, path: str, usage_error: type[Exception]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not path.strip() or os.path.isdir(path):
        raise usage_error(f"argument {flag}: {path!r} is not a file name")
    if not os.path.isdir(folder):
        raise usage_error(f"argument {flag}: the directory {folder} does not exist")


def banner(beat: Beat, logfile: str | None, level: str) -> str:
    from celeriac import __version__

    app = beat.app
    return "\n".join(
        [
            f"celeriac beat v{__version__} is starting.",
            f"LocalTime -> {app.now():%Y-%m-%d %H:%M:%S}",
            "Configuration ->",
            f"    . broker -> {app.broker_url_masked}",
            f"    . scheduler -> celeriac.beat:Beat (shared store: {beat.store_url})",
            f"    . db -> {beat.schedule_name}",
            f"    . logfile -> {logfile or '[stderr]'}@%{level.upper()}",
            f"    . maxinterval -> {beat.max_interval:g} seconds",
            "",
        ]
    )


def cmd_beat(ns: argparse.Namespace) -> int:
    from celeriac import _core
    from celeriac.beat import Beat, BeatError
    from celeriac.worker.log import parse_loglevel, setup_logging
    from celeriac.worker.options import Pidfile, PidfileLocked

    if ns.executable is not None and not ns.detach:
        raise UsageError("argument --executable: only with --detach")
    if ns.scheduler is not None and ns.scheduler not in DEFAULT_SCHEDULERS:
        raise UsageError(
            f"argument -S/--scheduler: {ns.scheduler!r} is not supported: celeriac's "
            "scheduler keeps the schedule's state in Redis or SQLite (give no -S)"
        )
    if ns.max_interval is not None and not ns.max_interval > 0:
        raise UsageError(f"argument --max-interval: must be positive, not {ns.max_interval}")
    for flag, path in (("-f/--logfile", ns.logfile), ("--pidfile", ns.pidfile)):
        if path is not None:
            _check_file_option(flag, path, UsageError)
    if ns.schedule is not None and not ns.schedule.strip():
        raise UsageError("argument -s/--schedule: an empty name")
    level = parse_loglevel(ns.loglevel)
    app = prepare_app(ns)
    try:
        setup_logging(level, ns.logfile)
    except OSError as exc:
        raise UsageError(
            f"argument -f/--logfile: cannot write {exc.filename}: {exc.strerror}"
        ) from None
    try:
        beat = Beat(
            app,
            schedule_filename=ns.schedule,
            max_interval=ns.max_interval,
            parent_pid=ns.exit_with_parent,
        )
    except BeatError as exc:
        raise UsageError(str(exc)) from None
    if ns.detach:
        return _detach(ns, app)
    pidfile = None
    if ns.pidfile is not None:
        pidfile = Pidfile(ns.pidfile)
        try:
            pidfile.acquire()
        except PidfileLocked as exc:
            return _already_running(exc)
        except OSError as exc:
            raise UsageError(f"argument --pidfile: cannot write {ns.pidfile}: {exc}") from None

    def stop(signum: int, frame: Any) -> None:
        beat.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        try:
            beat.setup()
        except BeatError as exc:
            raise UsageError(str(exc)) from None
        except _core.OperationalError as exc:
            print(f"{PROG} beat: error: cannot use the schedule store: {exc}", file=sys.stderr)
            return EX_FAILURE
        print(banner(beat, ns.logfile, ns.loglevel), flush=True)
        beat.serve()
        return 0
    finally:
        app.close()
        if pidfile is not None:
            pidfile.release()


def _already_running(exc: PidfileLocked) -> int:

    print(
        f"{PROG} beat: error: the pidfile {exc.path} names process {exc.pid}, which is "
        "running: is this beat already running? (remove the file if not)",
        file=sys.stderr,
    )
    return EX_CANTCREAT


def _detach(ns: argparse.Namespace, app: Any) -> int:
    """``beat --detach``: the schedule, the log file and the pidfile are checked here,
    where an error still reaches the terminal; then the same command line, without
    ``--detach``, runs afresh as a daemon (as ``worker -D`` does)."""
    from celeriac.beat import BeatError, read_schedule
    from celeriac.worker.daemon import check_before_detaching, detach
    from celeriac.worker.options import PidfileLocked

    try:
        read_schedule(app, app.conf["beat_schedule"])
    except BeatError as exc:
        raise UsageError(str(exc)) from None
    try:
        check_before_detaching(ns.logfile, ns.pidfile)
    except PidfileLocked as exc:
        return _already_running(exc)
    except OSError as exc:
        raise UsageError(
            f"argument -f/--logfile: cannot write {ns.logfile}: {exc.strerror}"
        ) from None
    if ns.logfile is None:
        print(f"{PROG} beat: warning: --detach without -f: beat's log is lost", file=sys.stderr)
    app.close()
    detach(ns.raw_args, executable=ns.executable, logfile=ns.logfile)
    return EX_OK


def start_embedded(ns: argparse.Namespace, app: Any) -> subprocess.Popen[bytes]:
    """``worker -B``: beat in a child process (as Celery runs it beside a prefork
    pool: no thread to carry across fork). Its schedule is checked here first, so a
    bad one stops the worker at start; the child ends with the worker, even a killed
    one (it watches its parent)."""
    from celeriac.beat import BeatError, read_schedule
    from celeriac.worker.options import expand_nodename, node_format

    if ns.scheduler is not None and ns.scheduler not in DEFAULT_SCHEDULERS:
        raise UsageError(
            f"argument --scheduler: {ns.scheduler!r} is not supported: celeriac's "
            "scheduler keeps the schedule's state in Redis or SQLite (give no --scheduler)"
        )
    app.finalize()
    try:
        read_schedule(app, app.conf["beat_schedule"])
    except BeatError as exc:
        raise UsageError(f"-B: {exc}") from None
    command = [sys.executable, "-m", "celeriac"]
    for flag, value in (
        ("--app", ns.app),
        ("--broker", ns.broker),
        ("--result-backend", ns.result_backend),
    ):
        if value:
            command += [flag, value]
    command += ["beat", "--loglevel", ns.loglevel, "--exit-with-parent", str(os.getpid())]
    if ns.schedule:
        command += ["--schedule", ns.schedule]
    if ns.logfile:
        # The worker's own file (its main process's: %i is 0, %I empty), as Celery's
        # embedded beat logs where the worker does; beat itself expands nothing.
        command += ["--logfile", node_format(ns.logfile, expand_nodename(ns.hostname))]
    env = dict(os.environ)
    if not ns.app and not env.get("CELERIAC_APP") and app.main:
        env["CELERIAC_APP"] = app.main
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)


def stop_embedded(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
