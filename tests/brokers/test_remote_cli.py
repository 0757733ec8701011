"""``celeriac inspect`` and ``celeriac control`` against a running celeriac worker on
the real Redis (remote control through the pidbox, as Celery's CLI does)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import RunCli, StartWorker, TasksDir


def test_inspect_ping_and_control_rate_limit(
    worker: StartWorker, tasks_dir: TasksDir, run_cli: RunCli
) -> None:
    node = f"cli-{tasks_dir.queue}@test"
    worker("-n", node)
    ping = run_cli("-A", "tasks", "inspect", "ping", "-d", node, "-t", "3")
    assert ping.returncode == 0, ping.stderr
    assert f"->  {node}: OK" in ping.stdout
    assert "pong" in ping.stdout
    assert "1 node online." in ping.stdout

    done = run_cli("-A", "tasks", "control", "rate_limit", "tasks.add", "10/m", "-d", node)
    assert done.returncode == 0, done.stderr
    assert "new rate limit set successfully" in done.stdout
    registered = run_cli("-A", "tasks", "inspect", "registered", "-d", node, "-t", "3")
    assert "tasks.add [rate_limit=10/m]" in registered.stdout

    bad = run_cli("-A", "tasks", "control", "rate_limit", "tasks.add", "10/x", "-d", node)
    assert f"->  {node}: ERROR" in bad.stdout
    assert "Invalid rate limit string" in bad.stdout


def test_broken_remote_control_arguments(tasks_dir: TasksDir, run_cli: RunCli) -> None:
    missing = run_cli("-A", "tasks", "control", "rate_limit", "tasks.add")
    assert missing.returncode == 2
    assert "rate_limit takes two arguments" in missing.stderr
    unknown = run_cli("-A", "tasks", "inspect", "no_such_method")
    assert unknown.returncode == 2
    timeout = run_cli("-A", "tasks", "inspect", "ping", "-t", "0")
    assert timeout.returncode == 2
    nobody = run_cli("-A", "tasks", "inspect", "ping", "-d", "nobody@nowhere", "-t", "0.5")
    assert nobody.returncode == 69
    assert "No nodes replied" in nobody.stderr
