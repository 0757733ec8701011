"""Revoke on a real worker (Redis broker and backend): ``app.control.revoke`` and
``AsyncResult.revoke``, before a task runs and, with ``terminate``, while it runs
(prefork: the child is stopped and replaced; ``async def``: the coroutine is
cancelled), and broken revoke requests.

Every wait is bounded; nothing asserts on speed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

pytestmark = pytest.mark.redis

RTASKS_PY = """\
import asyncio
import os
import time

import redis

from celeriac import Celery

app = Celery(
    "rtasks",
    broker=os.environ["CELERIAC_TEST_BROKER"],
    backend=os.environ["CELERIAC_TEST_BACKEND"],
)
app.conf.task_default_queue = os.environ["CELERIAC_TEST_QUEUE"]
if os.environ.get("RTASKS_ACKS_LATE"):
    app.conf.task_acks_late = True


def client():
    return redis.Redis(host="127.0.0.1", port=6379, db=0)


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


@pytest.fixture
def rtasks(tasks_dir: TasksDir) -> TasksDir:
    tasks_dir.write("rtasks.py", RTASKS_PY)
    return tasks_dir


@pytest.fixture
def scratch(redis_client: redis.Redis, tasks_dir: TasksDir) -> Iterator[Any]:
    made: list[str] = []

    def key(name: str) -> str:
        made.append(f"{tasks_dir.queue}-{name}")
        return made[-1]

    yield key
    if made:
        redis_client.delete(*made)


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


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


def stored(client: redis.Redis, task_id: str) -> dict[str, Any]:
    raw = client.get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else {}


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
    time.sleep(0.5)
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
    process = worker("-c", "1", pool=pool, app="rtasks")
    tasks = rtasks.import_module("rtasks")
    key = scratch("pid")
    result = tasks.long_coroutine.delay(key)
    result_keys.add(result.id)
    assert wait_until(lambda: redis_client.get(key) is not None)
    result.revoke(terminate=True)
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
