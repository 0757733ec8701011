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


# -- map, starmap, chunks, replace, nested chords, lost children ----------------------

CANVAS_TASKS = """

from celeriac import group


@app.task
def tsum(numbers):
    return sum(numbers)


@app.task
def double(x):
    return 2 * x


@app.task(bind=True)
def replaced(self, x):
    return self.replace(add.s(x, 100))


@app.task(bind=True)
def replaced_by_group(self, n):
    return self.replace(group(add.s(i, i) for i in range(n)))


@app.task(acks_late=True)
def late_add(x, y):
    return x + y


@app.task
def record_failure(task_id, key):
    redis.Redis(host="127.0.0.1", port=6379).rpush(key, task_id)
"""


@pytest.fixture
def canvas_tasks(tasks_dir: TasksDir) -> TasksDir:
    from conftest import TASKS_PY

    tasks_dir.write("tasks.py", TASKS_PY + CANVAS_TASKS)
    return tasks_dir


def _members(result: Any, result_keys: ResultKeys) -> None:
    """Forget a result, its parents and the members of parent groups afterwards."""
    pending = [result]
    while pending:
        node = pending.pop()
        if node is None:
            continue
        result_keys.add(node.id)
        pending.extend(getattr(node, "results", None) or [])
        pending.append(node.parent)


def test_map_starmap_and_chunks(
    worker: StartWorker, canvas_tasks: TasksDir, result_keys: ResultKeys, broker: str
) -> None:
    """One ``celery.map``/``celery.starmap`` message applies the task to every item in
    the worker; chunks is a group of starmap messages."""
    worker()
    tasks = canvas_tasks.import_module()
    mapped = tasks.double.map([1, 2, 3]).delay()
    result_keys.add(mapped.id)
    assert mapped.get(timeout=15) == [2, 4, 6]
    starred = tasks.add.starmap([(1, 2), (3, 4)]).apply_async()
    result_keys.add(starred.id)
    assert starred.get(timeout=15) == [3, 7]
    chunked = tasks.add.chunks(zip(range(5), range(5), strict=True), 2)()
    _members(chunked, result_keys)
    assert chunked.get(timeout=15) == [[0, 2], [4, 6], [8]]
    assert len(chunked.results) == 3
    # the signatures have Celery's wire form
    sig = tasks.add.chunks([(1, 1)], 1)
    assert (sig["task"], sig["subtask_type"], sig["immutable"]) == ("celery.chunks", "chunks", True)
    assert sorted(sig["kwargs"]) == ["it", "n", "task"]


#: (task, kwargs, the reason the worker must store) of malformed map/chunks messages.
MALFORMED_MAP = [
    ("celery.map", {"task": "tasks.double", "it": [1]}, "'task' must be a signature"),
    ("celery.map", {"task": _step("tasks.double"), "it": 5}, "'it' must be a list"),
    ("celery.starmap", {"task": _step("tasks.add"), "it": [3]}, "each item must be a list"),
    ("celery.map", {"task": _step("no.such.task"), "it": [1]}, "no.such.task"),
    ("celery.chunks", {"task": _step("tasks.add"), "it": [[1, 1]], "n": "x"}, "positive int"),
]


def test_malformed_map_fields_fail_clearly(
    worker: StartWorker, canvas_tasks: TasksDir, result_keys: ResultKeys, broker: str
) -> None:
    worker()
    tasks = canvas_tasks.import_module()
    producer = tasks.app.producer
    for name, kwargs, reason in MALFORMED_MAP:
        task_id = result_keys.add(str(uuid.uuid4()))
        producer.send(name, task_id, [], kwargs, canvas_tasks.queue, {})
        with pytest.raises(Exception) as raised:
            tasks.app.AsyncResult(task_id).get(timeout=15)
        assert reason in str(raised.value), (name, kwargs)
    assert tasks.add.delay(20, 22).get(timeout=15) == 42


def test_replace_inside_a_task(
    worker: StartWorker, canvas_tasks: TasksDir, result_keys: ResultKeys, broker: str
) -> None:
    """The replacement takes the task's id, its chain tail, its callbacks and its chord
    part; a group replacement gives the group's list."""
    worker()
    tasks = canvas_tasks.import_module()
    from celeriac import chord

    alone = tasks.replaced.delay(1)
    result_keys.add(alone.id)
    assert alone.get(timeout=15) == 101
    chained = (tasks.replaced.s(1) | tasks.add.s(1)).delay()
    _members(chained, result_keys)
    assert chained.get(timeout=15) == 102
    joined = chord([tasks.replaced.s(1), tasks.add.s(1, 1)], tasks.tsum.s())()
    _members(joined, result_keys)
    assert joined.get(timeout=15) == 103
    grouped = tasks.replaced_by_group.delay(3)
    result_keys.add(grouped.id)
    assert grouped.get(timeout=15) == [0, 2, 4]
    # eager: the replacement runs here and its value is the task's
    tasks.app.conf.task_always_eager = True
    try:
        assert tasks.replaced.delay(2).get() == 102
    finally:
        tasks.app.conf.task_always_eager = False


