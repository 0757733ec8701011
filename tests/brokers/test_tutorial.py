"""Celery's "First steps" tutorial, on celeriac, against the real Redis.

A real ``celeriac -A tasks worker`` process runs the tasks; the test process is the
client, using the same ``tasks`` module with ``from celeriac import Celery``.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from typing import TYPE_CHECKING

import pytest
import redis
from conftest import app_module, wait_until

if TYPE_CHECKING:
    from conftest import ResultKeys, RunCli, StartWorker, TasksDir

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_delay_get(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    worker()
    tasks = tasks_dir.import_module()
    result = tasks.add.delay(4, 4)
    result_keys.add(result.id)
    assert result.get(timeout=1) == 8


def test_result_state(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    worker()
    tasks = tasks_dir.import_module()
    result = tasks.mul.delay(6, 7)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 42
    assert result.ready()
    assert result.successful()
    assert not result.failed()
    assert result.state == "SUCCESS"
    assert result.status == "SUCCESS"
    assert result.result == 42


def test_failure(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    process = worker()
    tasks = tasks_dir.import_module()
    result = tasks.fail.delay()
    result_keys.add(result.id)
    with pytest.raises(ValueError) as raised:
        result.get(timeout=10)
    assert raised.value.args == ("boom", 42)
    exc = result.get(propagate=False)
    assert isinstance(exc, ValueError)
    assert exc.args == ("boom", 42)
    assert result.failed()
    assert result.ready()
    assert not result.successful()
    assert result.state == "FAILURE"
    assert result.traceback is not None
    assert "ValueError" in result.traceback
    assert "boom" in result.traceback
    lines = process.wait_for(
        rf"Task tasks\.fail\[{re.escape(result.id)}\] raised unexpected: ValueError\('boom', 42\)"
    )
    assert "ERROR/MainProcess" in lines[0]
    assert "Traceback (most recent call last)" in process.stderr


def test_forget(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    worker()
    tasks = tasks_dir.import_module()
    result = tasks.add.delay(1, 2)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 3
    result.forget()
    fresh = tasks.app.AsyncResult(result.id)
    assert fresh.state == "PENDING"
    assert fresh.result is None


def test_unknown_id_is_pending(tasks_dir: TasksDir) -> None:
    tasks = tasks_dir.import_module()
    result = tasks.app.AsyncResult(str(uuid.uuid4()))
    assert result.state == "PENDING"
    assert not result.ready()
    assert result.result is None


def test_log_lines(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    process = worker()
    tasks = tasks_dir.import_module()
    result = tasks.add.delay(2, 2)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 4
    task = rf"Task tasks\.add\[{re.escape(result.id)}\]"
    process.wait_for(rf"^\[[\d\-: ,]+: INFO/MainProcess\] {task} received$")
    process.wait_for(rf"^\[[\d\-: ,]+: INFO/MainProcess\] {task} succeeded in [\d.]+s: 4$")
    log = process.stderr
    assert f"Connected to {REDIS_URL}" in log
    assert log.index("Connected to") < log.index(" ready.")


def test_banner_from_the_cli(worker: StartWorker, tasks_dir: TasksDir) -> None:
    process = worker()
    out = process.stdout
    assert "(celeriac)" in out
    assert "[config]" in out
    assert ".> app:         tasks:0x" in out
    assert f".> transport:   {REDIS_URL}" in out
    assert f".> results:     {REDIS_URL}" in out
    assert ".> concurrency: 1 (solo)" in out
    assert ".> task events: OFF (enable -E to monitor tasks in this worker)" in out
    assert "[queues]" in out
    queue = tasks_dir.queue
    assert f".> {queue:<16} exchange={queue}(direct) key={queue}" in out
    assert "[tasks]\n  . tasks.add\n  . tasks.fail\n  . tasks.flaky\n  . tasks.late\n" in out
    # the banner comes before the "ready." line, and on stdout
    assert "ready." not in out


def test_task_events_flag_is_honest(worker: StartWorker) -> None:
    # -E sends task events now (tests/compat/test_events.py checks them with Celery's
    # receiver); the banner says so.
    process = worker("-E")
    assert ".> task events: ON" in process.stdout
    assert "does not send task events" not in process.log


def test_send_task(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    worker()
    tasks = tasks_dir.import_module()
    result = tasks.app.send_task("tasks.add", args=(2, 3))
    result_keys.add(result.id)
    assert result.get(timeout=10) == 5
    result = tasks.app.send_task("tasks.mul", kwargs={"x": 3, "y": 4})
    result_keys.add(result.id)
    assert result.get(timeout=10) == 12


def test_config_from_object(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    queue = tasks_dir.queue
    tasks_dir.write(
        "celeryconfig.py",
        f"""
        broker_url = "{REDIS_URL}"
        result_backend = "{REDIS_URL}"
        task_default_queue = "{queue}"
        result_expires = 600
        """,
    )
    tasks_dir.write(
        "configured.py",
        """
        from celeriac import Celery

        app = Celery("configured")
        app.config_from_object("celeryconfig")


        @app.task
        def add(x, y):
            return x + y
        """,
    )
    process = worker(app="configured")
    assert f".> results:     {REDIS_URL}" in process.stdout
    configured = tasks_dir.import_module("configured")
    assert configured.app.conf.result_expires == 600
    result = configured.add.delay(20, 22)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 42
    ttl = redis.Redis.from_url(REDIS_URL).ttl(f"celery-task-meta-{result.id}")
    assert 0 < ttl <= 600


def test_conf_update(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    tasks_dir.write(
        "updated.py",
        f"""
        from celeriac import Celery

        app = Celery("updated")
        app.conf.update(
            broker_url="{REDIS_URL}",
            result_backend="{REDIS_URL}",
            task_default_queue="{tasks_dir.queue}",
            result_expires=900,
        )


        @app.task
        def add(x, y):
            return x + y
        """,
    )
    worker(app="updated")
    updated = tasks_dir.import_module("updated")
    result = updated.add.delay(1, 1)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 2
    ttl = redis.Redis.from_url(REDIS_URL).ttl(f"celery-task-meta-{result.id}")
    assert 0 < ttl <= 900


def test_threads_pool_runs_tasks_at_once(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker("-c", "3", pool="threads")
    assert ".> concurrency: 3 (threads)" in process.stdout
    tasks = tasks_dir.import_module()
    key = f"{tasks_dir.queue}-rendezvous"
    try:
        meeting = [tasks.rendezvous.delay(key, 3) for _ in range(3)]
        adds = [tasks.add.delay(i, i) for i in range(10)]
        for r in meeting + adds:
            result_keys.add(r.id)
        # each of the three returns True only if all three ran at the same time
        assert [r.get(timeout=20) for r in meeting] == [True, True, True]
        assert [r.get(timeout=10) for r in adds] == [i + i for i in range(10)]
    finally:
        redis.Redis.from_url(REDIS_URL).delete(key)


def test_result_that_cannot_be_stored_is_a_failure(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker()
    tasks = tasks_dir.import_module()
    result = tasks.unserializable.delay()
    result_keys.add(result.id)
    with pytest.raises(TypeError):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    # the worker keeps serving
    follow = tasks.add.delay(5, 5)
    result_keys.add(follow.id)
    assert follow.get(timeout=10) == 10
    # the log line may reach our reader after the results do
    process.wait_for("raised unexpected")


def test_countdown_does_not_block_other_tasks(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    worker()
    tasks = tasks_dir.import_module()
    later = tasks.add.apply_async((1, 1), countdown=2)
    now = tasks.add.delay(2, 2)
    result_keys.add(later.id)
    result_keys.add(now.id)
    assert now.get(timeout=10) == 4
    assert not later.ready()  # held until its ETA, while others ran
    assert later.get(timeout=15) == 2


def test_password_in_broker_url_is_masked(tasks_dir: TasksDir, run_cli: RunCli) -> None:
    """This Redis has no password, so AUTH fails: the banner and the error both show
    the URL with ``**`` in place of the password, and the worker exits with 1."""
    tasks_dir.write(
        "noretry.py",
        f"""
        from celeriac import Celery

        app = Celery("noretry", backend="redis://:t0psecret@127.0.0.1:6379/0")
        app.conf.task_default_queue = "{tasks_dir.queue}"
        app.conf.broker_connection_retry_on_startup = False
        """,
    )
    result = run_cli(
        "-A", "noretry", "-b", "redis://:t0psecret@127.0.0.1:6379/0", "worker", "-l", "info"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "t0psecret" not in output
    assert ".> transport:   redis://:**@127.0.0.1:6379/0" in result.stdout
    assert ".> results:     redis://:**@127.0.0.1:6379/0" in result.stdout
    assert "Cannot connect to redis://:**@127.0.0.1:6379/0" in result.stderr


def _queue_length(queue: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    keys = [queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]
    return sum(int(client.llen(key)) for key in keys)


def test_warm_shutdown_finishes_running_and_restores_the_rest(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker(check_exit=False)
    tasks = tasks_dir.import_module()
    running = tasks.slow.delay(1.5)
    result_keys.add(running.id)
    process.wait_for(rf"Task tasks\.slow\[{re.escape(running.id)}\] received")
    waiting = [tasks.add.delay(i, 1) for i in range(3)]
    for r in waiting:
        result_keys.add(r.id)
    # The worker prefetches them (the warm shutdown then has some to give back).
    assert wait_until(lambda: _queue_length(tasks_dir.queue) == 0), _queue_length(tasks_dir.queue)
    process.signal(signal.SIGTERM)
    assert process.wait(20) == 0, process.log
    assert "Warm shutdown" in process.stdout
    # the running task finished and its result was stored
    assert running.get(timeout=5) == 1.5
    # nothing is lost: each waiting task either ran or is back in the queue
    done = sum(1 for r in waiting if r.ready())
    assert done + _queue_length(tasks_dir.queue) == len(waiting)


def test_second_signal_is_a_cold_shutdown(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker(check_exit=False)
    tasks = tasks_dir.import_module()
    stuck = tasks.slow.delay(60)
    result_keys.add(stuck.id)
    process.wait_for(rf"Task tasks\.slow\[{re.escape(stuck.id)}\] received")
    process.signal(signal.SIGTERM)
    process.wait_for(r"Warm shutdown")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 1
    assert "Cold shutdown" in process.stdout
    assert not stuck.ready()


def test_first_signal_taken_by_another_thread_is_a_warm_shutdown(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    """A shutdown signal whose C handler ran in another thread while the main thread
    sleeps in a task (the kernel's choice when the main thread has it blocked, as glibc
    does around each pthread_create; alike, one caught just before the sleep began):
    Python would run the worker's handler only once the sleep ends."""
    tasks_dir.write(
        "masked.py",
        app_module(
            "masked",
            """

@app.task
def sleep_masked(seconds):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print("SIGTERM blocked in the main thread", flush=True)
    time.sleep(seconds)
    return seconds
""",
            imports=("import signal", "import time"),
        ),
    )
    process = worker(app="masked", check_exit=False)
    masked = tasks_dir.import_module("masked")
    stuck = masked.sleep_masked.delay(60)
    result_keys.add(stuck.id)
    process.wait_for(r"SIGTERM blocked in the main thread")
    process.signal(signal.SIGTERM)
    process.wait_for(r"Warm shutdown")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 1
    assert "Cold shutdown" in process.stdout
    assert not stuck.ready()


