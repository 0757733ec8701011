"""Rate limits hold per worker node, as in Celery, on the default pool (prefork).

Each prefork child takes messages of its own; with a token bucket per child, ``-c 4``
ran a ``30/m`` task four times at once and at 2/s after. The tasks record when they
start; the assertions count those start times within a window that has closed.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import TYPE_CHECKING

import redis
from conftest import (
    READY_TIMEOUT,
    RunCli,
    Scratch,
    TasksDir,
    WorkerProcess,
    app_module,
    celeriac_argv,
    wait_until,
)

if TYPE_CHECKING:
    from conftest import ResultKeys

#: The limit the tests set, ``30/m``: one start every two seconds for the whole node.
RATE = "30/m"
INTERVAL = 2.0
#: Starts allowed within 1.5 intervals of the first: the first and the next one. Per
#: child buckets start four at once.
WINDOW = 1.5 * INTERVAL

LIMITED_PY = app_module(
    "tasks",
    """
if os.environ.get("STAMP_RATE"):  # the worker's environment
    app.conf.task_annotations = {"tasks.stamp": {"rate_limit": os.environ["STAMP_RATE"]}}


@app.task
def stamp(key):
    client().rpush(key, repr(time.time()))
""",
    imports=("import time",),
    redis_client=True,
)


def _start_default_pool(tasks_dir: TasksDir, node: str, rate: str) -> WorkerProcess:
    """A worker on the default pool (no ``-P``) with four children."""
    tasks_dir.write("tasks.py", LIMITED_PY)
    tasks_dir.env["STAMP_RATE"] = rate
    argv = celeriac_argv(
        "-A", "tasks", "worker", "-l", "info", "-Q", tasks_dir.queue, "-c", "4", "-n", node
    )
    process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
    process.wait_for(r" ready\.$", timeout=READY_TIMEOUT)
    assert "(prefork)" in process.stdout, process.stdout  # the banner's concurrency line
    return process


def _starts(client: redis.Redis, key: str) -> list[float]:
    return sorted(float(raw) for raw in client.lrange(key, 0, -1))


def _check_one_start_per_interval(
    tasks: ModuleType, client: redis.Redis, key: str, result_keys: ResultKeys
) -> None:
    """Send a dozen ``stamp`` tasks; wait (bounded) until one started after the window
    that opens with the first start, so the window is closed; count the starts in it."""
    sent = time.time()
    for _ in range(12):
        result_keys.add(tasks.stamp.delay(key).id)

    def closed() -> bool:
        starts = _starts(client, key)
        return bool(starts) and starts[-1] >= starts[0] + WINDOW

    assert wait_until(closed, timeout=20.0), f"starts: {_starts(client, key)}"
    starts = _starts(client, key)
    assert starts[0] >= sent
    in_window = [t for t in starts if t < starts[0] + WINDOW]
    assert len(in_window) <= 2, [round(t - starts[0], 3) for t in starts]


def test_a_rate_limit_holds_for_the_node_not_per_child(
    tasks_dir: TasksDir, redis_client: redis.Redis, scratch: Scratch, result_keys: ResultKeys
) -> None:
    node = f"rate-{tasks_dir.queue[-8:]}@test"
    process = _start_default_pool(tasks_dir, node, RATE)
    try:
        key = scratch("starts")
        _check_one_start_per_interval(tasks_dir.import_module(), redis_client, key, result_keys)
    finally:
        assert process.stop() == 0, process.log


def test_control_rate_limit_changes_the_node_bucket(
    tasks_dir: TasksDir,
    redis_client: redis.Redis,
    scratch: Scratch,
    run_cli: RunCli,
    result_keys: ResultKeys,
) -> None:
    node = f"ratectl-{tasks_dir.queue[-8:]}@test"
    # One an hour: without the change only the first of these tasks would run.
    process = _start_default_pool(tasks_dir, node, "1/h")
    try:
        key = scratch("starts")
        tasks = tasks_dir.import_module()
        result_keys.add(tasks.stamp.delay(key).id)
        assert wait_until(lambda: redis_client.llen(key) == 1, timeout=15.0)
        changed = run_cli("-A", "tasks", "control", "rate_limit", "tasks.stamp", RATE, "-d", node)
        assert changed.stdout == f"->  {node}: OK\n        new rate limit set successfully\n"
        redis_client.delete(key)
        _check_one_start_per_interval(tasks, redis_client, key, result_keys)
    finally:
        assert process.stop() == 0, process.log
