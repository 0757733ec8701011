"""Daemonized workers as Celery starts them: ``worker -D`` and ``celeriac multi``
(start, stop, stopwait, restart, kill, show, names), and the systemd unit of
``docs/systemd.md``. Real detached worker processes on the real Redis; each test kills
the daemons it started (by the pids in their pidfiles) if it did not stop them."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import WorkerProcess, wait_until

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
    tasks_dir: TasksDir, run_cli: RunCli, daemons: list[int]
) -> None:
    (tasks_dir.path / "ro").mkdir(mode=0o500)
    done = run_cli(
        "-A", "tasks", "worker", "-D", "-f", "ro/w.log", "--pidfile", "w.pid", timeout=WAIT
    )
    assert done.returncode == 2, done.stderr
    assert "argument -f/--logfile: cannot write" in done.stderr


def multi(run_cli: RunCli, *args: str) -> str:
    done = run_cli("multi", *args, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_multi_start_runs_tasks_and_stopwait_ends_every_node(
    tasks_dir: TasksDir, run_cli: RunCli, result_keys: ResultKeys, daemons: list[int]
) -> None:
    (tasks_dir.path / "run").mkdir()
    args = (
        *("w1", "w2", "-A", "tasks", "-P", "threads", "-l", "info"),
        *("--pidfile=run/%n.pid", "--logfile=run/%n%I.log", "-c:w1", "3"),
    )
    out = multi(run_cli, "start", *args)
    assert "w1@" in out and "w2@" in out
    pidfiles = [tasks_dir.path / "run" / f"{name}.pid" for name in ("w1", "w2")]
    pids = [read_pid(path) for path in pidfiles]
    daemons.extend(pids)
    assert all(alive(pid) for pid in pids)
    for path in (tasks_dir.path / "run" / "w1.log", tasks_dir.path / "run" / "w2.log"):
        assert wait_until(lambda p=path: " ready." in p.read_text(), WAIT), path
    assert [run_add(tasks_dir, result_keys, n, n) for n in range(4)] == [0, 2, 4, 6]
    out = multi(run_cli, "stopwait", *args)
    assert out.count("stopped") == 2, out
    assert not any(alive(pid) for pid in pids)
    assert not any(path.exists() for path in pidfiles)


def test_multi_restart_replaces_the_process(
    tasks_dir: TasksDir, run_cli: RunCli, result_keys: ResultKeys, daemons: list[int]
) -> None:
    args = ("1", "-A", "tasks", "-P", "solo")
    multi(run_cli, "start", *args)
    pidfile = tasks_dir.path / "celery1.pid"
    old = read_pid(pidfile)
    daemons.append(old)
    multi(run_cli, "restart", *args)
    new = read_pid(pidfile)
    daemons.append(new)
    assert new != old and not alive(old) and alive(new)
    assert run_add(tasks_dir, result_keys, 2, 3) == 5
    multi(run_cli, "kill", *args)
    assert wait_until(lambda: not alive(new), WAIT)
    assert not pidfile.exists()


def test_multi_names_and_show(run_cli: RunCli) -> None:
    names = multi(run_cli, "names", "3").split()
    assert [name.partition("@")[0] for name in names] == ["celery1", "celery2", "celery3"]
    shown = multi(run_cli, "show", "a", "b", "-A", "tasks", "-c:b", "4", "--loglevel:1=debug")
    first, second = shown.splitlines()
    assert "-n a@" in first and "--loglevel=debug" in first and "-c 4" not in first
    assert "-n b@" in second and "-c 4" in second and "--loglevel" not in second


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bogus", "w1"], "unknown command 'bogus'"),
        (["start"], "no nodes given"),
        (["start", "w1", "-c:w9", "3"], "'w9' names none of the nodes"),
        (["stop", "w1", "w1"], "given twice"),
        (["start", "w1", "--pidfile=%q.pid"], "unknown format key %q"),
    ],
)
def test_multi_bad_input_is_a_clear_error(
    tasks_dir: TasksDir, run_cli: RunCli, args: list[str], message: str
) -> None:
    done = run_cli("multi", *args, timeout=60)
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith("celeriac multi: error: ")
    assert message in done.stderr
    assert not list(tasks_dir.path.glob("*.pid"))


# -- docs/systemd.md: its units' commands, run as systemd would run them -------------------

SYSTEMD_DOC = Path(__file__).resolve().parents[2] / "docs" / "systemd.md"


def doc_blocks(language: str) -> list[str]:
    text = SYSTEMD_DOC.read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def unit_commands(unit: str) -> dict[str, list[str]]:
    """``ExecStart`` & co. of a unit: continuation lines joined as systemd joins them,
    split into words as systemd splits them (quotes kept together)."""
    joined = re.sub(r"\\\n", " ", unit)
    commands = {}
    for line in joined.splitlines():
        key, eq, value = line.partition("=")
        if eq and key.startswith("Exec"):
            commands[key] = shlex.split(value)
    return commands


def environment_file() -> dict[str, str]:
    (block,) = doc_blocks("sh")
    values = {}
    for line in block.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = shlex.split(value)[0]
    return values


def run_unit_command(argv: list[str], tasks_dir: TasksDir, env: dict[str, str]) -> None:
    done = subprocess.run(
        argv,
        cwd=tasks_dir.path,
        env={**tasks_dir.env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{argv}:\n{done.stdout}{done.stderr}"


def test_systemd_multi_unit_starts_reloads_and_stops_workers(
    tasks_dir: TasksDir, result_keys: ResultKeys, daemons: list[int]
) -> None:
    forking = next(unit for unit in doc_blocks("ini") if "Type=forking" in unit)
    commands = unit_commands(forking)
    assert set(commands) == {"ExecStart", "ExecStop", "ExecReload"}
    env = environment_file()
    run_dir, log_dir = tasks_dir.path / "run", tasks_dir.path / "log"
    run_dir.mkdir()
    log_dir.mkdir()
    # The documented values, pointed at this test's directory, app and Python.
    env.update(
        CELERY_BIN=f"{sys.executable} -m celeriac",
        CELERY_APP="tasks",
        CELERYD_OPTS=env["CELERYD_OPTS"] + " --pool=threads",
        CELERYD_LOG_FILE=str(log_dir / Path(env["CELERYD_LOG_FILE"]).name),
        CELERYD_PID_FILE=str(run_dir / Path(env["CELERYD_PID_FILE"]).name),
    )
    nodes = env["CELERYD_NODES"].split()
    pidfiles = [run_dir / f"{node}.pid" for node in nodes]
    run_unit_command(commands["ExecStart"], tasks_dir, env)
    pids = [read_pid(path) for path in pidfiles]
    daemons.extend(pids)
    assert run_add(tasks_dir, result_keys, 1, 2) == 3
    run_unit_command(commands["ExecReload"], tasks_dir, env)
    new_pids = [read_pid(path) for path in pidfiles]
    daemons.extend(new_pids)
    assert not set(new_pids) & set(pids)
    assert not any(alive(pid) for pid in pids)
    assert run_add(tasks_dir, result_keys, 3, 4) == 7
    run_unit_command(commands["ExecStop"], tasks_dir, env)
    assert not any(alive(pid) for pid in new_pids)
    assert not any(path.exists() for path in pidfiles)
    assert all((log_dir / f"{node}.log").exists() for node in nodes)


def test_systemd_simple_unit_runs_a_worker_stopped_by_sigterm(
    tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    simple = next(unit for unit in doc_blocks("ini") if "Type=simple" in unit)
    assert "KillSignal=SIGTERM" in simple
    env = environment_file()
    env.update(
        CELERY_BIN=f"{sys.executable} -m celeriac",
        CELERY_APP="tasks",
        CELERYD_OPTS=env["CELERYD_OPTS"] + " --pool=threads",
    )
    process = WorkerProcess(
        unit_commands(simple)["ExecStart"], tasks_dir.path, {**tasks_dir.env, **env}
    )
    try:
        process.wait_for(r" ready\.$", timeout=WAIT)
        assert run_add(tasks_dir, result_keys, 5, 6) == 11
        assert process.stop() == 0, process.log  # SIGTERM, as systemd stops it
    finally:
        process.kill()
