# mypy: disable-error-code="no-untyped-call"
"""``celeriac._core`` Producer, Consumer and Backend over RabbitMQ (``amqp://`` and the
``rpc://`` result backend), against the real broker on 127.0.0.1:5672, with kombu
(py-amqp) and Celery 5.7 as the peers: what one side sends, the other reads.

Every test uses its own queue names (and reply queues) and deletes them.
"""

from __future__ import annotations

import contextlib
import datetime
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import celery  # type: ignore[import-untyped]
import celery.result  # type: ignore[import-untyped]
import kombu.pools
import pytest
from celeriac import _core
from celery.app.task import Context  # type: ignore[import-untyped]
from conftest import success_meta, wait_until
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer as KombuConsumer

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
MASKED = "amqp://guest:**@127.0.0.1:5672//"


def unique(name: str) -> str:
    return f"py-amqp-{name}-{uuid.uuid4().hex}"


@pytest.fixture
def connection() -> Iterator[Connection]:
    conn = Connection(BROKER, connect_timeout=5)
    try:
        conn.connect()
    except Exception as exc:  # pragma: no cover - environment problem
        pytest.fail(f"RabbitMQ must run on 127.0.0.1:5672: {exc}")
    yield conn
    conn.release()


@pytest.fixture
def queue(connection: Connection) -> Iterator[str]:
    """A unique queue name; the queue and its same-named exchange are deleted after."""
    name = unique("q")
    yield name
    channel = connection.channel()
    channel.queue_delete(name)
    channel.exchange_delete(name)
    channel.close()


@pytest.fixture
def oid(connection: Connection) -> Iterator[str]:
    """A client oid (its rpc reply queue's name); the queue is deleted after."""
    name = str(uuid.uuid4())
    yield name
    channel = connection.channel()
    channel.queue_delete(name)
    channel.close()


def celery_queue(name: str) -> Queue:
    """The queue as Celery 5.7 declares it (task_create_missing_queues)."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def close_app(app: celery.Celery) -> None:
    """Close every connection a Celery app opened: its rpc result consumer and kombu's
    global connection and producer pools (emptied, so later apps get fresh ones)."""
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_consumer", None) is not None:
        consumer.stop()
    app.close()
    kombu.pools.reset()


def fetch_all(consumer: _core.Consumer, count: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got.extend(consumer.fetch(count - len(got), 0.5))
    assert len(got) == count, f"only {len(got)} of {count} arrived"
    return got


def depth(connection: Connection, name: str) -> int:
    channel = connection.channel()
    try:
        _, count, _ = channel.queue_declare(name, passive=True)
        return int(count)
    finally:
        channel.close()


def messages_in(name: str) -> int | None:
    """The queue's messages, ready and unacked, as RabbitMQ counts them (None: no queue)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for line in listed.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[0] == name:
            return int(fields[1])
    return None


def test_producer_and_consumer_round_trip(connection: Connection, queue: str) -> None:
    producer = _core.Producer(BROKER, origin="gen1@test", reply_to="oid-1")
    producer.send("tasks.add", "id-1", (2, 3), {"z": [1, None]}, queue)
    producer.send(
        "tasks.add",
        "id-2",
        [4],
        {},
        queue,
        {"priority": 5, "eta": "2030-01-01T00:00:00+00:00", "timelimit": (10, 5.5)},
    )
    producer.flush(10.0)
    consumer = _core.Consumer(BROKER, [queue], prefetch_count=10)
    first, second = fetch_all(consumer, 2)
    assert (first.task, first.id, first.args, first.kwargs) == (
        "tasks.add",
        "id-1",
        [2, 3],
        {"z": [1, None]},
    )
    assert first.headers["origin"] == "gen1@test"
    assert first.headers["shadow"] is None
    assert first.headers["stamps"] == {}
    assert (first.exchange, first.routing_key, first.redelivered) == ("", queue, False)
    assert (first.reply_to, first.correlation_id) == ("oid-1", "id-1")
    assert first.content_type == "application/json"
    assert first.error is None
    assert second.headers["timelimit"] == [10, 5.5]
    assert second.headers["eta"] == "2030-01-01T00:00:00+00:00"
    consumer.ack([first.delivery_tag])
    consumer.reject(second.delivery_tag, True)
    again = fetch_all(consumer, 1)[0]
    assert (again.id, again.redelivered) == ("id-2", True)
    assert consumer.restore_unacked() == 1
    assert depth(connection, queue) == 1
    producer.close()


