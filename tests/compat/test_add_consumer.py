"""``add_consumer`` / ``cancel_consumer`` (issue #6) on a celeriac worker, sent by
Celery 5.7's own client and by celeriac's command line, on Redis and RabbitMQ.

A worker started with ``-Q a`` is told to consume from ``b`` too: a task sent to ``b``
runs and ``active_queues`` lists it. After ``cancel_consumer b`` a task sent to ``b``
stays in the queue (its length on the broker says so) while ``a`` is still served.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from conftest import delete_amqp, queue_keys, queue_length

from compat.conftest import celeriac_cli, node_name

if TYPE_CHECKING:
    from compat.conftest import CompatDir

TIMEOUT = 3.0


def _queue_length(broker: str, queue: str) -> int:
    """Messages waiting in ``queue`` on the broker (kombu's lists on Redis)."""
    if broker.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker)
        try:
            return queue_length(client, queue)
        finally:
            client.close()
    from kombu import Connection

    with Connection(broker, connect_timeout=5) as conn:
        declared = conn.default_channel.queue_declare(queue, passive=True)
        return int(declared.message_count)


def _queues(client: Celery, node: str) -> list[str]:
    inspect = client.control.inspect(destination=[node], timeout=TIMEOUT)
    got = inspect.active_queues()
    assert got is not None
    return [queue["name"] for queue in got[node]]


def _purge(broker: str, queue: str) -> None:
    if broker.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker)
        try:
            client.delete(*queue_keys(queue))
        finally:
            client.close()


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_celery_client_adds_and_cancels_a_consumer(
    compat: CompatDir, start_worker: Any, pool: str
) -> None:
    broker = compat.env["CELERIAC_TEST_BROKER"]
    if pool == "prefork" and not broker.startswith("redis"):
        pytest.skip("the prefork case runs on Redis")
    node = node_name()
    extra = ("-c", "2") if pool == "prefork" else ()
    worker = start_worker("celeriac", "-n", node, *extra, pool=pool)
    other = f"{compat.queue}.b"
    client = Celery("add-consumer-client", broker=broker, set_as_current=False)
    sender = compat.celery_app().app
    try:
        assert _queues(client, node) == [compat.queue]
        reply = client.control.add_consumer(other, destination=[node], reply=True, timeout=TIMEOUT)
        assert reply == [{node: {"ok": f"add consumer {other}"}}]
        # Asked again: Celery's same reply, and the queue is consumed once.
        again = client.control.add_consumer(other, destination=[node], reply=True, timeout=TIMEOUT)
        assert again == [{node: {"ok": f"add consumer {other}"}}]
        assert _queues(client, node) == [compat.queue, other]
        assert sender.send_task("compat.add", (2, 3), queue=other).get(timeout=10) == 5
        if pool == "prefork":
            # Every child consumes it: several tasks at once, all done.
            results = [sender.send_task("compat.add", (i, i), queue=other) for i in range(6)]
            assert [r.get(timeout=10) for r in results] == [2 * i for i in range(6)]
            assert len(worker.wait_for(f"Started consuming from {other}", count=3)) == 3

        reply = client.control.cancel_consumer(
            other, destination=[node], reply=True, timeout=TIMEOUT
        )
        assert reply == [{node: {"ok": f"no longer consuming from {other}"}}]
        assert _queues(client, node) == [compat.queue]
        stranded = sender.send_task("compat.add", (1, 1), queue=other)
        # Fetches made after it was sent (the worker's queue's tasks, run one after the
        # other) would have taken it along: it is still there, never received.
        for i in range(3):
            follow = sender.send_task("compat.add", (4, i), queue=compat.queue)
            assert follow.get(timeout=10) == 4 + i
        assert _queue_length(broker, other) == 1
        assert stranded.id not in worker.log
        _purge(broker, other)
    finally:
        client.close()
        if not broker.startswith("redis"):
            delete_amqp(broker, other)


def test_celeriac_cli_adds_a_consumer(compat: CompatDir, start_worker: Any) -> None:
    broker = compat.env["CELERIAC_TEST_BROKER"]
    node = node_name()
    start_worker("celeriac", "-n", node)
    other = f"{compat.queue}.b"
    try:
        added = celeriac_cli(compat, "control", "add_consumer", other, "-d", node, "-t", "3")
        assert added.returncode == 0, added.stderr
        assert f"add consumer {other}" in added.stdout
        sender = compat.celery_app().app
        assert sender.send_task("compat.add", (3, 3), queue=other).get(timeout=10) == 6
        cancelled = celeriac_cli(compat, "control", "cancel_consumer", other, "-d", node, "-t", "3")
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"no longer consuming from {other}" in cancelled.stdout
    finally:
        if not broker.startswith("redis"):
            delete_amqp(broker, other)


def test_bad_queue_names_get_an_error_reply(compat: CompatDir, start_worker: Any) -> None:
    broker = compat.env["CELERIAC_TEST_BROKER"]
    node = node_name()
    start_worker("celeriac", "-n", node)
    client = Celery("add-consumer-client", broker=broker, set_as_current=False)
    try:
        for queue in ("", "   ", 42, None, ["a"]):
            for method in ("add_consumer", "cancel_consumer"):
                reply = client.control.broadcast(
                    method,
                    arguments={"queue": queue},
                    destination=[node],
                    reply=True,
                    timeout=TIMEOUT,
                )
                assert "queue name" in reply[0][node]["error"], (method, queue)
        assert _queues(client, node) == [compat.queue]
        sender = compat.celery_app().app
        assert sender.send_task("compat.add", (1, 2), queue=compat.queue).get(timeout=10) == 3
    finally:
        with contextlib.suppress(Exception):
            client.close()
