"""The worker's side of the canvas, against the real brokers: malformed canvas fields
in a message are logged and the task's own result kept; a long chain runs; a group is
saved and restored."""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from conftest import wait_until

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, tasks_dir: TasksDir) -> str:
    """Run the test on Redis, then on RabbitMQ (results in Redis both times)."""
    if request.param == "amqp":
        request.getfixturevalue("on_rabbitmq")
    return str(request.param)


def _step(task: str, *args: Any, **options: Any) -> dict[str, Any]:
    return {
        "task": task,
        "args": list(args),
        "kwargs": {},
        "options": options,
        "subtask_type": None,
        "immutable": False,
    }


#: embed fields the worker cannot use, and the reason it must log for each.
MALFORMED = [
    ({"chain": "not a list"}, "embed.chain is not a list"),
    ({"chain": [42]}, "embed.chain[0] is not a signature dict"),
    ({"chain": [{"args": [1]}]}, "a signature needs a task name"),
    ({"chain": [_step("tasks.add") | {"args": "12"}]}, "args must be a list or tuple"),
    (
        {"chain": [{"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": 7}}]},
        "needs a list in kwargs.tasks",
    ),
    ({"callbacks": {"task": "tasks.add"}}, "embed.callbacks is not a list"),
    ({"callbacks": ["tasks.add"]}, "embed.callbacks[0] is not a signature dict"),
]


def test_malformed_canvas_fields_are_logged_and_the_result_kept(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, broker: str
) -> None:
    process = worker()
    tasks = tasks_dir.import_module()
    producer = tasks.app.producer
    sent: list[tuple[str, int, str]] = []
    for index, (embed, reason) in enumerate(MALFORMED):
        task_id = result_keys.add(str(uuid.uuid4()))
        producer.send("tasks.add", task_id, [index, 100], {}, tasks_dir.queue, embed)
        sent.append((task_id, index + 100, reason))
    # errbacks that are not a list, on a failing task: its FAILURE is kept too
    failing = result_keys.add(str(uuid.uuid4()))
    producer.send("tasks.fail", failing, [], {}, tasks_dir.queue, {"errbacks": "oops"})
    for task_id, value, reason in sent:
        assert tasks.app.AsyncResult(task_id).get(timeout=15) == value
        process.wait_for(rf"\[{task_id}\] succeeded but .*{re.escape(reason)}", timeout=15)
    with pytest.raises(ValueError):
        tasks.app.AsyncResult(failing).get(timeout=15)
    process.wait_for(rf"\[{failing}\] failed and its errbacks could not be called", timeout=15)
    # and the worker goes on serving
    assert tasks.add.delay(20, 22).get(timeout=15) == 42


def test_an_unknown_task_in_a_chain(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, broker: str
) -> None:
    """Sent by name (this client does not know it either), as Celery does; the worker
    that receives it logs it as unregistered and goes on."""
    process = worker()
    tasks = tasks_dir.import_module()
    from celeriac import signature

    flow = tasks.add.s(1, 1) | signature("no.such.task", app=tasks.app)
    result = flow.delay()
    result_keys.add(result.id)
    result_keys.add(result.parent.id)
    assert result.parent.get(timeout=15) == 2
    process.wait_for(r"unregistered task of type 'no.such.task'", timeout=15)
    assert tasks.add.delay(2, 2).get(timeout=15) == 4


def test_a_chain_of_a_thousand_links(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, broker: str
) -> None:
    worker()
    tasks = tasks_dir.import_module()
    from celeriac import chain

    flow = chain(tasks.add.s(0, 1), *(tasks.add.s(1) for _ in range(999)))
    result = flow.apply_async()
    node = result
    while node is not None:
        result_keys.add(node.id)
        node = node.parent
    assert result.get(timeout=120) == 1000
    assert result.parent.get(timeout=5) == 999


def test_group_save_and_restore(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, redis_client: Any
) -> None:
    worker()
    tasks = tasks_dir.import_module()
    from celeriac import GroupResult, group

    result = group(tasks.add.s(i, 1) for i in range(3)).apply_async()
    for member in result.results:
        result_keys.add(member.id)
    result.save()
    try:
        key = f"celery-taskset-meta-{result.id}"
        assert redis_client.ttl(key) > 0
        restored = GroupResult.restore(result.id, app=tasks.app)
        assert restored is not None
        assert restored.id == result.id
        assert [r.id for r in restored.results] == [r.id for r in result.results]
        assert restored.get(timeout=15) == [1, 2, 3]
        # Celery reads what we saved
        import celery.result
        from celery import Celery

        peer = Celery(
            "peer",
            broker=tasks_dir.env["CELERIAC_TEST_BROKER"],
            backend=tasks_dir.env["CELERIAC_TEST_BACKEND"],
        )
        theirs = celery.result.GroupResult.restore(result.id, app=peer)
        assert [r.id for r in theirs.results] == [r.id for r in result.results]
        assert theirs.get(timeout=15) == [1, 2, 3]
        restored.delete()
        assert wait_until(lambda: not redis_client.exists(key), timeout=5)
        assert GroupResult.restore(result.id, app=tasks.app) is None
        # and we read what Celery saved
        saved_by_celery = celery.result.GroupResult(
            str(uuid.uuid4()), [peer.AsyncResult(r.id) for r in result.results]
        )
        saved_by_celery.save()
        ours = GroupResult.restore(saved_by_celery.id, app=tasks.app)
        assert ours is not None
        assert ours.get(timeout=15) == [1, 2, 3]
        saved_by_celery.delete()
    finally:
        redis_client.delete(f"celery-taskset-meta-{result.id}")


def test_group_revoke(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    """``GroupResult.revoke()`` reaches every member: held (countdown) ones are
    discarded and stored REVOKED."""
    worker()
    tasks = tasks_dir.import_module()
    from celeriac import group

    result = group(tasks.add.s(i, i).set(countdown=60) for i in range(3)).apply_async()
    for member in result.results:
        result_keys.add(member.id)
    assert not result.ready()
    result.revoke()
    assert wait_until(result.ready, timeout=15)
    assert [member.state for member in result.results] == ["REVOKED"] * 3
    assert result.completed_count() == 0
