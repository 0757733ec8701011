"""Celery 5.5+'s native delayed delivery for quorum queues on RabbitMQ: a worker that
consumes a quorum queue declares the 28 ``celery_delayed_*`` levels and binds
``celery_delayed_delivery`` to its (topic/fanout) task exchanges, and a client sends an
ETA task for such a queue into ``celery_delayed_27`` with the delay in its routing key,
where it waits in the broker rather than in a worker. celeriac and Celery 5.7 on either
side; the declarations are kombu's own (a kombu declaration of the same levels is
accepted, one with other arguments refused).

Broker: the real RabbitMQ, each test in a vhost of its own (the ``celery_delayed_*``
names are global in a vhost); results and records in the real Redis.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import kombu
import pytest
import redis
from celeriac.exceptions import OperationalError
from conftest import READY_TIMEOUT, REDIS_URL, WorkerProcess, wait_until, worker_env
from kombu.transport.native_delayed_delivery import (
    calculate_routing_key,
    declare_native_delayed_delivery_exchanges_and_queues,
)

if TYPE_CHECKING:
    from conftest import StartWorker, TasksDir

#: The tasks module, for celeriac (``impl=celeriac``) and Celery (``impl=celery``): one
#: quorum queue on an exchange of type DTEST_EXCHANGE_TYPE (topic by default).
TASKS = """\
import os

import redis
from {impl} import Celery
from {queues} import Exchange, Queue

env = os.environ
app = Celery("tasks", broker=env["CELERIAC_TEST_BROKER"], backend=env["CELERIAC_TEST_BACKEND"])
name = env["CELERIAC_TEST_QUEUE"]
exchange = Exchange(name, type=env.get("DTEST_EXCHANGE_TYPE", "topic"))
quorum = Queue(name, exchange, routing_key=name, queue_arguments={{"x-queue-type": "quorum"}})
app.conf.update(
    task_default_queue=name,
    task_queues=[quorum],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=False,
    broker_native_delayed_delivery_queue_type=env.get("DTEST_LEVEL_TYPE", "quorum"),
)


@app.task(name="d.record")
def record(key, value):
    redis.Redis.from_url(env["CELERIAC_TEST_BACKEND"]).rpush(key, value)
    return value
"""

LEVELS = [f"celery_delayed_{level}" for level in range(28)]


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def vhost_url(tasks_dir: TasksDir) -> Iterator[str]:
    """A RabbitMQ vhost of this test's own (guest may use it), deleted afterwards; the
    test's tasks modules point at it, results in Redis."""
    vhost = f"celeriac-delayed-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        tasks_dir.env = worker_env(tasks_dir.queue, url, REDIS_URL)
        yield url
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def records(tasks_dir: TasksDir) -> Iterator[str]:
    key = f"{tasks_dir.queue}-records"
    yield key
    redis.Redis.from_url(REDIS_URL).delete(key)


def tasks_module(tasks_dir: TasksDir, impl: str = "celeriac", **env: str) -> Any:
    queues = "celeriac" if impl == "celeriac" else "kombu"
    name = "tasks" if impl == "celeriac" else "celery_tasks"
    tasks_dir.write(f"{name}.py", TASKS.format(impl=impl, queues=queues))
    tasks_dir.env.update(env)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        return tasks_dir.import_module(name)


def ready_counts(url: str, *queues: str) -> dict[str, int]:
    """Ready messages of each queue (passive declare: a missing queue raises)."""
    counts = {}
    with kombu.Connection(url, connect_timeout=5) as conn:
        channel = conn.default_channel
        for queue in queues:
            _, ready, _ = channel.queue_declare(queue, passive=True)
            counts[queue] = int(ready)
    return counts


def parked(url: str) -> int:
    """Messages waiting in the delayed-delivery levels."""
    return sum(ready_counts(url, *LEVELS).values())


def declare_as_kombu(url: str, queue_type: str) -> None:
    """Declare the levels as a Celery worker does (raises RabbitMQ's refusal)."""
    with kombu.Connection(url, connect_timeout=5) as conn:
        declare_native_delayed_delivery_exchanges_and_queues(conn, queue_type)


