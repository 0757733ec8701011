"""Celery's first-steps tutorial on every broker and result backend pairing celeriac
supports: a real ``celeriac worker`` process and the test process as the client.

- ``redis`` broker + ``redis://`` results
- ``amqp`` (RabbitMQ) broker + ``rpc://`` results (replies through the broker)
- ``amqp`` broker + ``redis://`` results (the most common production pairing)
- the embedded ``sqlite`` file as broker and result store
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import AMQP_URL, REDIS_URL, delete_amqp, worker_env

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

PAIRS = {
    "redis+redis": (REDIS_URL, REDIS_URL),
    "amqp+rpc": (AMQP_URL, "rpc://"),
    "amqp+redis": (AMQP_URL, REDIS_URL),
    "sqlite+sqlite": ("sqlite", "sqlite"),
}


@pytest.fixture(params=sorted(PAIRS))
def pairing(
    request: pytest.FixtureRequest, tasks_dir: TasksDir, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    broker, backend = PAIRS[request.param]
    if broker == "sqlite":
        broker = backend = f"sqlite://{tmp_path / 'celeriac.sqlite3'}"
    tasks_dir.env = worker_env(tasks_dir.queue, broker, backend)
    yield broker, backend
    if broker.startswith("amqp"):
        # Our queue is durable (as Celery declares it): remove it.
        delete_amqp(broker, tasks_dir.queue)


def test_delay_get_ready_and_state(
    pairing: tuple[str, str], worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    worker()
    tasks = tasks_dir.import_module()
    result = tasks.add.delay(4, 4)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 8
    assert result.ready()
    assert result.successful()
    assert result.state == "SUCCESS"
    other = tasks.mul.delay(6, 7)
    result_keys.add(other.id)
    assert other.get(timeout=10) == 42


def test_failure_propagates_with_type_and_traceback(
    pairing: tuple[str, str], worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    worker()
    tasks = tasks_dir.import_module()
    result = tasks.fail.delay()
    result_keys.add(result.id)
    with pytest.raises(ValueError) as raised:
        result.get(timeout=10)
    assert raised.value.args == ("boom", 42)
    exc = result.get(propagate=False)
    assert isinstance(exc, ValueError)
    assert result.failed()
    assert "ValueError" in (result.traceback or "")


def test_send_task_and_unknown_ids(
    pairing: tuple[str, str], worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    worker()
    tasks = tasks_dir.import_module()
    result = tasks.app.send_task("tasks.add", args=[2, 3])
    result_keys.add(result.id)
    assert result.get(timeout=10) == 5
    assert tasks.app.AsyncResult("no-such-task-id").state == "PENDING"


def test_countdown_tasks_do_not_starve_the_window(
    pairing: tuple[str, str], worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    # More held countdown messages than the prefetch window (1 process x 4): each one
    # widens the window, so a task sent after them still runs at once.
    worker()
    tasks = tasks_dir.import_module()
    for _ in range(6):
        held = tasks.add.apply_async((1, 1), countdown=60)
        result_keys.add(held.id)
    result = tasks.add.delay(2, 2)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 4
