"""Sync and ``async def`` tasks in one worker, against the real Redis: a sync message
is acked only when a thread (or the prefork child) is free to start it, while the
event loop keeps running coroutines; ``--max-tasks-per-child`` counts coroutines.

Every wait is bounded; nothing asserts on speed.
"""

from __future__ import annotations

import collections
import json
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import app_module, queue_length, unacked_tags

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir, WorkerProcess

pytestmark = pytest.mark.redis

MIXED_PY = app_module(
    "mixed",
    """


@app.task
def hold(key, timeout=30.0):
    # Says it runs, then waits (bounded) until the test lets it go.
    r = client()
    r.set(key + "-started", os.getpid(), ex=120)
    deadline = time.monotonic() + timeout
    while not r.exists(key + "-go") and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()


@app.task
def pid():
    return os.getpid()


@app.task
def unacked_now(queue):
    # [pid, how many of the queue's messages are fetched and not acked as this runs]
    count = 0
    for _tag, record in client().hscan_iter("unacked"):
        try:
            count += json.loads(record)[2].startswith(queue)
        except (ValueError, TypeError, IndexError, AttributeError):
            pass
    return [os.getpid(), count]


@app.task
async def apid():
    await asyncio.sleep(0.05)
    return os.getpid()


@app.task
async def double(x):
    await asyncio.sleep(0.01)
    return x * 2
""",
    imports=("import asyncio", "import json", "import time"),
    redis_client=True,
)


@pytest.fixture
def mixed(tasks_dir: TasksDir) -> TasksDir:
    tasks_dir.write("mixed.py", MIXED_PY)
    return tasks_dir


@pytest.fixture
def hold_key(redis_client: redis.Redis, tasks_dir: TasksDir) -> Iterator[str]:
    """A key prefix for ``hold`` (``-started``, ``-go``); at the end a ``hold`` still
    running is let go (so the worker can stop) and the keys expire."""
    key = f"{tasks_dir.queue}-hold"
    yield key
    redis_client.set(f"{key}-go", 1, ex=30)
    redis_client.delete(f"{key}-started")


def unacked_ids(client: redis.Redis, queue: str) -> set[str]:
    """Task ids of ``queue``'s messages in kombu's ``unacked`` hash (fetched, not acked)."""
    tags = set(unacked_tags(client, queue))
    ids: set[str] = set()
    for tag, record in client.hscan_iter("unacked"):
        if (tag.decode() if isinstance(tag, bytes) else str(tag)) not in tags:
            continue
        envelope = json.loads(record)[0]
        ids.add(envelope["headers"]["id"])
    return ids


def _wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}", pytrace=False)
        time.sleep(0.02)


def _hold_one_start_more(
    worker: StartWorker,
    mixed: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    hold_key: str,
    pool: str,
    then: str = "pid",
) -> tuple[Any, Any, list[Any], WorkerProcess]:
    """One ``hold`` and two ``pid`` (or ``unacked_now``) messages, queued before a ``-c 1``
    worker starts (so its first fetch takes all three); returns once ``hold`` runs and
    the two others were received."""
    tasks = mixed.import_module("mixed")
    first = tasks.hold.delay(hold_key)
    args = (mixed.queue,) if then == "unacked_now" else ()
    waiting = [getattr(tasks, then).delay(*args) for _ in range(2)]
    for r in (first, *waiting):
        result_keys.add(r.id)
    process = worker("-c", "1", pool=pool, app="mixed", check_exit=False)
    _wait_until(lambda: redis_client.exists(f"{hold_key}-started"), 15, "hold started")
    for r in waiting:
        process.wait_for(rf"Task mixed\.{then}\[{r.id}\] received")
    return tasks, first, waiting, process


def test_threads_sync_message_stays_unacked_until_a_thread_is_free(
    worker: StartWorker,
    mixed: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    hold_key: str,
) -> None:
    tasks, first, waiting, process = _hold_one_start_more(
        worker, mixed, result_keys, redis_client, hold_key, "threads"
    )
    ids = {r.id for r in waiting}
    # The one thread is busy: the two sync messages were fetched and are not acked
    # (they wait in the worker's reserved list, not in the thread pool's queue).
    assert queue_length(redis_client, mixed.queue) == 0
    assert ids <= unacked_ids(redis_client, mixed.queue)

    # The event loop is not held up behind them.
    values = [tasks.double.delay(i) for i in range(5)]
    for r in values:
        result_keys.add(r.id)
    assert [r.get(timeout=15) for r in values] == [i * 2 for i in range(5)]
    assert not first.ready()
    assert not any(r.ready() for r in waiting)
    assert ids <= unacked_ids(redis_client, mixed.queue)

    # Warm shutdown while the first runs: it finishes; the two go back to the queue.
    process.signal(signal.SIGTERM)
    process.wait_for(r"Warm shutdown")
    redis_client.set(f"{hold_key}-go", 1, ex=60)
    assert process.wait(20) == 0, process.log
    assert isinstance(first.get(timeout=5), int)
    process.wait_for(r"Restored 2 unacknowledged message")
    assert not any(r.ready() for r in waiting)  # never ran
    assert queue_length(redis_client, mixed.queue) == 2
    assert not unacked_ids(redis_client, mixed.queue)

    # A new worker runs them.
    worker("-c", "1", pool="threads", app="mixed")
    assert all(isinstance(r.get(timeout=20), int) for r in waiting)


