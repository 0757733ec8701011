"""``async def`` tasks on a real worker: results, the concurrency bound, failures,
retries, time limits and ``acks_late`` on every pool, against the real Redis (and one
run on RabbitMQ).

Every wait is bounded; nothing asserts on speed (that is ``benches/``).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import app_module, queue_length, unacked_tags

if TYPE_CHECKING:
    from conftest import ResultKeys, RunCli, Scratch, StartWorker, TasksDir

pytestmark = pytest.mark.redis

ASYNC_BODY = """\
if os.environ.get("ASYNC_CONCURRENCY"):
    app.conf.worker_async_concurrency = int(os.environ["ASYNC_CONCURRENCY"])

# INCR a counter, and keep its highest value in a second key (atomically).
ENTER = (
    "local n = redis.call('INCR', KEYS[1]) "
    "if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end "
    "return n"
)


@app.task
def add(x, y):
    return x + y


@app.task
async def double(x):
    await asyncio.sleep(0.01)
    return x * 2


@app.task
async def nap(seconds=0.1):
    await asyncio.sleep(seconds)
    return True


@app.task
async def nap_together(key, parties, seconds=0.1, timeout=30.0):
    # [True, pid] when `parties` of these were asleep at once in this process
    # (a rendezvous: each waits for the others, bounded by `timeout`).
    r = client()
    r.incr(key)
    r.expire(key, 120)
    deadline = time.monotonic() + timeout
    while int(r.get(key) or 0) < parties and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    met = int(r.get(key) or 0) >= parties
    await asyncio.sleep(seconds)
    return [met, os.getpid()]


@app.task
async def counted(key, seconds):
    r = client()
    r.eval(ENTER, 2, key, key + "-max")
    try:
        await asyncio.sleep(seconds)
    finally:
        r.decr(key)
    return True


@app.task
async def boom():
    await asyncio.sleep(0)
    raise ValueError("boom", 42)


@app.task(bind=True, max_retries=3)
async def flaky(self, succeed_after):
    await asyncio.sleep(0)
    if self.request.retries < succeed_after:
        raise self.retry(countdown=0.1)
    return [self.request.id, self.request.retries]


@app.task(soft_time_limit=0.5)
async def soft_caught():
    try:
        await asyncio.sleep(30)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "not interrupted"


@app.task(soft_time_limit=0.3)
async def soft_uncaught():
    await asyncio.sleep(30)


@app.task(time_limit=0.5)
async def hard_limited():
    await asyncio.sleep(30)


@app.task
async def spawn():
    await asyncio.sleep(0)
    return add.delay(1, 2).id


@app.task(acks_late=True)
async def late(x):
    await asyncio.sleep(0.01)
    return x
"""

ASYNC_PY = app_module(
    "atasks",
    ASYNC_BODY,
    imports=(
        "import asyncio",
        "import time",
        "from celeriac.exceptions import SoftTimeLimitExceeded",
    ),
    redis_client=True,
)


@pytest.fixture
def atasks(tasks_dir: TasksDir) -> TasksDir:
    tasks_dir.write("atasks.py", ASYNC_PY)
    return tasks_dir


@pytest.fixture
def scratch(scratch: Scratch) -> Scratch:
    """``scratch("name")`` (conftest's), and its ``name-max`` twin removed too."""

    def key(name: str) -> str:
        scratch(f"{name}-max")
        return scratch(name)

    return key


def _results(result_keys: ResultKeys, results: list[Any]) -> list[Any]:
    for r in results:
        result_keys.add(r.id)
    return results


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_async_tasks_on_every_pool(
    worker: StartWorker, atasks: TasksDir, result_keys: ResultKeys, pool: str
) -> None:
    worker("-c", "2", pool=pool, app="atasks")
    tasks = atasks.import_module("atasks")
    values = _results(result_keys, [tasks.double.delay(i) for i in range(50)])
    syncs = _results(result_keys, [tasks.add.delay(i, i) for i in range(10)])
    assert [r.get(timeout=30) for r in values] == [i * 2 for i in range(50)]
    assert [r.get(timeout=30) for r in syncs] == [i + i for i in range(10)]
    assert {r.state for r in values} == {"SUCCESS"}

    failed = _results(result_keys, [tasks.boom.delay()])[0]
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=10)
    assert failed.state == "FAILURE"
    assert isinstance(failed.result, ValueError)
    assert failed.result.args == ("boom", 42)
    assert "ValueError" in (failed.traceback or "")

    retried = _results(result_keys, [tasks.flaky.delay(2)])[0]
    task_id, retries = retried.get(timeout=20)
    assert (task_id, retries) == (retried.id, 2)  # self.request is this execution's


