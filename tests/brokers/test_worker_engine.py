"""The worker engine against the real Redis: the prefork pool (children replaced when
they die or retire), ETA and rate limits that do not starve other tasks, soft and hard
time limits, retries, STARTED, shutdown, and crash safety with worker heartbeats.

Every wait is bounded; nothing asserts on speed (that is ``benches/``).
"""

from __future__ import annotations

import json
import re
import signal
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import (
    REDIS_URL,
    app_module,
    queue_length,
    task_meta,
    unacked_tags,
    wait_until,
    worker_env,
)

if TYPE_CHECKING:
    from conftest import ResultKeys, RunCli, StartWorker, TasksDir

pytestmark = pytest.mark.redis

ENGINE_BODY = """\
app.conf.broker_transport_options = {
    "celeriac_heartbeat_interval": 0.5,
    "celeriac_heartbeat_ttl": 2.0,
}
if os.environ.get("ENGINE_DISABLE_RATE_LIMITS"):
    app.conf.worker_disable_rate_limits = True
if os.environ.get("ENGINE_TRACK_STARTED"):
    app.conf.task_track_started = True
KEEP = []


@app.task
def add(x, y):
    return x + y


@app.task
def pid():
    return os.getpid()


@app.task
def pid_and_parent():
    return [os.getpid(), os.getppid()]


@app.task
def rendezvous(key, parties, timeout=10.0):
    r = client()
    r.incr(key)
    r.expire(key, 60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(r.get(key) or 0) >= parties:
            return True
        time.sleep(0.01)
    return False


@app.task
def abort():
    os.abort()


@app.task(acks_late=True, reject_on_worker_lost=True)
def abort_once(key):
    if client().incr(key) == 1:
        os.abort()
    return "second time lucky"


@app.task(acks_late=True)
def abort_late(key):
    client().incr(key)
    os.abort()


@app.task
def hog(megabytes):
    KEEP.append(bytearray(megabytes * 1024 * 1024))
    return os.getpid()


@app.task(soft_time_limit=0.5)
def soft_caught():
    try:
        time.sleep(20)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "not interrupted"


@app.task(soft_time_limit=0.5)
def soft_uncaught():
    time.sleep(20)


@app.task(time_limit=1)
def hard_limited():
    time.sleep(30)


@app.task
def sleeper(seconds):
    time.sleep(seconds)
    return seconds


@app.task(rate_limit="1/m")
def limited(n):
    return n


@app.task(
    bind=True,
    autoretry_for=(KeyError,),
    retry_backoff=True,
    retry_jitter=False,
    max_retries=2,
)
def backoff(self, key):
    client().rpush(key, json.dumps([self.request.id, self.request.retries]))
    raise KeyError("missing")


@app.task(bind=True, max_retries=5)
def retry_twice(self, key):
    client().rpush(key, self.request.retries)
    if self.request.retries < 2:
        raise self.retry(exc=ValueError("again"), countdown=0.2)
    return self.request.retries


@app.task
def wait_for_key(key, timeout=10.0):
    r = client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not r.exists(key):
        time.sleep(0.02)
    return os.getpid()


@app.task(acks_late=True)
def counted(key, seconds=0.0):
    client().rpush(key, os.getpid())
    if seconds:
        time.sleep(seconds)
    return True


@app.task(bind=True)
def context_fields(self, x, *, y):
    self.request.note = "set by the task"  # before any field is read
    r = self.request
    return {
        "id": r.id, "root_id": r.root_id, "retries": r.retries, "args": list(r.args),
        "kwargs": r.kwargs, "hostname": r.hostname, "called_directly": r.called_directly,
        "is_eager": r.is_eager, "routing_key": r.delivery_info["routing_key"],
        "custom": r.custom_header, "headers": r.headers, "note": r.note,
        "missing": r.get("no_such_field", "default"), "children": r.children,
    }


class Hooked(app.Task):
    def on_success(self, retval, task_id, args, kwargs):
        client().rpush(kwargs["key"], f"on_success {retval}")

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        client().rpush(kwargs["key"], f"after_return {status}")


@app.task(base=Hooked, ignore_result=True)
def hooked(key):
    return 7
"""

