"""Revoke on a real worker (Redis broker and backend): ``app.control.revoke`` and
``AsyncResult.revoke``, before a task runs and, with ``terminate``, while it runs
(prefork: the child is stopped and replaced; ``async def``: the coroutine is
cancelled), and broken revoke requests.

Every wait is bounded; nothing asserts on speed.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import app_module, queue_length, wait_until
from conftest import task_meta as stored

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

pytestmark = pytest.mark.redis

RTASKS_BODY = """\
if os.environ.get("RTASKS_ACKS_LATE"):
    app.conf.task_acks_late = True


@app.task
def add(x, y):
    return x + y


@app.task
def mark(key):
    client().set(key, "ran", ex=60)
    return True


@app.task
def long_running(key, seconds=60):
    client().set(key, os.getpid(), ex=60)
    time.sleep(seconds)
    return "finished"


@app.task
async def long_coroutine(key, seconds=60):
    client().set(key, os.getpid(), ex=60)
    await asyncio.sleep(seconds)
    return "finished"
"""

RTASKS_PY = app_module(
    "rtasks", RTASKS_BODY, imports=("import asyncio", "import time"), redis_client=True
)


@pytest.fixture
def rtasks(tasks_dir: TasksDir) -> TasksDir:
    tasks_dir.write("rtasks.py", RTASKS_PY)
    return tasks_dir


def _children(parent: int) -> list[int]:
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _node() -> str:
    """A node name of its own: other workers on this Redis must not answer our tests."""
    return f"revoke-{uuid.uuid4().hex[:8]}@test"


def answers(replies: list[dict[str, Any]] | None) -> list[Any]:
    """The nodes' answers in ``[{nodename: answer}, ...]``."""
    return [answer for reply in replies or [] for answer in reply.values()]


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_revoked_before_its_eta_never_runs(
    worker: StartWorker,
    rtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
    pool: str,
) -> None:
    node = _node()
    process = worker("-c", "2", "-n", node, pool=pool, app="rtasks")
    tasks = rtasks.import_module("rtasks")
    key = scratch("ran")
    result = tasks.mark.apply_async((key,), countdown=3)
    result_keys.add(result.id)
    process.wait_for(rf"Task rtasks\.mark\[{result.id}\] received")
    replies = tasks.app.control.revoke(result.id, [node], reply=True, timeout=2)
    expected = {"ok": f"tasks {{'{result.id}'}} flagged as revoked"}  # Celery's words
    assert answers(replies) == [expected], replies
    # Celery 5.7 stores REVOKED as the command arrives; the message is discarded when
    # its ETA comes, without running.
    with pytest.raises(Exception) as revoked:
        result.get(timeout=10)
    assert type(revoked.value).__name__ == "TaskRevokedError"
    assert result.state == "REVOKED"
    process.wait_for(rf"Discarding revoked task: rtasks\.mark\[{result.id}\]", timeout=10)
    assert redis_client.get(key) is None
    assert stored(redis_client, result.id)["result"]["exc_type"] == "TaskRevokedError"
    # The worker keeps serving, and the revoked id is listed by inspect revoked.
    after = tasks.add.delay(2, 3)
    result_keys.add(after.id)
    assert after.get(timeout=10) == 5
    listed = tasks.app.control.broadcast("revoked", destination=[node], reply=True, timeout=2)
    assert any(result.id in ids for reply in listed for ids in reply.values()), listed


