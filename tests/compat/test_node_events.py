"""A prefork node seen from outside, as one Celery worker: through Celery's own event
receiver feeding ``celery.events.state.State``, and through the real Flower.

- ``worker-heartbeat`` counts every task the node ran (``processed``) and the tasks
  running now (``active``), whichever child runs them;
- each delivery that runs a task is announced once (``task-received``) with its true
  retry count, even when a child gave the message back to a sibling (``-O fair``), and
  a message given back keeps everything it carried (retries, ETA, headers).

On Redis (the give-back is off on RabbitMQ for now). The workers run on the default
pool (no ``-P``) with four children.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    EVENT_WAIT,
    READY_TIMEOUT,
    REDIS_URL,
    ResultKeys,
    TasksDir,
    WorkerProcess,
    app_module,
    celeriac_argv,
)

from compat.test_events import Capture

#: Ports this suite may give the Flower it starts.
FLOWER_PORTS = range(7300, 7400)

NODE_TASKS_PY = app_module(
    "node_tasks",
    '''

@app.task
def add(x, y):
    return x + y


@app.task
def pause(seconds):
    time.sleep(seconds)
    return seconds


@app.task
async def nap(seconds):
    await asyncio.sleep(seconds)
    return seconds


@app.task(bind=True, max_retries=3)
def flaky(self, succeed_after):
    time.sleep(0.2)
    if self.request.retries < succeed_after:
        raise self.retry(countdown=0.1)
    return self.request.retries


@app.task(bind=True)
def report(self, key):
    """What this delivery carried, left in Redis."""
    time.sleep(0.2)
    eta = self.request.eta
    seen = {
        "retries": self.request.retries,
        "eta": None if eta is None else str(eta),
        "headers": self.request.headers or {},
    }
    client().set(key, json.dumps(seen), ex=120)
''',
    imports=("import asyncio", "import json", "import time"),
    redis_client=True,
)


@pytest.fixture
def capture() -> Iterator[Capture]:
    watcher = Capture(REDIS_URL)
    yield watcher
    watcher.stop()


@pytest.fixture
def node_dir(tasks_dir: TasksDir) -> TasksDir:
    tasks_dir.write("node_tasks.py", NODE_TASKS_PY)
    return tasks_dir


def _start_node(tasks_dir: TasksDir, node: str, *extra: str) -> WorkerProcess:
    """``-E`` worker on the default pool (no ``-P``), four children."""
    argv = celeriac_argv(
        "-A", "node_tasks", "worker", "-l", "info", "-Q", tasks_dir.queue, "-c", "4", "-E",
        "-n", node, *extra,
    )  # fmt: skip
    process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
    process.wait_for(r" ready\.$", timeout=READY_TIMEOUT)
    return process


def _beat(node: str, test: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        return (
            event.get("type") == "worker-heartbeat"
            and event.get("hostname") == node
            and test(event)
        )

    return match


def test_heartbeats_count_every_task_of_the_node(
    node_dir: TasksDir, capture: Capture, result_keys: ResultKeys
) -> None:
    node = f"beat-{node_dir.queue[-8:]}@test"
    worker = _start_node(node_dir, node, "--heartbeat-interval", "0.5")
    try:
        tasks = node_dir.import_module("node_tasks")
        quick = [tasks.add.delay(i, i) for i in range(23)]
        for result in quick:
            result_keys.add(result.id)
        assert [r.get(timeout=EVENT_WAIT) for r in quick] == [2 * i for i in range(23)]
        beat = capture.wait_for(_beat(node, lambda e: e["processed"] >= 23), "23 processed")[0]
        assert beat["processed"] == 23

        # Coroutines run in the children too, three at once here.
        naps = [tasks.nap.delay(3) for _ in range(3)]
        for result in naps:
            result_keys.add(result.id)
        capture.wait_for(_beat(node, lambda e: e["active"] == 3), "a heartbeat with 3 active")
        assert [r.get(timeout=EVENT_WAIT) for r in naps] == [3, 3, 3]
        capture.wait_for(
            _beat(node, lambda e: e["active"] == 0 and e["processed"] == 26),
            "a heartbeat with 0 active, 26 processed",
        )
        with capture._cond:
            seen = capture.state.workers[node]
            assert (seen.active, seen.processed) == (0, 26)
    finally:
        assert worker.stop() == 0, worker.log