def test_a_message_we_publish_is_read_by_kombu(connection: Connection, queue: str) -> None:
    producer = _core.Producer(BROKER, origin="gen1@test", reply_to="oid-1")
    producer.send(
        "tasks.mul",
        "id-k",
        (6, 7),
        {"when": datetime.date(2024, 1, 2)},
        queue,
        {"expiration": 60000, "expires": "2030-01-01T00:00:00+00:00", "headers": {"x": [1]}},
    )
    producer.flush(10.0)
    received: list[Message] = []
    # Declared with Celery's flags: no PRECONDITION_FAILED, the message is there.
    with KombuConsumer(
        connection,
        [celery_queue(queue)],
        callbacks=[lambda body, message: received.append(message)],
        accept=["json"],
    ):
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=1)
    assert len(received) == 1
    message = received[0]
    assert message.headers["task"] == "tasks.mul"
    assert message.headers["id"] == "id-k"
    assert message.headers["root_id"] == "id-k"
    assert message.headers["parent_id"] is None
    assert message.headers["timelimit"] == [None, None]
    assert message.headers["x"] == [1]
    args, kwargs, embed = message.decode()
    assert args == [6, 7]
    assert kwargs == {"when": datetime.date(2024, 1, 2)}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert message.properties["correlation_id"] == "id-k"
    assert message.properties["reply_to"] == "oid-1"
    assert message.properties["delivery_mode"] == 2
    assert message.properties["expiration"] == "60000"
    assert message.content_type == "application/json"
    assert message.content_encoding == "utf-8"
    assert message.delivery_info["routing_key"] == queue
    assert message.delivery_info["exchange"] == ""
    message.ack()
    producer.close()


def test_a_task_sent_by_celery_is_read_by_our_consumer(queue: str) -> None:
    app = celery.Celery("interop", broker=BROKER)
    app.conf.broker_connection_retry_on_startup = True
    result = app.send_task(
        "tasks.add",
        args=(2, 3),
        kwargs={"z": datetime.datetime(2024, 1, 2, 3, 4, 5)},
        queue=queue,
        countdown=60,
        time_limit=10,
        soft_time_limit=5,
    )
    consumer = _core.Consumer(BROKER, [queue], prefetch_count=4)
    delivery = fetch_all(consumer, 1)[0]
    assert delivery.error is None
    assert (delivery.task, delivery.id) == ("tasks.add", result.id)
    assert delivery.args == [2, 3]
    assert delivery.kwargs == {"z": datetime.datetime(2024, 1, 2, 3, 4, 5)}
    assert delivery.headers["timelimit"] == [10, 5]
    assert delivery.headers["eta"] is not None
    assert delivery.correlation_id == result.id
    assert delivery.reply_to == app.thread_oid
    assert delivery.routing_key == queue
    consumer.ack([delivery.delivery_tag])
    consumer.close()
    close_app(app)


def test_a_body_that_is_not_json_is_handed_over_to_be_rejected(
    connection: Connection, queue: str
) -> None:
    with connection.Producer() as producer:
        producer.publish(
            b"\xffnot json",
            routing_key=queue,
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "tasks.add", "id": "bad-1"},
            declare=[celery_queue(queue)],
        )
    consumer = _core.Consumer(BROKER, [queue], prefetch_count=4)
    delivery = fetch_all(consumer, 1)[0]
    assert delivery.error is not None and "not valid JSON" in delivery.error
    consumer.reject(delivery.delivery_tag, False)
    # Gone from the queue: neither ready nor unacked (then nothing brings it back).
    assert wait_until(lambda: messages_in(queue) == 0, 15)
    consumer.close()
    assert depth(connection, queue) == 0


def test_bad_credentials_and_unknown_vhost_name_the_masked_url() -> None:
    with pytest.raises(_core.OperationalError) as info:
        _core.Producer("amqp://guest:wrong-secret@127.0.0.1:5672//", origin="x")
    text = str(info.value)
    assert "amqp://guest:**@127.0.0.1:5672//" in text and "wrong-secret" not in text
    assert "access refused" in text
    with pytest.raises(_core.OperationalError, match="virtual host"):
        _core.Consumer("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", ["q"], prefetch_count=1)


