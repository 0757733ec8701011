"""Quorum and priority queues on RabbitMQ, declared from ``task_queues`` with celeriac's
``Queue``/``Exchange``, kombu's, or dicts: the arguments reach the broker, a queue that
exists with other arguments is RabbitMQ's error in words (client and worker), priorities
reorder, ``x-delivery-limit`` drops a poison message, and a Celery 5.7 worker agrees
with a celeriac client on a quorum queue's declaration.

Broker: the real RabbitMQ on 127.0.0.1:5672; results and records in the real Redis.
Every queue is unique to its test and deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import kombu
import pytest
import redis
from celeriac import Celery, Exchange, Queue
from celeriac.exceptions import ImproperlyConfigured, QueueNotFound
from conftest import AMQP_URL, READY_TIMEOUT, REDIS_URL, WorkerProcess, delete_amqp, wait_until

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

QUORUM = {"x-queue-type": "quorum"}

#: The tasks module of these tests, for celeriac (``impl=celeriac``) and Celery
#: (``impl=celery``): one queue from ``task_queues`` with the arguments in QTEST_ARGS.
TASKS = """\
import json
import os

import redis
from {impl} import Celery
from {impl}.exceptions import Reject
from {queues} import Exchange, Queue

app = Celery(
    "tasks",
    broker=os.environ["CELERIAC_TEST_BROKER"],
    backend=os.environ["CELERIAC_TEST_BACKEND"],
)
Q = os.environ["CELERIAC_TEST_QUEUE"]
app.conf.task_default_queue = Q
app.conf.task_queues = [
    Queue(Q, Exchange(Q), routing_key=Q, queue_arguments=json.loads(os.environ["QTEST_ARGS"]))
]
app.conf.worker_prefetch_multiplier = 1
app.conf.broker_connection_retry_on_startup = False


def client():
    return redis.Redis.from_url(os.environ["CELERIAC_TEST_BACKEND"])


@app.task(name="q.record")
def record(key, value):
    client().rpush(key, value)
    return value


@app.task(name="q.poison", acks_late=True)
def poison(key):
    client().incr(key)
    raise Reject("poison", requeue=True)
"""


def write_tasks(tasks_dir: TasksDir, arguments: dict[str, Any], impl: str = "celeriac") -> None:
    queues = "celeriac" if impl == "celeriac" else "kombu"
    name = "tasks" if impl == "celeriac" else "celery_tasks"
    tasks_dir.write(f"{name}.py", TASKS.format(impl=impl, queues=queues))
    tasks_dir.env["QTEST_ARGS"] = json.dumps(arguments)


def tasks_module(tasks_dir: TasksDir, arguments: dict[str, Any]) -> Any:
    write_tasks(tasks_dir, arguments)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QTEST_ARGS", tasks_dir.env["QTEST_ARGS"])
        return tasks_dir.import_module()


def declare_with_kombu(name: str, arguments: dict[str, Any] | None) -> None:
    """Declare ``name`` as kombu (Celery) does, raising RabbitMQ's refusal."""
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        queue = kombu.Queue(name, kombu.Exchange(name), routing_key=name, queue_arguments=arguments)
        queue(conn.default_channel).declare()


def ready_count(name: str) -> int:
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        _, ready, _ = conn.default_channel.queue_declare(name, passive=True)
        return int(ready)


@pytest.fixture
def records(tasks_dir: TasksDir) -> Iterator[str]:
    """A Redis key of this test's own, removed afterwards."""
    key = f"{tasks_dir.queue}-records"
    yield key
    redis.Redis.from_url(REDIS_URL).delete(key)


def app_with(queues: Any, **settings: Any) -> Celery:
    app = Celery("queues", broker=AMQP_URL, broker_connection_timeout=5)
    app.conf.task_queues = queues
    app.conf.update(settings)
    return app


# -- declarations reach the broker ---------------------------------------------------------