def test_a_thousand_sleeps_share_one_process(
    worker: StartWorker,
    atasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Scratch,
) -> None:
    # One worker process (prefork with one child): the coroutines overlap, up to the
    # default worker_async_concurrency (100), and the widened prefetch window feeds
    # them. The first 100 only return once all 100 were asleep at the same time, so
    # sleeps that ran one after another would fail here, however fast.
    process = worker("-c", "1", pool="prefork", app="atasks")
    tasks = atasks.import_module("atasks")
    key = scratch("asleep")
    results = _results(result_keys, [tasks.nap_together.delay(key, 100) for _ in range(1000)])
    pids: set[int] = set()
    for r in results:
        met, pid = r.get(timeout=120)
        assert met, "the first 100 sleeps were not all asleep at once"
        pids.add(pid)
    assert len(pids) == 1 and process.proc.pid not in pids, pids
    assert queue_length(redis_client, atasks.queue) == 0
    assert "ForkPoolWorker-2" not in process.log  # the one child did all of them


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_concurrency_bound_is_respected(
    worker: StartWorker,
    atasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
    pool: str,
) -> None:
    atasks.env["ASYNC_CONCURRENCY"] = "5"
    worker("-c", "1", pool=pool, app="atasks")
    tasks = atasks.import_module("atasks")
    key = scratch("running")
    results = _results(result_keys, [tasks.counted.delay(key, 0.2) for _ in range(40)])
    assert all(r.get(timeout=60) is True for r in results)
    most = int(redis_client.get(f"{key}-max") or 0)
    assert 2 <= most <= 5, most  # they overlapped, and never more than the bound
    assert int(redis_client.get(key) or 0) == 0


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_time_limits_of_coroutines(
    worker: StartWorker, atasks: TasksDir, result_keys: ResultKeys, pool: str
) -> None:
    process = worker("-c", "1", pool=pool, app="atasks")
    tasks = atasks.import_module("atasks")
    caught, uncaught, hard = _results(
        result_keys,
        [tasks.soft_caught.delay(), tasks.soft_uncaught.delay(), tasks.hard_limited.delay()],
    )
    # SoftTimeLimitExceeded is raised inside the coroutine, which can catch it...
    assert caught.get(timeout=20) == "cleaned up"
    # ... or let it fail the task.
    with pytest.raises(Exception) as soft_error:
        uncaught.get(timeout=20)
    assert type(soft_error.value).__name__ == "SoftTimeLimitExceeded"
    assert uncaught.state == "FAILURE"
    with pytest.raises(Exception) as hard_error:
        hard.get(timeout=20)
    assert type(hard_error.value).__name__ == "TimeLimitExceeded"
    assert hard.state == "FAILURE"
    process.wait_for(r"Hard time limit \(0\.5s\) exceeded for atasks\.hard_limited")
    # The process is still there and serving.
    after = _results(result_keys, [tasks.double.delay(21)])[0]
    assert after.get(timeout=10) == 42


def test_acks_late_coroutines_leave_nothing_unacked(
    worker: StartWorker, atasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    worker(pool="solo", app="atasks")
    tasks = atasks.import_module("atasks")
    results = _results(result_keys, [tasks.late.delay(i) for i in range(30)])
    assert [r.get(timeout=30) for r in results] == list(range(30))
    assert queue_length(redis_client, atasks.queue) == 0

    # acks are sent by the worker's main thread right after each coroutine ends
    deadline = time.monotonic() + 10
    while unacked_tags(redis_client, atasks.queue) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not unacked_tags(redis_client, atasks.queue)


def test_tasks_sent_by_a_coroutine_have_it_as_parent(
    worker: StartWorker, atasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    worker(pool="solo", app="atasks")
    tasks = atasks.import_module("atasks")
    parent = _results(result_keys, [tasks.spawn.delay()])[0]
    child_id = parent.get(timeout=10)
    child = result_keys.add(child_id)
    assert tasks.add.AsyncResult(child).get(timeout=10) == 3
    meta = json.loads(redis_client.get(f"celery-task-meta-{child}") or b"{}")
    assert meta["parent_id"] == parent.id
    assert [c.id for c in parent.children or []] == [child]  # the parent's trail


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_warm_shutdown_lets_running_coroutines_finish(
    worker: StartWorker,
    atasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
    pool: str,
) -> None:
    process = worker("-c", "1", pool=pool, app="atasks", check_exit=False)
    tasks = atasks.import_module("atasks")
    key = scratch("running")
    results = _results(result_keys, [tasks.counted.delay(key, 1.5) for _ in range(10)])
    deadline = time.monotonic() + 15
    while int(redis_client.get(key) or 0) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int(redis_client.get(key) or 0) == 10  # all ten are inside their sleep
    assert process.stop() == 0  # SIGTERM now
    assert [r.get(timeout=10) for r in results] == [True] * 10
    assert "Restored" not in process.log  # nothing was left to put back


def test_async_tasks_on_rabbitmq(
    on_rabbitmq: str, worker: StartWorker, atasks: TasksDir, result_keys: ResultKeys
) -> None:
    atasks.env["ASYNC_CONCURRENCY"] = "20"
    worker(pool="solo", app="atasks")
    tasks = atasks.import_module("atasks")
    results = _results(result_keys, [tasks.nap.delay(0.05) for _ in range(200)])
    assert all(r.get(timeout=60) is True for r in results)
    retried = _results(result_keys, [tasks.flaky.delay(1)])[0]
    assert retried.get(timeout=20)[1] == 1
    failed = _results(result_keys, [tasks.boom.delay()])[0]
    with pytest.raises(ValueError):
        failed.get(timeout=10)


@pytest.mark.parametrize("value", ["0", "-3", "'many'", "2.5"], ids=["zero", "neg", "str", "float"])
def test_bad_worker_async_concurrency_stops_the_worker(
    atasks: TasksDir, run_cli: RunCli, value: str
) -> None:
    setting = f"app.conf.worker_async_concurrency = {value}"
    atasks.write("badasync.py", f"from atasks import app, double  # noqa: F401\n{setting}\n")
    result = run_cli("-A", "badasync", "worker", "-l", "info", timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "worker_async_concurrency" in output
    assert "int >= 1" in output
    assert "ready." not in output
