"""celeriac's command line against a running celeriac worker on the real Redis:
``inspect``/``control``/``status`` (remote control through the pidbox, as Celery's CLI
does), ``call``, ``result``, ``purge`` — each printed as Celery's CLI prints it."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
from conftest import celeriac_argv, queue_length

if TYPE_CHECKING:
    from conftest import ResultKeys, RunCli, StartWorker, TasksDir, WorkerProcess


def test_inspect_control_and_status(
    worker: StartWorker, tasks_dir: TasksDir, run_cli: RunCli
) -> None:
    node = f"cli-{tasks_dir.queue}@test"
    worker("-n", node)
    ping = run_cli("-A", "tasks", "inspect", "ping", "-d", node, "-t", "3")
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout == f"->  {node}: OK\n        pong\n\n1 node online.\n"

    done = run_cli("-A", "tasks", "control", "rate_limit", "tasks.add", "10/m", "-d", node)
    assert done.returncode == 0, done.stderr
    # control prints no node count, as Celery's
    assert done.stdout == f"->  {node}: OK\n        new rate limit set successfully\n"
    registered = run_cli("-A", "tasks", "inspect", "registered", "-d", node, "-t", "3")
    assert "    * tasks.add [rate_limit=10/m]\n" in registered.stdout
    as_json = run_cli("-A", "tasks", "inspect", "registered", "-d", node, "-t", "3", "-j")
    assert "tasks.add [rate_limit=10/m]" in json.loads(as_json.stdout)[node]

    status = run_cli("-A", "tasks", "status", "-d", node, "-t", "3")
    assert status.stdout == f"->  {node}: OK\n\n1 node online.\n"
    stats = run_cli("-A", "tasks", "inspect", "stats", "-d", node, "-t", "3")
    assert '"implementation": "celeriac.worker.pool:SoloPool"' in stats.stdout
    for method in ("active", "reserved", "scheduled", "revoked"):
        empty = run_cli("-A", "tasks", "inspect", method, "-d", node, "-t", "3")
        assert empty.stdout == f"->  {node}: OK\n    - empty -\n\n1 node online.\n", method

    bad = run_cli("-A", "tasks", "control", "rate_limit", "tasks.add", "10/x", "-d", node)
    assert f"->  {node}: ERROR" in bad.stdout
    assert "Invalid rate limit string" in bad.stdout
    unknown = run_cli("-A", "tasks", "control", "time_limit", "no.such", "1", "-d", node)
    assert unknown.stdout == f"->  {node}: ERROR\n        unknown task\n"
    # A queue the worker does not consume: Celery's reply all the same.
    consumer = run_cli("-A", "tasks", "control", "cancel_consumer", "other", "-d", node)
    assert consumer.stdout == f"->  {node}: OK\n        no longer consuming from other\n"
    listing = run_cli("-A", "tasks", "control", "--list")
    assert "rate_limit <task_name> <rate_limit" in listing.stdout


def test_nobody_answers(tasks_dir: TasksDir, run_cli: RunCli) -> None:
    nobody = run_cli("-A", "tasks", "inspect", "ping", "-d", "nobody@nowhere", "-t", "0.5")
    assert nobody.returncode == 69
    assert nobody.stderr == "Error: No nodes replied within time constraint\n"
    status = run_cli("-A", "tasks", "status", "-d", "nobody@nowhere", "-t", "0.5")
    assert status.returncode == 69


def test_unreachable_broker(tasks_dir: TasksDir, run_cli: RunCli) -> None:
    result = run_cli("-b", "redis://127.0.0.1:1/0", "-A", "tasks", "inspect", "ping")
    assert result.returncode == 69
    assert "Could not connect to the message broker" in result.stderr


def test_call_and_result(
    worker: StartWorker, tasks_dir: TasksDir, run_cli: RunCli, result_keys: ResultKeys
) -> None:
    worker()
    sent = run_cli("-A", "tasks", "call", "tasks.add", "--args", "[1, 2]", "--kwargs", "{}")
    assert sent.returncode == 0, sent.stderr
    task_id = result_keys.add(sent.stdout.strip())
    assert len(task_id) == 36
    got = run_cli("-A", "tasks", "result", task_id, "--timeout", "10")
    assert got.returncode == 0, got.stderr
    assert got.stdout == "3\n"

    later = run_cli(
        "-A", "tasks", "call", "tasks.mul", "--args", "[6, 7]", "--countdown", "0.5"
    )  # fmt: skip
    later_id = result_keys.add(later.stdout.strip())
    assert run_cli("-A", "tasks", "result", later_id, "--timeout", "10").stdout == "42\n"

    failed = run_cli("-A", "tasks", "call", "tasks.fail")
    failed_id = result_keys.add(failed.stdout.strip())
    raised = run_cli("-A", "tasks", "result", failed_id, "--timeout", "10")
    assert raised.returncode == 1
    assert "ValueError" in raised.stderr
    traceback = run_cli("-A", "tasks", "result", failed_id, "--traceback")
    assert traceback.returncode == 0
    assert "Traceback (most recent call last)" in traceback.stdout
    assert "ValueError: ('boom', 42)" in traceback.stdout

    pending = run_cli("-A", "tasks", "result", "no-such-task-id", "--timeout", "0.5")
    assert pending.returncode == 1
    assert "TimeoutError" in pending.stderr


def test_purge(
    tasks_dir: TasksDir, run_cli: RunCli, redis_client: redis.Redis, result_keys: ResultKeys
) -> None:
    for x in range(3):
        sent = run_cli("-A", "tasks", "call", "tasks.add", "--args", f"[{x}, 1]")
        result_keys.add(sent.stdout.strip())
    assert queue_length(redis_client, tasks_dir.queue) == 3

    # Without -f: Celery's prompt; anything but yes keeps the messages.
    declined = subprocess.run(
        celeriac_argv("-A", "tasks", "purge"),
        cwd=tasks_dir.path,
        env=tasks_dir.env,
        input="n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert declined.returncode == 1
    assert f"This will remove all tasks from queue: {tasks_dir.queue}." in declined.stdout
    assert "(to skip this prompt use the -f option)" in declined.stdout
    assert "Aborted!" in declined.stderr
    assert queue_length(redis_client, tasks_dir.queue) == 3

    purged = run_cli("-A", "tasks", "purge", "-f")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == "Purged 3 messages from 1 known task queue.\n"
    assert queue_length(redis_client, tasks_dir.queue) == 0
    again = run_cli("-A", "tasks", "purge", "-f", "-Q", tasks_dir.queue)
    assert again.stdout == "No messages purged from 1 queue.\n"
    excluded = run_cli("-A", "tasks", "purge", "-f", "-X", tasks_dir.queue)
    assert excluded.returncode == 0
    assert excluded.stdout == ""


def test_events_dump_on_sqlite(
    worker: StartWorker, tasks_dir: TasksDir, start_cli: Callable[..., WorkerProcess]
) -> None:
    """``events --dump`` on the embedded broker (celeriac's own event receiver)."""
    url = f"sqlite:///{tasks_dir.path}/events.db"
    dump = start_cli("-b", url, "-A", "tasks", "events", "--dump")
    dump.wait_for("-> evdump: starting capture...", timeout=15)
    node = f"ev-{tasks_dir.queue}@test"
    worker("-b", url, "-E", "-n", node)
    dump.wait_for(rf"^{node} \[.*\] started: .*sw_ident=celeriac", timeout=15)
    dump.signal(signal.SIGINT)
    assert dump.wait(15) == 0
