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

import collections
import datetime
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from conftest import (
    EVENT_WAIT,
    READY_TIMEOUT,
    REDIS_URL,
    ResultKeys,
    Scratch,
    TasksDir,
    WorkerProcess,
    app_module,
    celeriac_argv,
    wait_until,
)

from compat.conftest import Flower, module_on_broker
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


@pytest.fixture(params=["redis", "amqp"])
def node_dir(request: pytest.FixtureRequest, tasks_dir: TasksDir) -> Iterator[TasksDir]:
    """The test's directory with ``node_tasks``, on Redis or RabbitMQ (results in Redis)."""
    with module_on_broker(request.param, tasks_dir, "node_tasks", NODE_TASKS_PY) as ready:
        yield ready


@pytest.fixture
def redis_node_dir(tasks_dir: TasksDir) -> TasksDir:
    """``node_dir`` on Redis only (the give-back is off on RabbitMQ for now)."""
    tasks_dir.write("node_tasks.py", NODE_TASKS_PY)
    return tasks_dir


@pytest.fixture
def capture(tasks_dir: TasksDir) -> Iterator[Capture]:
    watcher = Capture(tasks_dir.env["CELERIAC_TEST_BROKER"])
    yield watcher
    watcher.stop()


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


# -- Flower -------------------------------------------------------------------------


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[Flower]:
    started = Flower(tmp_path, FLOWER_PORTS)
    yield started
    started.stop()


def _received_counts(log: str) -> collections.Counter[str]:
    """How many times the worker's processes logged each task id as received."""
    return collections.Counter(re.findall(r"Task [\w.]+\[([^\]]+)\] received", log))


def test_flower_counts_each_delivery_once_with_its_retries(
    redis_node_dir: TasksDir,
    capture: Capture,
    flower: Flower,
    redis_client: redis.Redis,
    scratch: Scratch,
    result_keys: ResultKeys,
) -> None:
    node = f"fair-{redis_node_dir.queue[-8:]}@test"
    tasks = redis_node_dir.import_module("node_tasks")
    # Queued before the node starts: each child fetches a few at once and, before the
    # first (never run, so maybe long), gives the others back to its siblings.
    pauses = [tasks.pause.delay(0.2) for _ in range(20)]
    retried = tasks.flaky.delay(1)
    sender = Celery("sender", broker=REDIS_URL, set_as_current=False)
    due = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    keys = [scratch(f"report-{n}") for n in range(2)]
    try:
        reports = [
            sender.send_task(
                "node_tasks.report",
                args=[key],
                queue=redis_node_dir.queue,
                retries=2,
                eta=due,
                headers={"x-carried": "yes"},
            )
            for key in keys
        ]
    finally:
        sender.close()
    ids = [r.id for r in (*pauses, retried, *reports)]
    for task_id in ids:
        result_keys.add(task_id)

    worker = _start_node(redis_node_dir, node)
    try:
        assert [r.get(timeout=EVENT_WAIT) for r in pauses] == [0.2] * 20
        assert retried.get(timeout=EVENT_WAIT) == 1
        assert wait_until(lambda: all(redis_client.exists(k) for k in keys), EVENT_WAIT)
        seen = flower.get(f"/api/workers?workername={node}&refresh=1")
        assert seen[node]["stats"]["total"] == {
            "node_tasks.pause": 20,
            "node_tasks.flaky": 2,
            "node_tasks.report": 2,
        }
        assert seen[node]["stats"]["pool"]["max-concurrency"] == 4
    finally:
        assert worker.stop() == 0, worker.log
    offline = capture.wait_for(
        lambda e: e["type"] == "worker-offline" and e["hostname"] == node, "worker-offline"
    )[0]
    # The children's events were all written before the node's worker-offline.
    assert offline["processed"] == 24  # 23 messages, one run twice

    given_back = [i for i, n in _received_counts(worker.log).items() if n > 1]
    assert given_back, "no child gave a message back: the test did not test the give-back"

    for key in keys:  # what a given-back message carried, it still carried
        carried = json.loads(redis_client.get(key) or b"{}")
        assert carried["retries"] == 2
        assert datetime.datetime.fromisoformat(carried["eta"]) == due
        assert carried["headers"].get("x-carried") == "yes"

    with capture._cond:
        received = collections.Counter(
            e["uuid"]
            for e in capture.events
            if e["type"] == "task-received" and e["hostname"] == node
        )
        state = capture.state
        assert state.tasks[retried.id].retries == 1
        assert state.tasks[retried.id].state == "SUCCESS"
        assert [state.tasks[r.id].retries for r in reports] == [2, 2]
        assert state.workers[node].processed == 24
    assert received == {i: 2 if i == retried.id else 1 for i in ids}

    # Flower: once it has the node's worker-offline, it has everything before it.
    def flower_row() -> dict[str, Any]:
        rows = flower.get("/workers?json=1")["data"]
        return next((r for r in rows if r.get("hostname") == node), {})

    assert wait_until(lambda: flower_row().get("worker-offline") == 1, EVENT_WAIT), flower_row()
    row = flower_row()
    assert row["task-received"] == 24, row  # Flower's "Processed" column
    assert row["task-succeeded"] == 23, row
    assert row["processed"] == 24, row
    listed = flower.get(f"/api/tasks?workername={node}")
    assert sorted(listed) == sorted(ids)
    assert listed[retried.id]["retries"] == 1
    assert listed[retried.id]["state"] == "SUCCESS"
    assert [listed[r.id]["retries"] for r in reports] == [2, 2]