def test_rpc_results_reach_the_client(oid: str) -> None:
    client = _core.Backend("rpc://", broker_url=BROKER, reply_to=oid, connect_timeout=5.0)
    worker = _core.Backend("rpc://", broker_url=BROKER)
    task_id = str(uuid.uuid4())
    worker.store(task_id, {"status": "STARTED", "result": None, "task_id": task_id}, reply_to=oid)
    worker.store(task_id, success_meta(task_id, [1, 2]), reply_to=oid, correlation_id=task_id)
    worker.store("nowhere", success_meta("nowhere", 1))  # no reply_to: nothing is sent
    worker.flush(10.0)
    meta = client.wait(task_id, 10.0)
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", [1, 2], task_id)
    assert client.get_meta(task_id) == meta
    assert client.get_meta("unknown") is None
    with pytest.raises(_core.TimeoutError):
        client.wait("unknown", 0.2)
    client.close()
    worker.close()
    with pytest.raises(ValueError, match="AMQP broker"):
        _core.Backend("rpc://", broker_url="redis://127.0.0.1:6379/0")


def test_a_celery_client_reads_our_rpc_result(queue: str) -> None:
    """Celery client sends a task (declaring its reply queue), our Consumer takes it,
    our Backend stores the result to the message's reply_to, Celery's AsyncResult reads it."""
    app = celery.Celery("interop", broker=BROKER, backend="rpc://")
    result = app.send_task("tasks.add", args=(2, 3), queue=queue)
    consumer = _core.Consumer(BROKER, [queue], prefetch_count=1)
    delivery = fetch_all(consumer, 1)[0]
    worker = _core.Backend("rpc://", broker_url=BROKER)
    worker.store(
        delivery.id,
        success_meta(delivery.id, 5),
        reply_to=delivery.reply_to,
        correlation_id=delivery.correlation_id,
    )
    worker.flush(10.0)
    consumer.ack([delivery.delivery_tag])
    assert result.get(timeout=10) == 5
    assert result.status == "SUCCESS"
    worker.close()
    consumer.close()
    close_app(app)


def test_we_read_a_result_stored_by_celerys_rpc_backend(queue: str, oid: str) -> None:
    """Our client sends a task with its oid as reply_to; Celery's RPC backend (the code a
    Celery worker runs) stores the result; our Backend reads it."""
    client = _core.Backend("rpc://", broker_url=BROKER, reply_to=oid)
    producer = _core.Producer(BROKER, origin="gen1@test", reply_to=oid)
    task_id = str(uuid.uuid4())
    producer.send("tasks.add", task_id, (2, 3), {}, queue)
    producer.flush(10.0)
    app = celery.Celery("interop-worker", broker=BROKER, backend="rpc://")
    request = Context(id=task_id, reply_to=oid, correlation_id=task_id)
    app.backend.store_result(task_id, 5, "SUCCESS", request=request)
    meta = client.wait(task_id, 10.0)
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", 5, task_id)
    err = ValueError("boom", 42)
    app.backend.store_result(
        task_id + "-f",
        err,
        "FAILURE",
        request=Context(id=task_id + "-f", reply_to=oid, correlation_id=task_id + "-f"),
    )
    failed = client.wait(task_id + "-f", 10.0)
    assert failed["status"] == "FAILURE"
    assert failed["result"]["exc_type"] == "ValueError"
    assert failed["result"]["exc_message"] == ["boom", 42]
    producer.close()
    client.close()
    close_app(app)


def test_throughput_is_reported(connection: Connection, queue: str) -> None:
    """Not an assertion on speed: prints publish and consume rates for the record."""
    count = 10_000
    producer = _core.Producer(BROKER, origin="gen1@test")
    started = time.perf_counter()
    for n in range(count):
        producer.send("tasks.noop", f"id-{n}", (n,), {}, queue)
    sent = time.perf_counter() - started
    producer.flush(60.0)
    confirmed = time.perf_counter() - started
    consumer = _core.Consumer(BROKER, [queue], prefetch_count=1000)
    started = time.perf_counter()
    seen = 0
    while seen < count and time.perf_counter() - started < 60:
        batch = consumer.fetch(1000, 1.0)
        consumer.ack([d.delivery_tag for d in batch])
        seen += len(batch)
    drained = time.perf_counter() - started
    assert seen == count
    print(
        f"\namqp: send() {count / sent:,.0f}/s, send+confirm {count / confirmed:,.0f}/s, "
        f"fetch+ack {count / drained:,.0f}/s"
    )
    consumer.close()
    producer.close()