def celery_worker(tasks_dir: TasksDir, queue: str) -> WorkerProcess:
    argv = [
        sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "-P", "solo",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
        "-Q", queue, "-n", f"celery-{uuid.uuid4().hex[:8]}@%h",
    ]  # fmt: skip
    process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
    process.wait_for(r" ready\.$", timeout=READY_TIMEOUT)
    return process


def test_delayed_routing_key_is_kombus() -> None:
    from celeriac._core import delayed_routing_key

    for seconds in (1, 2, 5, 3600, 2**28 - 1, 2**28, 2**40):
        assert delayed_routing_key(seconds, "orders") == calculate_routing_key(seconds, "orders")
    # A key that already carries a delay (a retried task's) gets the new delay only.
    earlier = calculate_routing_key(7, "orders")
    assert delayed_routing_key(3, earlier) == calculate_routing_key(3, earlier)
    for seconds, key in ((0, "orders"), (1, "")):
        with pytest.raises(ValueError):
            delayed_routing_key(seconds, key)


def test_celeriac_worker_declares_celerys_levels_and_a_countdown_waits_in_them(
    vhost_url: str, tasks_dir: TasksDir, worker: StartWorker, records: str
) -> None:
    tasks = tasks_module(tasks_dir)
    worker()
    assert parked(vhost_url) == 0  # the worker declared the levels (a missing one raises)
    # kombu's own declaration of the levels is accepted: the arguments are equal; one
    # with classic level queues is refused (RabbitMQ checks them).
    declare_as_kombu(vhost_url, "quorum")
    with pytest.raises(Exception, match="PRECONDITION_FAILED - inequivalent arg"):
        declare_as_kombu(vhost_url, "classic")
    # A long countdown waits in the levels (3600 s: level 11 first), not in the worker.
    tasks.record.apply_async((records, "later"), countdown=3600, ignore_result=True)
    tasks.app.producer.flush(10)
    assert wait_until(lambda: parked(vhost_url) == 1, timeout=10)
    assert ready_counts(vhost_url, "celery_delayed_11")["celery_delayed_11"] == 1
    # A short one comes out of them through celery_delayed_delivery and runs.
    soon = tasks.record.apply_async((records, "soon"), countdown=2)
    assert soon.get(timeout=30) == "soon"
    client = redis.Redis.from_url(REDIS_URL)
    assert client.lrange(records, 0, -1) == [b"soon"]
    assert parked(vhost_url) == 1


def test_celery_client_countdown_reaches_a_celeriac_worker(
    vhost_url: str, tasks_dir: TasksDir, worker: StartWorker, records: str
) -> None:
    tasks_module(tasks_dir)
    worker()
    celery_tasks = tasks_module(tasks_dir, impl="celery")
    try:
        celery_tasks.record.apply_async((records, 5), countdown=2, ignore_result=True)
        client = redis.Redis.from_url(REDIS_URL)
        assert wait_until(lambda: client.llen(records) == 1, timeout=30)
        assert client.lrange(records, 0, -1) == [b"5"]
    finally:
        celery_tasks.app.close()


def test_celeriac_client_countdown_waits_in_the_levels_for_a_celery_worker(
    vhost_url: str, tasks_dir: TasksDir, records: str
) -> None:
    tasks_module(tasks_dir, impl="celery")
    process = celery_worker(tasks_dir, tasks_dir.queue)
    try:
        tasks = tasks_module(tasks_dir)
        tasks.record.apply_async((records, "later"), countdown=3600, ignore_result=True)
        tasks.app.producer.flush(10)
        # In the levels the Celery worker declared, not held (unacked) by that worker.
        assert wait_until(lambda: parked(vhost_url) == 1, timeout=10), process.log
        tasks.record.apply_async((records, "soon"), countdown=2, ignore_result=True)
        client = redis.Redis.from_url(REDIS_URL)
        assert wait_until(lambda: client.llen(records) == 1, timeout=30), process.log
        assert client.lrange(records, 0, -1) == [b"soon"]
    finally:
        with contextlib.suppress(Exception):
            process.stop()