ENGINE_PY = app_module(
    "engine",
    ENGINE_BODY,
    imports=("import json", "import time", "from celeriac.exceptions import SoftTimeLimitExceeded"),
    redis_client=True,
)


@pytest.fixture
def engine(tasks_dir: TasksDir) -> Any:
    tasks_dir.write("engine.py", ENGINE_PY)
    return tasks_dir


# -- the request seen by a task ---------------------------------------------------------


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_task_request_fields_and_hooks(
    worker: StartWorker,
    engine: TasksDir,
    result_keys: ResultKeys,
    scratch: Any,
    redis_client: redis.Redis,
    pool: str,
) -> None:
    """``task.request`` is built only when the task reads it: every field is still
    there (user headers as attributes too), and what the task set first is kept;
    overridden hooks run even though the base class's no-ops are skipped."""
    worker("-c", "1", pool=pool, app="engine")
    tasks = engine.import_module("engine")
    sent = tasks.context_fields.apply_async((1,), {"y": 2}, headers={"custom_header": "hi"})
    result_keys.add(sent.id)
    got = sent.get(timeout=20)
    assert got["id"] == sent.id and got["root_id"] == sent.id
    assert got["retries"] == 0 and got["args"] == [1] and got["kwargs"] == {"y": 2}
    assert got["hostname"].startswith("celery@") and got["called_directly"] is False
    assert got["is_eager"] is False and got["routing_key"] == engine.queue
    assert got["custom"] == "hi" and got["headers"] == {"custom_header": "hi"}
    assert got["note"] == "set by the task" and got["missing"] == "default"
    assert got["children"] == []
    key = scratch("hooks")
    tasks.hooked.delay(key=key)
    assert wait_until(lambda: redis_client.llen(key) == 2, timeout=20)
    assert redis_client.lrange(key, 0, -1) == [b"on_success 7", b"after_return SUCCESS"]


# -- prefork -------------------------------------------------------------------------


def test_prefork_children_run_tasks_at_once(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys, scratch: Any
) -> None:
    process = worker("-c", "2", pool="prefork", app="engine")
    assert ".> concurrency: 2 (prefork)" in process.stdout
    tasks = engine.import_module("engine")
    key = scratch("meet")
    meeting = [tasks.rendezvous.delay(key, 2) for _ in range(2)]
    for r in meeting:
        result_keys.add(r.id)
    # each returns True only if both ran at the same time, in two processes
    assert [r.get(timeout=20) for r in meeting] == [True, True]
    _assert_run_by_children(process.proc.pid, tasks, result_keys, most=2)
    process.wait_for(r"INFO/ForkPoolWorker-\d+\] Task engine\.pid_and_parent\[.+\] succeeded")


def _assert_run_by_children(
    worker_pid: int, tasks: Any, result_keys: ResultKeys, most: int
) -> None:
    """20 tasks ran in child processes of the worker (never in the worker itself), at
    most ``most`` of them, all still alive (no child was replaced)."""
    results = [tasks.pid_and_parent.delay() for _ in range(20)]
    for r in results:
        result_keys.add(r.id)
    ran = {tuple(r.get(timeout=20)) for r in results}
    pids = {pid for pid, _parent in ran}
    assert {parent for _pid, parent in ran} == {worker_pid}, ran
    assert worker_pid not in pids
    assert 1 <= len(pids) <= most, ran
    assert pids <= set(_child_pids(worker_pid)), (pids, _child_pids(worker_pid))


