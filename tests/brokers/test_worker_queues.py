"""Which queues a worker started without ``-Q`` consumes: as Celery's worker, every
queue of ``task_queues`` (``app.amqp.queues.consume_from`` is all of them when ``-Q``
selects none), and the default queue when ``task_queues`` is unset. Real workers on
RabbitMQ, results in Redis; a real Celery client sends to a queue of ``task_queues``
other than the default one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import celery
import pytest
from conftest import (
    AMQP_URL,
    READY_TIMEOUT,
    REDIS_URL,
    WorkerProcess,
    app_module,
    celeriac_argv,
    delete_amqp,
    worker_env,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import TasksDir

QUEUES_PY = app_module(
    "tasks",
    """
SECOND = os.environ["CELERIAC_TEST_QUEUE"] + ".second"
app.conf.task_queues = [
    Queue(os.environ["CELERIAC_TEST_QUEUE"]),
    Queue(SECOND, Exchange(SECOND), routing_key=SECOND),
]


@app.task
def add(x, y):
    return x + y
""",
    imports=("from kombu import Exchange, Queue",),
)


@pytest.fixture
def rabbit(tasks_dir: TasksDir) -> Iterator[str]:
    """This test's modules on RabbitMQ; both queues removed afterwards."""
    tasks_dir.env = worker_env(tasks_dir.queue, AMQP_URL, REDIS_URL)
    second = f"{tasks_dir.queue}.second"
    yield second
    delete_amqp(AMQP_URL, tasks_dir.queue, second)


def _worker_without_q(tasks_dir: TasksDir) -> WorkerProcess:
    argv = celeriac_argv("-A", "tasks", "worker", "-l", "info", "-P", "solo")
    process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
    process.wait_for(r" ready\.$", timeout=READY_TIMEOUT)
    return process


def test_a_worker_without_q_consumes_every_queue_of_task_queues(
    tasks_dir: TasksDir, rabbit: str
) -> None:
    second = rabbit
    tasks_dir.write("tasks.py", QUEUES_PY)
    process = _worker_without_q(tasks_dir)
    try:
        tasks = tasks_dir.import_module()
        assert tasks.add.delay(1, 2).get(timeout=10) == 3
        assert tasks.add.apply_async((2, 3), queue=second).get(timeout=10) == 5

        # The real Celery client, with the same task_queues, routes to the second queue.
        client = celery.Celery("client", broker=AMQP_URL, backend=REDIS_URL)
        client.conf.task_queues = tasks.app.conf.task_queues
        client.conf.task_default_queue = tasks_dir.queue
        try:
            sent = client.send_task("tasks.add", (20, 22), queue=second)
            assert sent.get(timeout=10) == 42, process.log
        finally:
            client.close()
    finally:
        status = process.stop()
    assert status == 0, process.log
    # The banner lists both.
    assert f".> {second}" in process.log, process.log


def test_a_worker_without_q_and_without_task_queues_consumes_the_default_queue(
    tasks_dir: TasksDir, rabbit: str
) -> None:
    process = _worker_without_q(tasks_dir)
    try:
        tasks = tasks_dir.import_module()
        assert tasks.add.delay(1, 2).get(timeout=10) == 3
    finally:
        status = process.stop()
    assert status == 0, process.log
    assert f".> {tasks_dir.queue} " in process.log, process.log