def test_async_result_revoke_discards_a_waiting_message(
    worker: StartWorker,
    rtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
) -> None:
    process = worker(pool="solo", app="rtasks")
    tasks = rtasks.import_module("rtasks")
    key = scratch("ran")
    result = tasks.mark.apply_async((key,), countdown=3)
    result_keys.add(result.id)
    process.wait_for(rf"Task rtasks\.mark\[{result.id}\] received")
    result.revoke()
    process.wait_for(rf"Discarding revoked task: rtasks\.mark\[{result.id}\]", timeout=10)
    assert result.state == "REVOKED"
    assert redis_client.get(key) is None


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
def test_terminate_a_running_task_in_prefork(
    worker: StartWorker,
    rtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
    acks_late: bool,
) -> None:
    if acks_late:
        rtasks.env["RTASKS_ACKS_LATE"] = "1"
    node = _node()
    process = worker("-c", "2", "-n", node, pool="prefork", app="rtasks")
    tasks = rtasks.import_module("rtasks")
    key = scratch("pid")
    result = tasks.long_running.delay(key)
    result_keys.add(result.id)
    assert wait_until(lambda: redis_client.get(key) is not None)
    pid = int(redis_client.get(key) or 0)
    replies = tasks.app.control.revoke(result.id, [node], terminate=True, reply=True, timeout=3)
    assert answers(replies) == [{"ok": f"terminate: {result.id}"}]
    with pytest.raises(Exception) as revoked:
        result.get(timeout=15)
    assert type(revoked.value).__name__ == "TaskRevokedError"
    assert revoked.value.args == ("terminated",)
    assert result.state == "REVOKED"  # not WorkerLostError
    process.wait_for(rf"pid:{pid} exited with 'signal 15 \(SIGTERM\)'")
    assert "WorkerLostError" not in process.log
    # A replacement child serves the next tasks; nothing comes back from the queue.
    results = [tasks.add.delay(i, 1) for i in range(6)]
    for r in results:
        result_keys.add(r.id)
    assert [r.get(timeout=15) for r in results] == [i + 1 for i in range(6)]
    # The killed child was replaced: two children again, without it.
    assert wait_until(lambda: len(_children(process.proc.pid)) == 2)
    assert pid not in _children(process.proc.pid)
    # Not redelivered: its message was settled (no unacked record), none is queued.
    assert wait_until(lambda: not _unacked(redis_client, rtasks.queue), 10)
    assert queue_length(redis_client, rtasks.queue) == 0
    assert process.log.count(f"Task rtasks.long_running[{result.id}] received") == 1


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_terminate_a_running_coroutine(
    worker: StartWorker,
    rtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
    pool: str,
) -> None:
    node = _node()
    process = worker("-n", node, "-c", "1", pool=pool, app="rtasks")
    tasks = rtasks.import_module("rtasks")
    key = scratch("pid")
    result = tasks.long_coroutine.delay(key)
    result_keys.add(result.id)
    assert wait_until(lambda: redis_client.get(key) is not None)
    # To this node only: any other worker on the shared Redis would store REVOKED
    # ('revoked') for a task it does not run, as Celery 5.7 does, and win the race.
    tasks.app.control.revoke(result.id, terminate=True, destination=[node])
    with pytest.raises(Exception) as revoked:
        result.get(timeout=10)
    assert revoked.value.args == ("terminated",)
    assert result.state == "REVOKED"
    process.wait_for(rf"Task rtasks\.long_coroutine\[{result.id}\] terminated on request")
    # Only the coroutine was stopped: the same process goes on serving.
    after = tasks.add.delay(1, 1)
    result_keys.add(after.id)
    assert after.get(timeout=10) == 2
    assert "exited with" not in process.log