def test_queue_and_exchange_come_from_celeriac_and_their_arguments_are_declared() -> None:
    name = "amqp-q-" + uuid.uuid4().hex
    forms = {
        "celeriac": Queue(
            name, Exchange(name, type="topic"), routing_key="k.#", queue_arguments=QUORUM
        ),
        "kombu": kombu.Queue(
            name, kombu.Exchange(name, type="topic"), routing_key="k.#", queue_arguments=QUORUM
        ),
        "dict": {
            name: {
                "exchange": name,
                "exchange_type": "topic",
                "routing_key": "k.#",
                "queue_arguments": QUORUM,
            }
        },
    }
    for form, queue in forms.items():
        app = app_with(queue if form == "dict" else [queue])
        declared = app.transport_options()["queues"][name]
        assert declared["queue_arguments"] == QUORUM, form
        assert (declared["exchange"], declared["exchange_type"]) == (name, "topic"), form
        assert (declared["durable"], declared["auto_delete"]) == (True, False), form
    # kombu's shorthands become RabbitMQ arguments as kombu sends them.
    app = app_with([Queue(name, max_priority=10, message_ttl=1.5, max_length=7)])
    assert app.transport_options()["queues"][name]["queue_arguments"] == {
        "x-max-priority": 10,
        "x-message-ttl": 1500,
        "x-max-length": 7,
    }


@pytest.mark.parametrize(
    ("queue", "words"),
    [
        (kombu.Queue("bq", binding_arguments={"x-match": "all"}), "binding_arguments"),
        (Queue("bq", consumer_arguments={"x-priority": 5}), "consumer_arguments"),
        (Queue("bq", no_ack=True), "no_ack"),
        (Queue("bq", Exchange("bq", arguments={"alternate-exchange": "x"})), "arguments"),
        (Queue("bq", max_priority="high"), "max_priority must be a number"),  # type: ignore[arg-type]
        ({"bq": {"durable": "yes"}}, "durable must be True or False"),
        ({"bq": {"queue_arguments": ["x-queue-type"]}}, "queue_arguments must be a dict"),
        (object(), "is not a queue"),
    ],
    ids=["binding", "consumer", "no_ack", "exchange-args", "priority", "durable", "args", "object"],
)
def test_a_queue_setting_celeriac_cannot_honour_is_an_error(queue: Any, words: str) -> None:
    app = app_with(queue if isinstance(queue, dict) else [queue])
    with pytest.raises(ImproperlyConfigured, match=words):
        app.transport_options()


def test_unknown_queue_with_create_missing_queues_off_is_an_error() -> None:
    app = app_with([Queue("known")], task_create_missing_queues=False, task_default_queue="known")
    with pytest.raises(QueueNotFound, match="'unknown' missing from task_queues"):
        app.send_task("q.record", args=["k", 1], queue="unknown")


def test_quorum_queue_from_task_queues_is_declared_quorum(
    on_rabbitmq: str, tasks_dir: TasksDir
) -> None:
    tasks = tasks_module(tasks_dir, {**QUORUM, "x-delivery-limit": 3})
    tasks.record.delay("unused", 1)
    # Celery's declaration of the same quorum queue is accepted (no 406) and the
    # message is there; a classic declaration is refused: the queue is a quorum queue.
    declare_with_kombu(on_rabbitmq, {**QUORUM, "x-delivery-limit": 3})
    assert ready_count(on_rabbitmq) == 1
    with pytest.raises(Exception, match="inequivalent arg 'x-queue-type'"):
        declare_with_kombu(on_rabbitmq, {"x-delivery-limit": 3})


# -- a queue that exists with other arguments ----------------------------------------------


def test_other_arguments_than_the_existing_queue_are_rabbitmqs_error_in_words(
    on_rabbitmq: str, tasks_dir: TasksDir, worker: StartWorker
) -> None:
    declare_with_kombu(on_rabbitmq, None)  # a classic queue
    tasks = tasks_module(tasks_dir, QUORUM)
    with pytest.raises(ImproperlyConfigured) as raised:
        tasks.record.delay("unused", 1)
    text = str(raised.value)
    assert f"queue {on_rabbitmq!r}" in text.replace('"', "'"), text
    assert "inequivalent arg 'x-queue-type'" in text, text
    assert "received the value 'quorum'" in text, text
    assert ready_count(on_rabbitmq) == 0
    # The worker says the same and stops, rather than consuming from a classic queue.
    process = worker(ready=False, check_exit=False)
    process.wait_for("inequivalent arg 'x-queue-type'", timeout=READY_TIMEOUT)
    assert process.proc.wait(timeout=READY_TIMEOUT) != 0