def test_retry(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    process = worker()
    tasks = tasks_dir.import_module()
    result = tasks.flaky.delay(2)
    result_keys.add(result.id)
    assert result.get(timeout=15) == 2
    lines = process.wait_for(rf"Task tasks\.flaky\[{re.escape(result.id)}\] retry: ", count=2)
    assert all("INFO/MainProcess" in line for line in lines)
    process.wait_for(rf"Task tasks\.flaky\[{re.escape(result.id)}\] succeeded in [\d.]+s: 2$")


def test_acks_late(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    worker()
    tasks = tasks_dir.import_module()
    results = [tasks.late.delay(i) for i in range(5)]
    for r in results:
        result_keys.add(r.id)
    assert [r.get(timeout=10) for r in results] == list(range(5))
    # acked after running: nothing of this queue is left unacked (acks are asynchronous)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _unacked_from(redis_client, tasks_dir.queue):
        time.sleep(0.05)
    assert _unacked_from(redis_client, tasks_dir.queue) == []


def _unacked_from(client: redis.Redis, queue: str) -> list[bytes]:
    found = []
    for tag, record in client.hscan_iter("unacked"):
        if f'"routing_key": "{queue}"'.encode() in record:
            found.append(tag)
    return found


def test_several_queues(worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys) -> None:
    other = f"{tasks_dir.queue}.b"
    excluded = f"{tasks_dir.queue}.x"
    process = worker("-Q", f"{tasks_dir.queue},{other},{excluded}", "-X", excluded)
    assert f".> {other:<16} exchange={other}(direct) key={other}" in process.stdout
    assert f".> {excluded}" not in process.stdout
    tasks = tasks_dir.import_module()
    a = tasks.add.apply_async((1, 1), queue=other)
    b = tasks.add.delay(2, 2)
    result_keys.add(a.id)
    result_keys.add(b.id)
    assert a.get(timeout=10) == 2
    assert b.get(timeout=10) == 4


def test_many_countdowns_do_not_starve_other_tasks(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    worker()  # solo, window 1 x 4
    tasks = tasks_dir.import_module()
    later = [tasks.add.apply_async((i, i), countdown=30) for i in range(6)]
    now = tasks.add.delay(1, 1)
    for r in [*later, now]:
        result_keys.add(r.id)
    assert now.get(timeout=5) == 2


def test_expired_message_is_revoked_not_run(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    import datetime

    process = worker()
    tasks = tasks_dir.import_module()
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=30)
    result = tasks.add.apply_async((1, 1), expires=past)
    result_keys.add(result.id)
    with pytest.raises(Exception) as raised:
        result.get(timeout=10)
    assert type(raised.value).__name__ == "TaskRevokedError"
    assert result.state == "REVOKED"
    process.wait_for(rf"Task tasks\.add\[{re.escape(result.id)}\] expired at ")
    assert f"tasks.add[{result.id}] succeeded" not in process.log