def test_broken_and_unknown_revokes_do_not_hurt_the_worker(
    worker: StartWorker, rtasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    node = _node()
    worker("-c", "1", "-n", node, pool="prefork", app="rtasks")
    tasks = rtasks.import_module("rtasks")
    control = tasks.app.control
    unknown = "no-such-task-" + rtasks.queue
    result_keys.add(unknown)
    replies = control.revoke(unknown, [node], terminate=True, reply=True, timeout=2)
    assert answers(replies) == [{"ok": "terminate: tasks unknown"}]
    garbage: list[Any] = [123, None, {"a": 1}, ["ok", 5]]
    for value in garbage:
        replies = control.broadcast("revoke", {"task_id": value}, [node], reply=True, timeout=2)
        got = answers(replies)
        assert got and all("error" in a for a in got), (value, replies)
    replies = control.revoke("x" * 5000, [node], reply=True, timeout=2)  # a huge id
    assert replies and all("ok" in a for a in answers(replies))
    replies = control.revoke(
        unknown, [node], terminate=True, signal="SIGNOPE", reply=True, timeout=2
    )
    assert answers(replies) == [{"error": "unknown signal 'SIGNOPE'"}]
    after = tasks.add.delay(4, 4)
    result_keys.add(after.id)
    assert after.get(timeout=10) == 8
    redis_client.delete("celery-task-meta-" + "x" * 5000)


# -- a revoked message the worker holds is taken out at once ------------------------------


def _listed(control: Any, node: str, method: str) -> list[str]:
    """The task ids ``inspect <method>`` (``scheduled``/``reserved``) lists on ``node``."""
    replies = control.broadcast(method, destination=[node], reply=True, timeout=2)
    assert replies, f"no reply to inspect {method}"
    ids: list[str] = []
    for answer in answers(replies):
        for entry in answer:
            ids.append(entry["request"]["id"] if method == "scheduled" else entry["id"])
    return ids


def _unacked(client: redis.Redis, queue: str) -> list[str]:
    from conftest import unacked_tags

    tags: list[str] = unacked_tags(client, queue)
    return tags


def _revoked_reason(result: Any) -> tuple[str, tuple[Any, ...]]:
    with pytest.raises(Exception) as revoked:
        result.get(timeout=10)
    return type(revoked.value).__name__, revoked.value.args


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_revoked_eta_message_is_taken_out_at_once(
    worker: StartWorker,
    rtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
    start_cli: Any,
    pool: str,
) -> None:
    """Held for a countdown of 30 s, a revoked message is discarded within seconds:
    REVOKED stored, ``task-revoked`` sent, acked, no longer scheduled."""
    node = _node()
    dump = start_cli("-A", "rtasks", "events", "--dump")
    dump.wait_for("-> evdump: starting capture...", timeout=20)
    process = worker("-c", "1", "-n", node, "-E", pool=pool, app="rtasks")
    tasks = rtasks.import_module("rtasks")
    control = tasks.app.control
    key = scratch("ran")
    result = tasks.mark.apply_async((key,), countdown=30)
    result_keys.add(result.id)
    process.wait_for(rf"Task rtasks\.mark\[{result.id}\] received")
    # Logged before it is held (as Celery does); a prefork child then tells the supervisor,
    # which answers inspect: listed a moment later.
    assert wait_until(lambda: _listed(control, node, "scheduled") == [result.id])
    assert len(_unacked(redis_client, rtasks.queue)) == 1  # held, unacked
    replies = control.revoke(result.id, [node], reply=True, timeout=2)
    assert answers(replies) == [{"ok": f"tasks {{'{result.id}'}} flagged as revoked"}]
    process.wait_for(rf"Discarding revoked task: rtasks\.mark\[{result.id}\]", timeout=10)
    assert wait_until(lambda: not _unacked(redis_client, rtasks.queue)), _unacked(
        redis_client, rtasks.queue
    )
    assert _listed(control, node, "scheduled") == []
    assert _revoked_reason(result) == ("TaskRevokedError", ("revoked",))
    assert stored(redis_client, result.id)["status"] == "REVOKED"
    dump.wait_for(
        rf"^{node} \[.*\] task revoked: .*{result.id}.* expired=False, .*terminated=False",
        timeout=10,
    )
    listed = control.broadcast("revoked", destination=[node], reply=True, timeout=2)
    assert [result.id in ids for ids in answers(listed)] == [True], listed
    # The window slot it held is back: the worker goes on serving.
    after = tasks.add.delay(2, 3)
    result_keys.add(after.id)
    assert after.get(timeout=10) == 5
    assert redis_client.get(key) is None
    assert process.log.count("Discarding revoked task") == 1


def test_a_revoked_rate_limited_message_is_taken_out_at_once(
    worker: StartWorker,
    rtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
) -> None:
    node = _node()
    process = worker("-n", node, pool="solo", app="rtasks")
    tasks = rtasks.import_module("rtasks")
    control = tasks.app.control
    limit = {"task_name": "rtasks.mark", "rate_limit": "1/m"}
    replies = control.broadcast("rate_limit", limit, [node], reply=True, timeout=2)
    assert all("ok" in answer for answer in answers(replies)), replies
    first, second = scratch("first"), scratch("second")
    ran = tasks.mark.delay(first)
    held = tasks.mark.delay(second)
    result_keys.add(ran.id)
    result_keys.add(held.id)
    assert ran.get(timeout=10) is True
    process.wait_for(rf"Task rtasks\.mark\[{held.id}\] received")
    # Held for the rate limit (a minute): inspect reserved lists it, unacked.
    assert wait_until(lambda: _listed(control, node, "reserved") == [held.id])
    assert len(_unacked(redis_client, rtasks.queue)) == 1
    control.revoke(held.id, [node], reply=True, timeout=2)
    process.wait_for(rf"Discarding revoked task: rtasks\.mark\[{held.id}\]", timeout=10)
    assert wait_until(lambda: not _unacked(redis_client, rtasks.queue))
    assert _listed(control, node, "reserved") == []
    assert _revoked_reason(held) == ("TaskRevokedError", ("revoked",))
    after = tasks.add.delay(1, 2)
    result_keys.add(after.id)
    assert after.get(timeout=10) == 3
    assert redis_client.get(second) is None


def test_a_revoked_reserved_message_is_dropped_while_another_runs(
    worker: StartWorker,
    rtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
) -> None:
    """``-P threads -c 1``: a message waiting for the busy slot (``reserved``) is
    discarded when revoked, not when the slot frees."""
    node = _node()
    process = worker("-c", "1", "-n", node, pool="threads", app="rtasks")
    tasks = rtasks.import_module("rtasks")
    control = tasks.app.control
    busy, key = scratch("busy"), scratch("ran")
    running = tasks.long_running.delay(busy, 6)
    result_keys.add(running.id)
    assert wait_until(lambda: redis_client.get(busy) is not None)
    waiting = tasks.mark.delay(key)
    result_keys.add(waiting.id)
    assert wait_until(lambda: _listed(control, node, "reserved") == [waiting.id])
    control.revoke(waiting.id, [node], reply=True, timeout=2)
    process.wait_for(rf"Discarding revoked task: rtasks\.mark\[{waiting.id}\]", timeout=10)
    assert _listed(control, node, "reserved") == []
    assert wait_until(lambda: not _unacked(redis_client, rtasks.queue))
    assert _revoked_reason(waiting) == ("TaskRevokedError", ("revoked",))
    assert running.get(timeout=15) == "finished"
    done = process.wait_for(rf"Task rtasks\.long_running\[{running.id}\] succeeded")[0]
    log = process.log
    assert log.index(f"Discarding revoked task: rtasks.mark[{waiting.id}]") < log.index(done)
    assert redis_client.get(key) is None


def test_broken_revokes_leave_held_messages_alone(
    worker: StartWorker,
    rtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
) -> None:
    node = _node()
    process = worker("-n", node, pool="solo", app="rtasks")
    tasks = rtasks.import_module("rtasks")
    control = tasks.app.control
    result = tasks.mark.apply_async((scratch("ran"),), countdown=30)
    witness = tasks.mark.apply_async((scratch("witness"),), countdown=30)
    for held in (result, witness):
        result_keys.add(held.id)
        process.wait_for(rf"Task rtasks\.mark\[{held.id}\] received")
    replies = control.revoke([], [node], reply=True, timeout=2)
    assert answers(replies) == [{"ok": "tasks set() flagged as revoked"}]  # Celery's words
    for value in (5, [5], [result.id, 5], {"id": result.id}):
        replies = control.broadcast("revoke", {"task_id": value}, [node], reply=True, timeout=2)
        got = answers(replies)
        assert got and all("error" in answer for answer in got), (value, replies)
    other = "not-held-" + rtasks.queue
    result_keys.add(other)
    control.revoke(other, [node], reply=True, timeout=2)
    # The witness, revoked last, is taken out: by then the revokes before it were
    # applied to the held messages too. The other one is still held and unacked.
    control.revoke(witness.id, [node], reply=True, timeout=2)
    process.wait_for(rf"Discarding revoked task: rtasks\.mark\[{witness.id}\]", timeout=10)
    assert _listed(control, node, "scheduled") == [result.id]
    assert wait_until(lambda: len(_unacked(redis_client, rtasks.queue)) == 1, 10)
    assert process.log.count("Discarding revoked task") == 1
    assert stored(redis_client, result.id) == {}
    after = tasks.add.delay(3, 3)
    result_keys.add(after.id)
    assert after.get(timeout=10) == 6