def test_prefork_child_acks_each_sync_message_just_before_it_runs(
    worker: StartWorker,
    mixed: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    hold_key: str,
) -> None:
    # A child runs sync tasks inline: the two fetched with ``hold`` are not acked
    # (as a batch) while it runs, nor after it: each one says, as it runs, how many
    # of them are still unacked (1, then 0; a batch ack would make it 0, 0).
    _tasks, first, waiting, _process = _hold_one_start_more(
        worker, mixed, result_keys, redis_client, hold_key, "prefork", then="unacked_now"
    )
    ids = {r.id for r in waiting}
    assert queue_length(redis_client, mixed.queue) == 0
    assert ids <= unacked_ids(redis_client, mixed.queue)
    assert not any(r.ready() for r in waiting)

    redis_client.set(f"{hold_key}-go", 1, ex=60)
    child = first.get(timeout=20)
    assert [r.get(timeout=20) for r in waiting] == [[child, 1], [child, 0]]
    _wait_until(lambda: not unacked_ids(redis_client, mixed.queue), 10, "all acked")


@pytest.mark.parametrize("kinds", ["async", "mixed"])
def test_max_tasks_per_child_counts_coroutines(
    worker: StartWorker,
    mixed: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    kinds: str,
) -> None:
    process = worker("-c", "1", "--max-tasks-per-child", "3", pool="prefork", app="mixed")
    tasks = mixed.import_module("mixed")
    if kinds == "async":
        results = [tasks.apid.delay() for _ in range(9)]
    else:
        results = [t.delay() for t in (tasks.apid, tasks.pid, tasks.apid) * 3]
    for r in results:
        result_keys.add(r.id)
    pids = [r.get(timeout=60) for r in results]  # nothing lost
    per_child = collections.Counter(pids)
    assert len(per_child) >= 3, per_child  # the child was replaced (twice at least)
    assert max(per_child.values()) <= 3, per_child
    assert queue_length(redis_client, mixed.queue) == 0
    _wait_until(lambda: not unacked_ids(redis_client, mixed.queue), 10, "all acked")
    process.wait_for(r"ForkPoolWorker-3")
    assert "exited with" not in process.log  # retired children exit cleanly


#: Coroutines that make a prefork child grow, report its memory, or hold it busy.
MEMORY_PY = app_module(
    "memory",
    """

#: What ``grow`` keeps: it stays in the process that ran it.
KEPT = []


def rss_kib():
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@app.task
async def rss():
    await asyncio.sleep(0)
    return rss_kib()


@app.task
async def grow(mib=60):
    await asyncio.sleep(0)
    KEPT.append(b"\\x01" * (mib << 20))  # written, so resident
    return os.getpid()


@app.task
async def ahold(key, timeout=30.0):
    r = client()
    r.set(key + "-started", os.getpid(), ex=120)
    deadline = time.monotonic() + timeout
    while not r.exists(key + "-go") and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return os.getpid()


@app.task
async def apid():
    await asyncio.sleep(0.01)
    return os.getpid()


@app.task
def pid():
    return os.getpid()
""",
    imports=("import asyncio", "import time"),
    redis_client=True,
)


def test_max_memory_per_child_is_checked_after_coroutines(
    worker: StartWorker,
    tasks_dir: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    hold_key: str,
) -> None:
    """A child that grows by running only ``async def`` tasks is replaced: over
    ``--max-memory-per-child`` after a coroutine, it takes nothing more, the coroutine
    still running there finishes, and a new child runs the rest. Nothing is lost."""
    tasks_dir.write("memory.py", MEMORY_PY)
    tasks = tasks_dir.import_module("memory")

    # A child's resident memory once it has run a coroutine (its event loop started).
    probe = worker("-c", "1", pool="prefork", app="memory")
    first = tasks.rss.delay()
    result_keys.add(first.id)
    idle = first.get(timeout=20)
    assert probe.stop() == 0, probe.log
    limit = idle + 20_000  # KiB: grow's 60 MiB passes it, a few tasks more do not

    process = worker("-c", "1", "--max-memory-per-child", str(limit), pool="prefork", app="memory")
    held = tasks.ahold.delay(hold_key)
    result_keys.add(held.id)
    _wait_until(lambda: redis_client.exists(f"{hold_key}-started"), 15, "ahold started")
    child = int(redis_client.get(f"{hold_key}-started") or 0)
    grown = tasks.grow.delay()
    result_keys.add(grown.id)
    assert grown.get(timeout=20) == child
    process.wait_for(
        rf"Memory usage \d+ KiB is over --max-memory-per-child \({limit} KiB\): "
        "replacing this process",
        timeout=15,
    )
    later = [t.delay() for t in (tasks.apid, tasks.pid, tasks.apid) * 2]
    for r in later:
        result_keys.add(r.id)
    assert not held.ready()  # the retiring child still runs it
    redis_client.set(f"{hold_key}-go", 1, ex=60)
    assert held.get(timeout=20) == child  # finished where it ran
    pids = [r.get(timeout=30) for r in later]  # nothing lost
    assert child not in pids, pids  # the retired child took nothing more
    assert len(set(pids)) == 1, pids  # its replacement ran them all (no 60 MiB yet)
    assert queue_length(redis_client, tasks_dir.queue) == 0
    _wait_until(lambda: not unacked_ids(redis_client, tasks_dir.queue), 10, "all acked")
    process.wait_for(r"ForkPoolWorker-2")
    assert "exited with" not in process.log  # the retired child exited cleanly
