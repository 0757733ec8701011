"""A celeriac worker on RabbitMQ: bad input on the wire and at the call site, and a
broker restart in the middle of 2,000 acks_late tasks.

Broker: the real RabbitMQ on 127.0.0.1:5672 (guest/guest); results in the real Redis.
Each test has its own queue, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
import redis
from conftest import AMQP_URL, REDIS_URL, TASKS_PY
from kombu import Connection

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir


def publish_raw(queue: str, body: bytes, **properties: object) -> None:
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message(body, **properties),  # type: ignore[arg-type]
            exchange="",
            routing_key=queue,
        )


def test_garbage_and_unknown_tasks_are_dropped_and_the_worker_keeps_serving(
    on_rabbitmq: str, worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker()
    tasks = tasks_dir.import_module()
    publish_raw(on_rabbitmq, b"this is not json", content_type="application/json")
    publish_raw(
        on_rabbitmq,
        b"[[1, 2], {}, {}]",
        content_type="application/json",
        headers={"task": "tasks.add"},  # no id
    )
    unknown = tasks.app.send_task("tasks.no_such_task", args=[1])
    result_keys.add(unknown.id)
    with pytest.raises(KeyError):  # NotRegistered, stored as Celery does
        unknown.get(timeout=10)
    assert unknown.state == "FAILURE"
    assert type(unknown.result).__name__ == "NotRegistered"
    good = tasks.add.delay(20, 22)
    result_keys.add(good.id)
    assert good.get(timeout=10) == 42
    process.wait_for("not JSON|not valid JSON|invalid", timeout=10)
    process.wait_for("no task name or id", timeout=10)
    process.wait_for("unregistered task of type 'tasks.no_such_task'", timeout=10)
    # Nothing was requeued: the queue is empty once the good task ran.
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        _, ready, _ = conn.default_channel.queue_declare(on_rabbitmq, passive=True)
    assert ready == 0


def test_wrong_credentials_and_unknown_vhost_name_the_masked_url(tasks_dir: TasksDir) -> None:
    from celeriac import Celery
    from celeriac.exceptions import OperationalError

    for url in (
        "amqp://guest:wrongpassword@127.0.0.1:5672//",
        "amqp://guest:guest@127.0.0.1:5672/no-such-vhost-celeriac",
    ):
        app = Celery("bad", broker=url, broker_connection_timeout=5)
        app.conf.task_default_queue = tasks_dir.queue
        with pytest.raises(OperationalError) as raised:
            app.send_task("tasks.add", args=[1, 2])
        text = str(raised.value)
        assert "guest:**@127.0.0.1:5672" in text, text
        assert "wrongpassword" not in text


def test_message_over_the_size_limit_is_refused_at_the_call_site(
    on_rabbitmq: str, tasks_dir: TasksDir
) -> None:
    tasks = tasks_dir.import_module()
    tasks.app.conf.broker_transport_options = {"max_message_size": 4096}
    with pytest.raises(ValueError, match="more than the broker's limit"):
        tasks.add.delay("x" * 10_000, "y")
    tasks.app.producer.flush(10)
    with Connection(AMQP_URL, connect_timeout=5) as conn, contextlib.suppress(Exception):
        _, ready, _ = conn.default_channel.queue_declare(on_rabbitmq, passive=True)
        assert ready == 0


def _rabbitmqctl(*args: str, timeout: float = 120) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, timeout=timeout, capture_output=True)


@pytest.mark.broker_outage
def test_rabbitmq_restart_mid_stream_loses_no_acks_late_task(
    on_rabbitmq: str, worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    count = 2000
    # 2,000 tasks of ~3 ms: the stream lasts several seconds, so the restart hits it.
    tasks_dir.write(
        "tasks.py",
        TASKS_PY
        + "\n\n@app.task(acks_late=True)\ndef late_slow(x):\n    time.sleep(0.003)\n    return x\n",
    )
    process = worker()
    tasks = tasks_dir.import_module()
    results = [tasks.late_slow.delay(i) for i in range(count)]
    for result in results:
        result_keys.add(result.id)
    tasks.app.producer.flush(60)  # every message is confirmed before the restart
    client = redis.Redis.from_url(REDIS_URL)
    keys = [f"celery-task-meta-{r.id}" for r in results]
    # Restart while the worker is busy with the stream (bounded wait for it to start).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.exists(*keys[:200]) < 50:
        time.sleep(0.01)
    assert client.exists(*keys) < count, "the stream ended before the restart"
    try:
        _rabbitmqctl("stop_app")
        time.sleep(1)
    finally:
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup", timeout=120)
    values = [result.get(timeout=120) for result in results]
    assert values == list(range(count))
    assert process.proc.poll() is None, "the worker kept running through the restart"


@pytest.mark.broker_outage
def test_publish_during_an_outage_raises_and_loses_nothing(on_rabbitmq: str) -> None:
    from celeriac import Celery
    from celeriac.exceptions import OperationalError

    app = Celery(
        "outage",
        broker=AMQP_URL,
        broker_connection_timeout=2,
        broker_transport_options={"confirm_publish": True},
    )
    app.conf.task_default_queue = on_rabbitmq
    app.send_task("tasks.add", args=[1, 1])  # connected, queue declared, confirmed
    try:
        _rabbitmqctl("stop_app")
        # The broker is gone: the call does not hang and does not drop silently.
        with pytest.raises(OperationalError) as raised:
            app.send_task("tasks.add", args=[2, 2])
        assert "guest:**@127.0.0.1:5672" in str(raised.value)
    finally:
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup", timeout=120)
    # The unconfirmed message stayed in the outbox and is sent after the reconnect.
    app.producer.flush(60)
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        _, ready, _ = conn.default_channel.queue_declare(on_rabbitmq, passive=True)
    assert ready == 2


def test_headers_nested_as_deep_as_a_frame_holds_do_not_kill_the_worker(
    on_rabbitmq: str, worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    """20,000 nested lists (100 KB of header table, under RabbitMQ's 128 KiB frame):
    lapin parses them recursively, which overflowed its thread's 2 MiB stack and
    aborted the worker. Now the message is logged and dropped."""
    import sys
    import threading

    deep: object = None
    for _ in range(20_000):
        deep = [deep]
    failures: list[BaseException] = []

    def publish() -> None:  # py-amqp writes the table recursively too
        try:
            publish_raw(
                on_rabbitmq,
                b"[[1, 2], {}, {}]",
                content_type="application/json",
                headers={"task": "tasks.add", "id": "deep", "deep": deep},
            )
        except BaseException as exc:  # reported below
            failures.append(exc)

    process = worker()
    limit, size = sys.getrecursionlimit(), threading.stack_size(512 << 20)
    sys.setrecursionlimit(200_000)
    try:
        thread = threading.Thread(target=publish)
        thread.start()
        thread.join(60)
    finally:
        sys.setrecursionlimit(limit)
        threading.stack_size(size)
    assert not failures, failures
    process.wait_for("Received invalid task message: .*nesting too deep", timeout=20)
    tasks = tasks_dir.import_module()
    good = tasks.add.delay(20, 22)
    result_keys.add(good.id)
    assert good.get(timeout=10) == 42
