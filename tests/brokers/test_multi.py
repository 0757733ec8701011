"""Daemonized workers as Celery starts them: ``worker -D`` and ``celeriac multi``
(start, stop, stopwait, restart, kill, show, names), and the systemd unit of
``docs/systemd.md``. Real detached worker processes on the real Redis; each test kills
the daemons it started (by the pids in their pidfiles) if it did not stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import ResultKeys, RunCli, TasksDir

WAIT = 20.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (the daemon is init's child, reaped there).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def read_pid(path: Path) -> int:
    assert wait_until(lambda: path.exists() and path.read_text().endswith("\n"), WAIT), (
        f"no pidfile {path}"
    )
    return int(path.read_text())


@pytest.fixture
def daemons(tasks_dir: TasksDir) -> Iterator[list[int]]:
    """Pids of daemons a test started: killed at teardown if still running."""
    pids: list[int] = []
    yield pids
    for pidfile in tasks_dir.path.glob("**/*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pids.append(int(pidfile.read_text()))
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def run_add(tasks_dir: TasksDir, result_keys: ResultKeys, x: int, y: int) -> int:
    tasks = tasks_dir.import_module()
    result = tasks.add.delay(x, y)
    result_keys.add(result.id)
    try:
        return int(result.get(timeout=WAIT))
    finally:
        tasks.app.close()


def test_detach_returns_and_the_daemon_runs_tasks_until_sigterm(
    tasks_dir: TasksDir, run_cli: RunCli, result_keys: ResultKeys, daemons: list[int]
) -> None:
    started = time.monotonic()
    done = run_cli(
        *("-A", "tasks", "worker", "-D", "-P", "solo", "-l", "info"),
        *("-f", "%n.log", "--pidfile", "%n.pid", "-n", "detached@%h"),
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < WAIT
    pid = read_pid(tasks_dir.path / "detached.pid")
    daemons.append(pid)
    assert alive(pid)
    assert os.getsid(pid) != os.getsid(0)  # its own session: no terminal of ours
    assert run_add(tasks_dir, result_keys, 20, 22) == 42
    log = (tasks_dir.path / "detached.log").read_text()
    assert "ready." in log
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not alive(pid), WAIT), log
    assert not (tasks_dir.path / "detached.pid").exists()


def test_detach_refuses_a_pidfile_of_a_running_worker(
    tasks_dir: TasksDir, run_cli: RunCli, daemons: list[int]
) -> None:
    args = ("-A", "tasks", "worker", "-D", "-P", "solo", "-f", "w.log", "--pidfile", "w.pid")
    assert run_cli(*args, timeout=WAIT).returncode == 0
    daemons.append(read_pid(tasks_dir.path / "w.pid"))
    again = run_cli(*args, timeout=WAIT)
    assert again.returncode == 73, again.stderr
    assert f"names process {daemons[0]}, which is running" in again.stderr
    assert alive(daemons[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_detach_with_an_unwritable_logfile_is_an_error_on_the_terminal(
    tasks_dir: TasksDir, run_cli: RunCli
) -> None:
    (tasks_dir.path / "ro").mkdir(mode=0o500)
    done = run_cli("-A", "tasks", "worker", "-D", "-f", "ro/w.log", timeout=WAIT)
    assert done.returncode == 2, done.stderr
    assert "argument -f/--logfile: cannot write" in done.stderr
