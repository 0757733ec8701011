"""``AsyncResult.collect()``/``iterdeps()`` over the graph a real worker records in the
stored ``children``: tasks sent from inside a task, a group sent from one, a chain's
steps and callbacks; on the Redis and the SQLite result backends."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

COLLECT_TASKS = """

from celeriac import group


@app.task
def fanout(n):
    for i in range(n):
        add.delay(i, i)
    return n


@app.task
def fanout_group(n):
    group(add.s(i, 10) for i in range(n)).delay()
    return "sent"


@app.task
def nested(n):
    fanout.delay(n)
    fanout_group.delay(n)
    return "nested"


@app.task
async def fanout_async(n):
    for i in range(n):
        add.delay(i, 1)
    return n


@app.task
def sends_slow(seconds):
    slow.delay(seconds)
    return "sent"
"""


@pytest.fixture(params=["redis", "sqlite"])
def collect_tasks(request: pytest.FixtureRequest, tasks_dir: TasksDir, tmp_path: Any) -> TasksDir:
    """The tasks above, results in Redis, then in SQLite (broker: Redis both times)."""
    from conftest import REDIS_URL, TASKS_PY, worker_env

    tasks_dir.write("tasks.py", TASKS_PY + COLLECT_TASKS)
    if request.param == "sqlite":
        tasks_dir.env = worker_env(tasks_dir.queue, REDIS_URL, f"sqlite://{tmp_path}/results.db")
    return tasks_dir


def test_collect_follows_tasks_and_groups_sent_inside_a_task(
    worker: StartWorker, collect_tasks: TasksDir
) -> None:
    """Celery's order: breadth first, each node's children in the order they were sent;
    a group sent from a task is one GroupResult node (its value the list), then its
    members."""
    worker()
    tasks = collect_tasks.import_module()
    from celeriac import GroupResult

    root = tasks.nested.delay(2)
    collected = list(root.collect(timeout=20))
    assert [value for _, value in collected] == ["nested", 2, "sent", 0, 2, [10, 11], 10, 11]
    nodes = [node for node, _ in collected]
    assert nodes[0] is root
    assert isinstance(nodes[5], GroupResult)
    assert nodes[5].results == nodes[6:]
    # Celery's recipe for the leaves' values: the nodes without children
    assert [value for node, value in collected if not node.children] == [0, 2, 10, 11]
    # iterdeps names each node's parent (the GroupResult for its members)
    parents = [parent for parent, _ in root.iterdeps()]
    assert parents == [None, root, root, nodes[1], nodes[1], nodes[2], nodes[5], nodes[5]]
    assert root.get_leaf() == 11


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_children_recorded_by_prefork_and_async_tasks(
    worker: StartWorker, collect_tasks: TasksDir, pool: str
) -> None:
    """A prefork child stores the children its task sent; so does an ``async def`` task."""
    worker("-c", "2", pool=pool)
    tasks = collect_tasks.import_module()

    assert [value for _, value in tasks.fanout.delay(3).collect(timeout=20)] == [3, 0, 2, 4]
    root = tasks.fanout_async.delay(2)
    assert [value for _, value in root.collect(timeout=20)] == [2, 1, 2]


def test_collect_follows_a_chain_and_its_callbacks(
    worker: StartWorker, collect_tasks: TasksDir
) -> None:
    """The worker sends a chain's next step and a task's callbacks before storing its
    result, so the stored children name them."""
    worker()
    tasks = collect_tasks.import_module()

    last = (tasks.add.s(1, 1) | tasks.add.s(2) | tasks.mul.s(10)).delay()
    first = last.parent.parent
    collected = list(first.collect(timeout=20))
    assert [value for _, value in collected] == [2, 4, 40]
    assert [node.id for node, _ in collected] == [first.id, last.parent.id, last.id]

    # one callback is a child; several are sent as one group (Celery's way): a
    # GroupResult child, then its members
    linked = tasks.add.apply_async((1, 1), link=tasks.mul.s(3))
    assert [value for _, value in linked.collect(timeout=20)] == [2, 6]
    linked = tasks.add.apply_async((1, 1), link=[tasks.mul.s(3), tasks.add.s(5)])
    assert [value for _, value in linked.collect(timeout=20)] == [2, [6, 7], 6, 7]


def test_a_result_not_ready_ends_the_walk_unless_intermediate(
    worker: StartWorker, collect_tasks: TasksDir
) -> None:
    """iterdeps stops with IncompleteStream at a child still running (intermediate=True
    hands it out and goes on); collect waits for it instead, as in Celery."""
    worker()
    tasks = collect_tasks.import_module()
    from celeriac.exceptions import IncompleteStream

    root = tasks.sends_slow.delay(4)
    assert root.get(timeout=20) == "sent"
    walk = root.iterdeps()
    assert next(walk) == (None, root)
    parent, child = next(walk)
    assert parent is root
    with pytest.raises(IncompleteStream, match=child.id):
        next(walk)
    assert list(root.iterdeps(intermediate=True)) == [(None, root), (root, child)]
    assert [value for _, value in root.collect(timeout=20)] == ["sent", 4]


@pytest.mark.parametrize(
    ("children", "reason"),
    [
        ("not-a-list", r"children must be a list of result tuples, got str"),
        ({"id": "x"}, r"children must be a list of result tuples, got dict"),
        ([42], r"children\[0\] is not a result tuple"),
        ([[["ok-id", None], None], "bare-id"], r"children\[1\] is not a result tuple"),
        ([[[7, None], None]], r"children\[0\] is not a result tuple .*task id"),
        ([[[], None]], r"children\[0\] is not a result tuple"),
        ([[["group-id", None], "members"]], r"children\[0\] .*a group's members must be a list"),
    ],
)
def test_malformed_stored_children_are_a_clear_error(
    collect_tasks: TasksDir, result_keys: ResultKeys, children: Any, reason: str
) -> None:
    tasks = collect_tasks.import_module()
    task_id = result_keys.add(str(uuid.uuid4()))
    meta = {"status": "SUCCESS", "result": 1, "traceback": None, "children": children}
    tasks.app.backend.store(task_id, meta)
    result = tasks.app.AsyncResult(task_id)
    with pytest.raises(ValueError, match=rf"result {task_id}: stored {reason}"):
        list(result.collect(timeout=5))
    with pytest.raises(ValueError, match=task_id):
        _ = result.children
