"""``cancel_consumer`` from remote control on a prefork worker that consumes two queues
at once, mid-run: every message is counted. Each task records its number in Redis; at
the end each message sent either ran or is still in its queue, none lost.

On RabbitMQ both queues are consumed on one channel per child, and the cancelled
queue's consumer may still hold deliveries when the other queue's are acked: an ack
that reached over them (``multiple=true``) lost them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import redis
from celery import Celery
from conftest import (
    AMQP_URL,
    REDIS_URL,
    app_module,
    delete_amqp,
    queue_keys,
    queue_length,
    worker_env,
)

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

pytestmark = pytest.mark.redis  # results (and the run records) are in Redis

COUNTED_PY = app_module(
    "counted",
    """

@app.task(ignore_result=True)
def record(key, n):
    client().rpush(key, n)
""",
    imports=("import time",),
    redis_client=True,
)

#: Messages per queue.
EACH = 1000
#: Bound on each wait (never a speed check).
WAIT = 30.0


@pytest.fixture(params=["amqp", "redis"])
def counted(
    request: pytest.FixtureRequest, tasks_dir: TasksDir, redis_client: redis.Redis
) -> Iterator[tuple[str, str]]:
    """(broker URL, the second queue); the queues and the run records removed after."""
    broker = AMQP_URL if request.param == "amqp" else REDIS_URL
    other = f"{tasks_dir.queue}.b"
    tasks_dir.env = worker_env(tasks_dir.queue, broker, REDIS_URL)
    tasks_dir.write("counted.py", COUNTED_PY)
    yield broker, other
    redis_client.delete(f"{tasks_dir.queue}-ran-a", f"{tasks_dir.queue}-ran-b")
    if request.param == "amqp":
        delete_amqp(broker, tasks_dir.queue, other)
    else:
        redis_client.delete(*queue_keys(tasks_dir.queue), *queue_keys(other))


def _depth(broker: str, queue: str, client: redis.Redis) -> int:
    if broker.startswith("redis"):
        return queue_length(client, queue)
    from kombu import Connection

    with Connection(broker, connect_timeout=5) as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def test_cancel_consumer_on_a_prefork_worker_loses_no_message(
    counted: tuple[str, str],
    worker: StartWorker,
    tasks_dir: TasksDir,
    redis_client: redis.Redis,
    result_keys: ResultKeys,
) -> None:
    broker, other = counted
    queue = tasks_dir.queue
    node = f"cancel-{queue[-8:]}@test"  # no other worker on the broker answers to it
    process = worker(
        "-c",
        "2",
        "--prefetch-multiplier",
        "100",
        "-Q",
        f"{queue},{other}",
        "-n",
        node,
        pool="prefork",
        app="counted",
    )
    tasks = tasks_dir.import_module("counted")
    ran_a, ran_b = f"{queue}-ran-a", f"{queue}-ran-b"
    for n in range(EACH):
        tasks.record.apply_async((ran_a, n), queue=queue)
        tasks.record.apply_async((ran_b, n), queue=other)
    client = Celery("cancel-consumer-client", broker=broker, set_as_current=False)
    try:
        deadline = time.monotonic() + WAIT
        while redis_client.llen(ran_b) < EACH // 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        reply = client.control.cancel_consumer(other, destination=[node], reply=True, timeout=5)
        assert reply == [{node: {"ok": f"no longer consuming from {other}"}}]
    finally:
        client.close()

    def counts() -> tuple[int, int, int]:
        return (
            len(set(redis_client.lrange(ran_a, 0, -1))),
            len(set(redis_client.lrange(ran_b, 0, -1))),
            _depth(broker, other, redis_client),
        )

    # Queue a is still consumed: it all runs. What queue b had delivered runs too; the
    # rest stays in b.
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        done_a, done_b, left_b = counts()
        if done_a == EACH and done_b + left_b == EACH:
            break
        time.sleep(0.1)
    done_a, done_b, left_b = counts()
    assert done_a == EACH, f"{EACH - done_a} of queue a lost\n{process.log[-3000:]}"
    assert done_b + left_b == EACH, (
        f"queue b: {done_b} ran + {left_b} left of {EACH}: {EACH - done_b - left_b} lost"
    )
    # An ack that settled a delivery before it was handed over makes that delivery's
    # own ack a channel error (unknown delivery tag): the consumer reconnects.
    assert "re-establish the connection" not in process.log, process.log[-3000:]
    assert left_b > 0, "the cancel came after every message of b had run: nothing tested"
