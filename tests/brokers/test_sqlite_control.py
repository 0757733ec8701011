"""Remote control on the embedded SQLite broker: ``celeriac inspect``/``control``/
``purge`` against a real worker on a temporary file (requests and replies are rows of
the file's ``broadcast`` log)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import REDIS_URL, worker_env

if TYPE_CHECKING:
    from conftest import RunCli, StartWorker, TasksDir


@pytest.fixture
def sqlite_tasks(tasks_dir: TasksDir, tmp_path: Path) -> TasksDir:
    url = f"sqlite://{tmp_path / 'celeriac.sqlite3'}"
    tasks_dir.env = worker_env(tasks_dir.queue, url, url)
    return tasks_dir


def test_inspect_and_control_a_worker_on_sqlite(
    sqlite_tasks: TasksDir, worker: StartWorker, run_cli: RunCli
) -> None:
    node = f"sq-{sqlite_tasks.queue}@test"
    process = worker("-n", node)
    ping = run_cli("-A", "tasks", "inspect", "ping", "-d", node, "-t", "5")
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout == f"->  {node}: OK\n        pong\n\n1 node online.\n"
    done = run_cli("-A", "tasks", "control", "rate_limit", "tasks.add", "10/m", "-d", node)
    assert done.stdout == f"->  {node}: OK\n        new rate limit set successfully\n"
    registered = run_cli("-A", "tasks", "inspect", "registered", "-d", node, "-t", "5")
    assert "    * tasks.add [rate_limit=10/m]\n" in registered.stdout
    # Without a destination every worker on the file answers.
    status = run_cli("-A", "tasks", "status", "-t", "2")
    assert status.stdout == f"->  {node}: OK\n\n1 node online.\n"
    assert "Remote control is off" not in process.log


def test_nobody_answers_on_sqlite(sqlite_tasks: TasksDir, run_cli: RunCli) -> None:
    nobody = run_cli("-A", "tasks", "inspect", "ping", "-d", "nobody@nowhere", "-t", "0.5")
    assert nobody.returncode == 69
    assert nobody.stderr == "Error: No nodes replied within time constraint\n"


#: Sends two tasks nobody consumes (no worker runs).
SEND = textwrap.dedent(
    """
    import tasks
    tasks.add.delay(1, 2)
    tasks.add.delay(3, 4)
    tasks.app.close() if hasattr(tasks.app, "close") else None
    """
)


def test_purge_on_sqlite(sqlite_tasks: TasksDir, run_cli: RunCli) -> None:
    subprocess.run(
        [sys.executable, "-c", SEND],
        cwd=sqlite_tasks.path,
        env=sqlite_tasks.env,
        check=True,
        timeout=60,
    )
    purged = run_cli("-A", "tasks", "purge", "-f", "-Q", sqlite_tasks.queue)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("Purged 2 messages from 1 known task queue")
    again = run_cli("-A", "tasks", "purge", "-f", "-Q", sqlite_tasks.queue)
    assert again.stdout.startswith("No messages purged from 1 queue")


#: Sends 40 additions and prints the sum of their results (60 s bound on each).
SEND_AND_SUM = textwrap.dedent(
    """
    import tasks
    results = [tasks.add.delay(i, i) for i in range(40)]
    print(sum(result.get(timeout=60) for result in results))
    """
)


@pytest.mark.parametrize("results", ["sqlite", "redis"])
def test_prefork_worker_on_sqlite(
    results: str, sqlite_tasks: TasksDir, tmp_path: Path, worker: StartWorker, run_cli: RunCli
) -> None:
    """A new user's first worker: the default pool (prefork) on the SQLite file, which
    does not exist yet. Two children share the file with the supervisor; the node answers
    remote control once. With results elsewhere the supervisor's only use of the file
    before it forks is its probe: the children were once forked while the probe's
    threads were still closing their connections, and found the file locked for good."""
    db = tmp_path / "celeriac.sqlite3"
    assert not db.exists()
    if results == "redis":
        sqlite_tasks.env = worker_env(sqlite_tasks.queue, f"sqlite://{db}", REDIS_URL)
    node = f"sqp-{sqlite_tasks.queue}@test"
    process = worker("-n", node, "-c", "2", pool="prefork")
    sent = subprocess.run(
        [sys.executable, "-c", SEND_AND_SUM],
        cwd=sqlite_tasks.path,
        env=sqlite_tasks.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == f"{sum(2 * i for i in range(40))}\n"
    ping = run_cli("-A", "tasks", "inspect", "ping", "-d", node, "-t", "5")
    assert ping.stdout == f"->  {node}: OK\n        pong\n\n1 node online.\n"
    stats = run_cli("-A", "tasks", "inspect", "stats", "-d", node, "-j", "-t", "5")
    assert stats.returncode == 0, stats.stderr
    assert len(json.loads(stats.stdout)[node]["pool"]["processes"]) == 2
    assert "database is locked" not in process.log