def _child_pids(parent: int) -> list[int]:
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_prefork_is_the_default_pool(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    # No -P and no worker_pool setting: the tasks run in the worker's children.
    process = worker("-c", "2", pool=None, app="engine")
    assert ".> concurrency: 2 (prefork)" in process.stdout
    tasks = engine.import_module("engine")
    _assert_run_by_children(process.proc.pid, tasks, result_keys, most=2)


def test_abort_replaces_the_child_and_marks_worker_lost(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    lost = tasks.abort.delay()
    result_keys.add(lost.id)
    with pytest.raises(Exception) as raised:
        lost.get(timeout=20)
    assert type(raised.value).__name__ == "WorkerLostError"
    assert "signal 6 (SIGABRT)" in str(raised.value)
    assert lost.state == "FAILURE"
    process.wait_for(r"ERROR/MainProcess\] Process 'ForkPoolWorker-1' pid:\d+ exited with")
    # the worker keeps serving, from a new child
    follow = tasks.add.delay(2, 3)
    result_keys.add(follow.id)
    assert follow.get(timeout=20) == 5
    process.wait_for(r"ForkPoolWorker-2\] Task engine\.add")


def test_abort_under_reject_on_worker_lost_is_redelivered(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys, scratch: Any
) -> None:
    worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    key = scratch("abort-once")
    result = tasks.abort_once.delay(key)
    result_keys.add(result.id)
    assert result.get(timeout=30) == "second time lucky"
    assert int(redis.Redis.from_url("redis://127.0.0.1:6379/0").get(key) or 0) == 2


def test_abort_under_acks_late_is_acked_and_failed(
    worker: StartWorker,
    engine: TasksDir,
    result_keys: ResultKeys,
    scratch: Any,
    redis_client: redis.Redis,
) -> None:
    worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    key = scratch("abort-late")
    result = tasks.abort_late.delay(key)
    result_keys.add(result.id)
    with pytest.raises(Exception) as raised:
        result.get(timeout=20)
    assert type(raised.value).__name__ == "WorkerLostError"
    follow = tasks.add.delay(1, 1)
    result_keys.add(follow.id)
    assert follow.get(timeout=20) == 2
    # Not run again: the replacement child acked the message (no poison loop). Once
    # it has no unacked record and is not queued, nothing can bring it back.
    assert wait_until(lambda: not unacked_tags(redis_client, engine.queue), 10)
    assert queue_length(redis_client, engine.queue) == 0
    assert int(redis_client.get(key) or 0) == 1


def test_max_tasks_per_child_recycles_children(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    worker("-c", "1", "--max-tasks-per-child", "2", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    results = [tasks.pid.delay() for _ in range(6)]
    for r in results:
        result_keys.add(r.id)
    pids = [r.get(timeout=30) for r in results]
    assert len(set(pids)) >= 3
    for pid in set(pids):
        assert pids.count(pid) <= 2


def test_max_memory_per_child_replaces_a_big_child(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker("-c", "1", "--max-memory-per-child", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    results = [tasks.hog.delay(1) for _ in range(3)]
    for r in results:
        result_keys.add(r.id)
    pids = [r.get(timeout=30) for r in results]
    assert len(set(pids)) == 3
    process.wait_for(r"over --max-memory-per-child")


def test_warm_shutdown_of_prefork_finishes_the_running_task(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker("-c", "2", pool="prefork", app="engine", check_exit=False)
    tasks = engine.import_module("engine")
    running = tasks.sleeper.delay(1.5)
    result_keys.add(running.id)
    process.wait_for(rf"Task engine\.sleeper\[{re.escape(running.id)}\] received")
    process.signal(signal.SIGTERM)
    assert process.wait(20) == 0, process.log
    assert "Warm shutdown" in process.stdout
    assert running.get(timeout=5) == 1.5


def test_second_signal_is_a_cold_shutdown_of_prefork(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    process = worker("-c", "1", pool="prefork", app="engine", check_exit=False)
    tasks = engine.import_module("engine")
    stuck = tasks.sleeper.delay(60)
    result_keys.add(stuck.id)
    process.wait_for(rf"Task engine\.sleeper\[{re.escape(stuck.id)}\] received")
    process.signal(signal.SIGTERM)
    process.wait_for(r"Warm shutdown")
    process.signal(signal.SIGTERM)
    assert process.wait(20) == 1
    assert "Cold shutdown" in process.stdout
    assert not stuck.ready()
    assert not _child_pids(process.proc.pid)


# -- time limits ---------------------------------------------------------------------


def test_soft_time_limit_is_raised_inside_the_task(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    caught = tasks.soft_caught.delay()
    uncaught = tasks.soft_uncaught.delay()
    result_keys.add(caught.id)
    result_keys.add(uncaught.id)
    assert caught.get(timeout=20) == "cleaned up"
    with pytest.raises(Exception) as raised:
        uncaught.get(timeout=20)
    assert type(raised.value).__name__ == "SoftTimeLimitExceeded"


def test_hard_time_limit_kills_the_child_and_fails_the_task(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    limited = tasks.hard_limited.delay()
    by_header = tasks.sleeper.apply_async((30,), time_limit=1)
    result_keys.add(limited.id)
    result_keys.add(by_header.id)
    for result in (limited, by_header):
        with pytest.raises(Exception) as raised:
            result.get(timeout=30)
        assert type(raised.value).__name__ == "TimeLimitExceeded"
        assert result.state == "FAILURE"
    process.wait_for(r"ERROR/MainProcess\] Hard time limit \(1\.0s\) exceeded for engine\.")
    follow = tasks.add.delay(3, 4)
    result_keys.add(follow.id)
    assert follow.get(timeout=20) == 7


# -- ETA and rate limits -------------------------------------------------------------


def test_eta_task_limit_still_serves_other_tasks(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    tasks_dir.write(
        "etalimit.py",
        """
        from tasks import app, add  # noqa: F401

        app.conf.worker_eta_task_limit = 2
        """,
    )
    worker("--prefetch-multiplier", "4", app="etalimit")
    tasks = tasks_dir.import_module()
    later = [tasks.add.apply_async((i, i), countdown=30) for i in range(3)]
    now = tasks.add.delay(1, 1)
    for r in [*later, now]:
        result_keys.add(r.id)
    # 2 held with their own slots, 1 in the window of 4: room is left for `now`
    assert now.get(timeout=10) == 2
    assert not any(r.ready() for r in later)


def test_rate_limited_messages_do_not_block_others(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    held = [tasks.limited.delay(i) for i in range(6)]
    for r in held:
        result_keys.add(r.id)
    assert held[0].get(timeout=20) == 0  # the bucket starts with one token
    follow = [tasks.add.delay(i, 1) for i in range(5)]
    for r in follow:
        result_keys.add(r.id)
    assert [r.get(timeout=20) for r in follow] == [i + 1 for i in range(5)]
    assert not any(r.ready() for r in held[1:])  # "1/m": the rest wait their turn
    process.stop()
    # nothing lost: the held messages went back to the queue
    assert queue_length(redis.Redis.from_url("redis://127.0.0.1:6379/0"), engine.queue) == 5


def test_worker_disable_rate_limits(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    engine.env["ENGINE_DISABLE_RATE_LIMITS"] = "1"
    worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    results = [tasks.limited.delay(i) for i in range(4)]
    for r in results:
        result_keys.add(r.id)
    assert [r.get(timeout=20) for r in results] == list(range(4))


def test_rate_limit_from_task_annotations(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    tasks_dir.write(
        "annotated.py",
        """
        from tasks import app, add, mul  # noqa: F401

        app.conf.task_annotations = {"tasks.mul": {"rate_limit": "1/h"}}
        """,
    )
    worker(app="annotated")
    tasks = tasks_dir.import_module()
    first, second = tasks.mul.delay(2, 3), tasks.mul.delay(3, 3)
    other = tasks.add.delay(1, 2)
    for r in (first, second, other):
        result_keys.add(r.id)
    assert first.get(timeout=10) == 6
    assert other.get(timeout=10) == 3
    assert not second.ready()


# -- retries and STARTED -------------------------------------------------------------


def test_retry_keeps_the_id_and_counts_retries(
    worker: StartWorker,
    engine: TasksDir,
    result_keys: ResultKeys,
    scratch: Any,
    redis_client: redis.Redis,
) -> None:
    worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    key = scratch("retries")
    result = tasks.retry_twice.delay(key)
    result_keys.add(result.id)
    assert result.get(timeout=20) == 2
    assert [int(x) for x in redis_client.lrange(key, 0, -1)] == [0, 1, 2]


def test_autoretry_with_backoff_then_failure(
    worker: StartWorker,
    engine: TasksDir,
    result_keys: ResultKeys,
    scratch: Any,
    redis_client: redis.Redis,
) -> None:
    process = worker("-c", "1", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    key = scratch("backoff")
    result = tasks.backoff.delay(key)
    result_keys.add(result.id)
    assert wait_until(lambda: task_meta(redis_client, result.id).get("status") == "RETRY", 10)
    with pytest.raises(KeyError):
        result.get(timeout=30)
    attempts = [json.loads(x) for x in redis_client.lrange(key, 0, -1)]
    assert attempts == [[result.id, 0], [result.id, 1], [result.id, 2]]
    # backoff 1 s, then 2 s (retry_jitter off): the retried messages carried an ETA
    lines = process.wait_for(rf"Task engine\.backoff\[{re.escape(result.id)}\] retry: ", count=2)
    assert "in 1s" in lines[0] and "in 2s" in lines[1]


def test_track_started_stores_started_with_pid_and_hostname(
    worker: StartWorker,
    engine: TasksDir,
    result_keys: ResultKeys,
    scratch: Any,
    redis_client: redis.Redis,
) -> None:
    engine.env["ENGINE_TRACK_STARTED"] = "1"
    worker("-c", "1", "-n", "engine1@%h", pool="prefork", app="engine")
    tasks = engine.import_module("engine")
    key = scratch("go")
    result = tasks.wait_for_key.delay(key)
    result_keys.add(result.id)
    assert wait_until(lambda: task_meta(redis_client, result.id).get("status") == "STARTED", 10)
    started = task_meta(redis_client, result.id)["result"]
    assert started["hostname"].startswith("engine1@")
    redis_client.set(key, 1, ex=60)
    assert result.get(timeout=10) == started["pid"]


# -- crash safety --------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "amqp", "sqlite"])
def test_kill_9_in_the_middle_of_300_acks_late_tasks_loses_nothing(
    broker: str,
    request: pytest.FixtureRequest,
    worker: StartWorker,
    engine: TasksDir,
    result_keys: ResultKeys,
    scratch: Any,
    redis_client: redis.Redis,
) -> None:
    if broker == "amqp":
        request.getfixturevalue("on_rabbitmq")
    elif broker == "sqlite":  # the embedded broker, results in Redis (where the test reads)
        sqlite_url = f"sqlite://{engine.path / 'broker.sqlite3'}"
        engine.env = worker_env(engine.queue, sqlite_url, REDIS_URL)
    first = worker("-c", "2", pool="prefork", app="engine", check_exit=False)
    tasks = engine.import_module("engine")
    key = scratch("runs")
    results = [tasks.counted.delay(key, 0.02) for _ in range(300)]
    for r in results:
        result_keys.add(r.id)
    assert wait_until(lambda: redis_client.llen(key) >= 60, 30)
    first.kill()  # SIGKILL of the supervisor; its children follow (PDEATHSIG)
    killed_at = time.monotonic()
    assert wait_until(lambda: not _child_pids(first.proc.pid), 5)
    done_before = sum(1 for r in results if r.ready())
    assert done_before < 300
    runs_before = redis_client.llen(key)
    worker("-c", "2", pool="prefork", app="engine")
    # Recovery: the restarted worker runs the dead one's messages within 10 s of the kill
    # (Redis: its heartbeat lapses after 2 s; RabbitMQ requeues when the connection ends;
    # SQLite: the dead processes' claims are put back), not after the one-hour
    # visibility timeout.
    assert wait_until(
        lambda: redis_client.llen(key) > runs_before, 10 - (time.monotonic() - killed_at)
    )
    for r in results:
        assert r.get(timeout=60) is True
    recovery = time.monotonic() - killed_at
    print(
        f"\n300 acks_late tasks ({broker}): {done_before} done before kill -9, "
        f"all done {recovery:.1f}s after"
    )
    if broker == "redis":
        assert queue_length(redis_client, engine.queue) == 0


def test_long_task_is_not_redelivered_while_its_worker_lives(
    worker: StartWorker,
    tasks_dir: TasksDir,
    engine: TasksDir,
    result_keys: ResultKeys,
    scratch: Any,
    redis_client: redis.Redis,
) -> None:
    tasks_dir.write(
        "shortvis.py",
        """
        from engine import app, counted  # noqa: F401

        opts = dict(app.conf.broker_transport_options)
        opts.update(visibility_timeout=1, unacked_restore_interval=0.2)
        app.conf.broker_transport_options = opts
        """,
    )
    worker("-c", "1", pool="prefork", app="shortvis")
    other = worker("-c", "1", pool="prefork", app="shortvis")
    assert other.proc.poll() is None
    tasks = engine.import_module("engine")
    key = scratch("long")
    result = tasks.counted.delay(key, 4)
    result_keys.add(result.id)
    assert result.get(timeout=20) is True
    # 4 s with a 1 s visibility timeout: the live worker's message stayed put
    assert redis_client.llen(key) == 1


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('app.conf.task_annotations = {"tasks.add": {"rate_limit": "fast"}}', "invalid rate"),
        ('app.conf.task_annotations = {"*": {"rate_limit": "10/d"}}', "unit must be s, m or h"),
        ('app.conf.task_annotations = {"tasks.add": {"time_limit": "soon"}}', "time_limit"),
        ('app.conf.task_annotations = {"tasks.add": {"time_limit": -3}}', "time_limit"),
    ],
    ids=["rate-word", "rate-unit", "time-limit-word", "time-limit-negative"],
)
def test_bad_limits_stop_the_worker_before_it_starts(
    tasks_dir: TasksDir, run_cli: RunCli, setting: str, message: str
) -> None:
    tasks_dir.write("badlimits.py", f"from tasks import app, add  # noqa: F401\n{setting}\n")
    result = run_cli("-A", "badlimits", "worker", "-l", "info", timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output
    assert "ready." not in output
    assert "ForkPoolWorker" not in output


def test_worker_concurrency_setting_auto(
    worker: StartWorker, engine: TasksDir, result_keys: ResultKeys
) -> None:
    """Celery 5.7's ``worker_concurrency = "auto"`` (any case) in the app's settings:
    the prefork pool gets a child per CPU this process may use."""
    from celeriac.worker.options import available_cpus

    engine.write(
        "autoconc.py",
        'from engine import *  # noqa: F403\napp.conf.worker_concurrency = " Auto "\n',
    )
    cpus = available_cpus()
    process = worker(pool=None, app="autoconc")
    assert f".> concurrency: {cpus} (prefork)" in process.stdout
    tasks = engine.import_module("engine")  # fresh: the queue is this test's
    _assert_run_by_children(process.proc.pid, tasks, result_keys, most=cpus)


@pytest.mark.parametrize("value", ['"lots"', '"auto2"', '"-2"', "-2", "2.5", "True"])
def test_bad_worker_concurrency_setting_stops_the_worker(
    tasks_dir: TasksDir, run_cli: RunCli, redis_client: redis.Redis, value: str
) -> None:
    tasks_dir.write(
        "badconc.py",
        f"from tasks import app, add  # noqa: F401\napp.conf.worker_concurrency = {value}\n",
    )
    tasks_dir.import_module("tasks").add.delay(1, 2)
    result = run_cli("-A", "badconc", "worker", "-l", "info", timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "setting 'worker_concurrency' must be an int >= 0 or 'auto'" in output
    assert "ready." not in output
    assert queue_length(redis_client, tasks_dir.queue) == 1  # nothing was taken


def test_unknown_queue_without_create_missing_queues(tasks_dir: TasksDir, run_cli: RunCli) -> None:
    tasks_dir.write(
        "strictq.py",
        """
        from tasks import app, add  # noqa: F401

        app.conf.task_create_missing_queues = False
        """,
    )
    result = run_cli("-A", "strictq", "worker", "-Q", "nosuchqueue", timeout=30)
    assert result.returncode == 2, result.stderr
    assert "queue 'nosuchqueue' is not defined in task_queues" in result.stderr
    assert "ready." not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "0"], "at least 1"),
        (["-c", "-1"], "at least 1"),
        (["-P", "nonesuch"], "unknown pool 'nonesuch'"),
        (["--time-limit", "-5"], "seconds > 0"),
        (["--soft-time-limit", "abc"], "not a number of seconds"),
    ],
    ids=["c0", "c-neg", "pool", "time-limit", "soft-time-limit"],
)
def test_bad_worker_options(
    tasks_dir: TasksDir, run_cli: RunCli, args: list[str], message: str
) -> None:
    result = run_cli("-A", "tasks", "worker", *args, timeout=30)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "ready." not in result.stdout + result.stderr