def test_nested_chords(
    worker: StartWorker, canvas_tasks: TasksDir, result_keys: ResultKeys, broker: str
) -> None:
    worker()
    tasks = canvas_tasks.import_module()
    from celeriac import chain, chord

    add, tsum = tasks.add, tasks.tsum
    in_header = chord([chord([add.s(1, 1), add.s(2, 2)], tsum.s()), add.s(10, 10)], tsum.s())()
    _members(in_header, result_keys)
    assert in_header.get(timeout=20) == 26
    in_body = chord([add.s(1, 1), add.s(2, 2)], chord([tsum.s(), tsum.s()], tsum.s()))()
    _members(in_body, result_keys)
    assert in_body.get(timeout=20) == 12
    followed = chain(add.s(1, 1), chord([add.s(1), add.s(2)], tsum.s()), add.s(100), add.s(1))
    result = followed.apply_async()
    _members(result, result_keys)
    assert result.get(timeout=20) == 108
    chain_body = chord([add.s(1, 1), add.s(2, 2)], tsum.s() | add.s(10))()
    _members(chain_body, result_keys)
    assert chain_body.get(timeout=20) == 16


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_chord_parts_of_early_and_late_acked_header_tasks_join_on_every_pool(
    worker: StartWorker, canvas_tasks: TasksDir, result_keys: ResultKeys, pool: str
) -> None:
    """A header task's join reply is read after the task (before an acks_late ack, as it
    comes in for an early ack): on each pool, with both kinds in one header, every part
    is recorded and the body sent once the last one is in."""
    worker("-c", "2", pool=pool)
    tasks = canvas_tasks.import_module()
    from celeriac import chord

    header = [tasks.add.s(i, i) if i % 2 else tasks.late_add.s(i, i) for i in range(40)]
    joined = chord(header, tasks.tsum.s())()
    _members(joined, result_keys)
    assert joined.get(timeout=30) == 2 * sum(range(40))


def test_get_raises_a_failed_parents_error_first(
    worker: StartWorker, canvas_tasks: TasksDir, result_keys: ResultKeys
) -> None:
    """As Celery's get(): a chord whose header task failed raises that task's own error
    (not the body's ChordError), and a result whose parent failed does not wait."""
    worker()
    tasks = canvas_tasks.import_module()
    from celeriac import chord

    failed = chord([tasks.fail.si(), tasks.add.s(1, 1)], tasks.tsum.s())()
    _members(failed, result_keys)
    with pytest.raises(ValueError):
        failed.get(timeout=15)
    parent = tasks.fail.delay()
    result_keys.add(parent.id)
    orphan = tasks.app.AsyncResult(str(uuid.uuid4()))
    orphan.parent = parent
    with pytest.raises(ValueError):
        orphan.get(timeout=10)
    with pytest.raises(Exception) as raised:
        orphan.get(timeout=0.5, follow_parents=False)
    assert "Timeout" in type(raised.value).__name__


def test_a_lost_child_runs_errbacks_and_fails_its_chord_part(
    worker: StartWorker, canvas_tasks: TasksDir, result_keys: ResultKeys, redis_client: Any
) -> None:
    """A prefork child killed at the hard time limit: its errbacks run and its chord
    fails (the body gets ChordError) instead of waiting forever."""
    worker("-c", "2", pool="prefork")
    tasks = canvas_tasks.import_module()
    from celeriac import chord

    key = f"celeriac-test-lost-{uuid.uuid4().hex}"
    try:
        killed = tasks.slow.apply_async((30,), time_limit=1, link_error=tasks.record_failure.s(key))
        result_keys.add(killed.id)
        with pytest.raises(Exception) as raised:
            killed.get(timeout=20)
        assert type(raised.value).__name__ == "TimeLimitExceeded"
        assert wait_until(lambda: redis_client.lrange(key, 0, -1) == [killed.id.encode()], 15)
        joined = chord([tasks.slow.s(30).set(time_limit=1), tasks.add.s(1, 1)], tasks.tsum.s())()
        _members(joined, result_keys)
        body = tasks.app.AsyncResult(joined.id)
        with pytest.raises(Exception) as raised:
            body.get(timeout=20)
        assert type(raised.value).__name__ == "ChordError"
        assert joined.parent.results[0].id in str(raised.value)
    finally:
        redis_client.delete(key)


def test_chords_on_sqlite_and_refused_on_rpc(
    worker: StartWorker, canvas_tasks: TasksDir, result_keys: ResultKeys, tmp_path: Any
) -> None:
    """SQLite joins chords (one transaction per part); rpc:// refuses them with Celery's
    error before anything is sent."""
    from conftest import worker_env

    canvas_tasks.env = worker_env(canvas_tasks.queue, backend=f"sqlite://{tmp_path}/results.db")
    worker("-c", "2", pool="prefork")
    tasks = canvas_tasks.import_module()
    from celeriac import chord, group

    joined = chord([tasks.add.s(i, i) for i in range(10)], tasks.tsum.s())()
    assert joined.get(timeout=20) == 90
    piped = (group(tasks.add.s(1, 1), tasks.add.s(2, 2)) | tasks.tsum.s())()
    assert piped.get(timeout=20) == 6
    failing = chord([tasks.fail.si(), tasks.add.s(1, 1)], tasks.tsum.s())()
    with pytest.raises(Exception) as raised:
        tasks.app.AsyncResult(failing.id).get(timeout=20)
    assert type(raised.value).__name__ == "ChordError"
    canvas_tasks.env = worker_env(canvas_tasks.queue, backend="rpc://")
    rpc_tasks = canvas_tasks.import_module()
    with pytest.raises(
        NotImplementedError, match='The "rpc" result backend does not support chords!'
    ):
        chord([rpc_tasks.add.s(1, 1)], rpc_tasks.tsum.s())()
