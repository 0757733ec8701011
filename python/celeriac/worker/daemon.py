"""``celeriac worker -D``: start the worker as a daemon, as Celery's ``--detach`` does.

The command line checks its arguments and loads the app in the foreground (so mistakes
are reported on the terminal), then forks twice with a ``setsid`` in between (no
controlling terminal, not a session leader, reparented to init), moves to the working
directory, sets the umask, points stdin/stdout/stderr at ``/dev/null`` and ``exec``s a
fresh ``python -m celeriac ... worker`` without ``-D``: the daemon starts from a clean
process, not a fork of one that already imported the app.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

#: Flags removed from the daemon's command line (``--workdir`` takes a value).
DETACH_FLAGS = ("-D", "--detach")
VALUE_FLAGS = ("--workdir", "--executable")


def daemon_argv(args: Sequence[str]) -> list[str]:
    """The command line of the detached worker: ``args`` without ``-D/--detach``,
    ``--workdir`` (already applied) and ``--executable``."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in DETACH_FLAGS:
            continue
        if arg in VALUE_FLAGS:
            skip = True
            continue
        if any(arg.startswith(f"{flag}=") for flag in VALUE_FLAGS):
            continue
        kept.append(arg)
    return kept


def detach(
    args: Sequence[str],
    *,
    executable: str | None = None,
    logfile: str | None = None,
    workdir: str | None = None,
) -> None:
    """Run ``python -m celeriac *args`` as a daemon; returns at once in the caller.
    ``workdir`` defaults to the current directory, as Celery's. A failed ``exec`` is
    written to ``logfile`` (if any) before the daemon exits with status 1."""
    python = executable or sys.executable
    argv = [python, "-m", "celeriac", *daemon_argv(args)]
    folder = os.path.abspath(workdir or os.getcwd())
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        return  # the command line: done, as Celery's (status 0)
    try:
        os.setsid()  # a new session: no controlling terminal
        if os.fork() > 0:
            os._exit(0)  # the session leader goes; its child can never get a terminal
        os.chdir(folder)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, _max_fd())
        os.execv(python, argv)
    except BaseException as exc:  # nothing above may return into the caller's code
        _report(logfile, f"celeriac worker -D: cannot start {' '.join(argv)}: {exc}")
    os._exit(1)


def _max_fd() -> int:
    try:
        return max(3, min(os.sysconf("SC_OPEN_MAX"), 65536))
    except (ValueError, OSError):
        return 1024


def _report(logfile: str | None, message: str) -> None:
    if not logfile:
        return
    try:
        with open(logfile, "a", encoding="utf-8") as fh:
            fh.write(message + "\n")
    except OSError:
        pass


def check_before_detaching(logfile: str | None, pidfile: str | None) -> None:
    """What the daemon could no longer report once detached: ``OSError`` when the log
    file cannot be opened, ``PidfileLocked`` when the pidfile names a running worker.
    (Celery checks these after detaching, where the error is lost.)"""
    from celeriac.worker.options import Pidfile, PidfileLocked

    if logfile:
        with open(logfile, "a", encoding="utf-8"):
            pass
    if pidfile:
        lock = Pidfile(pidfile)
        try:
            pid = lock.read_pid()
        except FileNotFoundError:
            return
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                return  # another user's process reuses the pid: stale, replaced at start
            raise PidfileLocked(lock.path, pid)