def test_classic_level_queues_are_declared_classic(
    vhost_url: str, tasks_dir: TasksDir, worker: StartWorker
) -> None:
    tasks_module(tasks_dir, DTEST_LEVEL_TYPE="classic")
    worker()
    assert parked(vhost_url) == 0  # the worker declared the levels (a missing one raises)
    declare_as_kombu(vhost_url, "classic")
    with pytest.raises(Exception, match="PRECONDITION_FAILED - inequivalent arg"):
        declare_as_kombu(vhost_url, "quorum")


def test_bad_level_queue_type_stops_the_worker(
    vhost_url: str, tasks_dir: TasksDir, worker: StartWorker
) -> None:
    # A Celery worker logs "Configuration validation failed" and stops too.
    tasks_module(tasks_dir, DTEST_LEVEL_TYPE="stream")
    process = worker(ready=False, check_exit=False)
    process.wait_for("broker_native_delayed_delivery_queue_type must be", timeout=READY_TIMEOUT)
    assert process.proc.wait(timeout=READY_TIMEOUT) != 0
    assert "'stream'" in process.log or '"stream"' in process.log


def test_past_short_huge_delays_and_direct_exchanges_as_celery(
    vhost_url: str, tasks_dir: TasksDir, records: str, caplog: pytest.LogCaptureFixture
) -> None:
    declare_as_kombu(vhost_url, "quorum")  # as a Celery worker would have
    tasks = tasks_module(tasks_dir)
    queue = tasks_dir.queue
    # No delay, a negative one or a past ETA: straight to the queue (the worker runs it
    # at once), as Celery; under a second too (Celery raises ValueError for it).
    for options in ({"countdown": 0}, {"countdown": -5}, {"countdown": 0.5}):
        tasks.record.apply_async((records, 1), ignore_result=True, **options)
    past = tasks.app.now().replace(year=2000)
    tasks.record.apply_async((records, 1), eta=past, ignore_result=True)
    tasks.app.producer.flush(10)
    assert wait_until(lambda: ready_counts(vhost_url, queue)[queue] == 4, timeout=10)
    assert parked(vhost_url) == 0
    # 2^28 s and more has more than 28 digits, as kombu writes it: it enters at
    # level 27 (its top digit) and leaves the levels early; the worker holds the rest.
    tasks.record.apply_async((records, 1), countdown=2**28, ignore_result=True)
    tasks.app.producer.flush(10)
    assert wait_until(lambda: parked(vhost_url) == 1, timeout=10)
    assert ready_counts(vhost_url, "celery_delayed_27")["celery_delayed_27"] == 1
    # A direct exchange: Celery's warning, and the task goes to its queue.
    direct_queue = queue + "-direct"
    direct = tasks_module(tasks_dir, DTEST_EXCHANGE_TYPE="direct", CELERIAC_TEST_QUEUE=direct_queue)
    with caplog.at_level(logging.WARNING, logger="celeriac.sending"):
        direct.record.apply_async((records, 1), countdown=60, ignore_result=True)
    direct.app.producer.flush(10)
    assert "Direct exchanges are not supported with native delayed delivery" in caplog.text
    assert parked(vhost_url) == 1
    assert wait_until(lambda: ready_counts(vhost_url, direct_queue)[direct_queue] == 1)


def test_a_delayed_send_before_any_worker_declared_the_levels_is_an_error(
    vhost_url: str, tasks_dir: TasksDir, records: str
) -> None:
    # Celery's client loses such a message (py-amqp publishes to a missing exchange);
    # celeriac's first send to the queue waits for the broker and says why.
    tasks = tasks_module(tasks_dir)
    with pytest.raises(OperationalError, match='exchange "celery_delayed_27" does not exist'):
        tasks.record.apply_async((records, 1), countdown=60, ignore_result=True)