# -- priorities and the delivery limit, with a worker ----------------------------------------


def test_priority_queue_delivers_the_highest_priority_first(
    on_rabbitmq: str, tasks_dir: TasksDir, worker: StartWorker, records: str
) -> None:
    tasks = tasks_module(tasks_dir, {"x-max-priority": 10})
    # Sent in this order while no worker runs; a prefetch of 1 takes them by priority.
    for priority in (1, 9, 5):
        tasks.record.apply_async((records, priority), priority=priority, ignore_result=True)
    tasks.app.producer.flush(10)
    assert ready_count(on_rabbitmq) == 3
    worker()
    client = redis.Redis.from_url(REDIS_URL)
    assert wait_until(lambda: client.llen(records) == 3, timeout=15)
    assert [int(v) for v in client.lrange(records, 0, -1)] == [9, 5, 1]


def test_delivery_limit_dead_letters_a_poison_message_and_eta_runs_on_quorum(
    on_rabbitmq: str,
    tasks_dir: TasksDir,
    worker: StartWorker,
    records: str,
    result_keys: ResultKeys,
) -> None:
    dead = on_rabbitmq + "-dead"
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        conn.default_channel.queue_declare(dead, durable=True, auto_delete=False)
    try:
        arguments = {
            **QUORUM,
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead,
        }
        tasks = tasks_module(tasks_dir, arguments)
        process = worker()
        tasks.poison.apply_async((records,), ignore_result=True)
        # Rejected with requeue each time: RabbitMQ delivers it 1 + limit times, then
        # dead-letters it instead of requeueing it forever.
        assert wait_until(lambda: ready_count(dead) == 1, timeout=15), process.lines[-20:]
        assert int(redis.Redis.from_url(REDIS_URL).get(records) or 0) == 3
        assert ready_count(on_rabbitmq) == 0
        # Global QoS is off for a quorum queue (RabbitMQ does not support it) and a
        # countdown task is held by the worker until it is due, then runs.
        later = tasks.record.apply_async(("unused-" + records, 7), countdown=1)
        result_keys.add(later.id)
        assert later.get(timeout=15) == 7
    finally:
        delete_amqp(AMQP_URL, dead)
        redis.Redis.from_url(REDIS_URL).delete("unused-" + records)


# -- Celery as the peer ----------------------------------------------------------------------


def test_celery_worker_and_celeriac_client_agree_on_a_quorum_queue(
    on_rabbitmq: str, tasks_dir: TasksDir, records: str
) -> None:
    arguments = {**QUORUM, "x-delivery-limit": 5}
    write_tasks(tasks_dir, arguments, impl="celery")
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_tasks",
        "worker",
        "-P",
        "solo",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "info",
        "-Q",
        on_rabbitmq,
        "-n",
        f"celery-{uuid.uuid4().hex[:8]}@%h",
    ]
    # The celeriac client declares the quorum queue and sends; the Celery worker then
    # declares it as Celery does (a 406 would stop it) and runs the task.
    tasks = tasks_module(tasks_dir, arguments)
    tasks.record.apply_async((records, 42), ignore_result=True)
    tasks.app.producer.flush(10)
    process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
    try:
        client = redis.Redis.from_url(REDIS_URL)
        # (A 406 stops the Celery worker: the wait ends then.)
        wait_until(lambda: client.llen(records) or process.proc.poll() is not None, timeout=30)
        assert client.llen(records) == 1, process.log
        assert int(client.lrange(records, 0, -1)[0]) == 42
        assert "PRECONDITION_FAILED" not in process.log
    finally:
        with contextlib.suppress(Exception):
            process.stop()
