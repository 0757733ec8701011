"""A connection error in the middle of what a consumer received loses nothing.

The transport reports a lost connection as an error *in line* with the deliveries:
the messages it takes after it reconnects come behind the error. ``fetch`` reports the
error on its own, and the messages behind it come with the next calls; they are
already unacked on the broker, so a consumer that dropped them would never run them
(on Redis, not until the visibility timeout, an hour by default)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celeriac import _core
from conftest import REDIS_URL

COUNT = 20


def _our_redis_connections(client: redis.Redis) -> list[dict[str, object]]:
    """The Redis clients that are this process's sockets (by local port)."""
    ports = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            ports.add(target[8:-1])
    inodes_to_port = {}
    with open("/proc/self/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, inode = fields[1], fields[9]
            inodes_to_port[inode] = int(local.split(":")[1], 16)
    mine = {inodes_to_port[i] for i in ports if i in inodes_to_port}
    return [c for c in client.client_list() if int(str(c["addr"]).rsplit(":", 1)[1]) in mine]


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"celeriac-test-fetch-error-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for key in client.scan_iter(match=f"*{name}*", count=1000):
            client.delete(key)
    finally:
        client.close()


def test_messages_received_after_a_connection_error_are_fetched_after_it(queue: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    consumer = _core.Consumer(REDIS_URL, [queue], prefetch_count=COUNT)
    producer = _core.Producer(REDIS_URL, origin="test")
    try:
        # The consumer fetches with a script on its own connection; cut that one (only
        # ours: other processes share this Redis), then queue the messages while the
        # caller is not fetching, so the error and the messages wait in line together.
        scripts = [c for c in _our_redis_connections(client) if c["cmd"] in ("evalsha", "eval")]
        assert scripts, "the consumer's fetch connection was not found"
        for found in scripts:
            client.client_kill_filter(_id=found["id"])
        ids = [str(uuid.uuid4()) for _ in range(COUNT)]
        for task_id in ids:
            producer.send("tasks.add", task_id, [1, 2], {}, queue)
        producer.flush(5.0)
        deadline = time.monotonic() + 15
        while client.llen(queue) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.llen(queue) == 0, "the consumer did not take the messages"

        errors: list[str] = []
        got: list[str] = []
        deadline = time.monotonic() + 10
        while len(got) < COUNT and time.monotonic() < deadline:
            try:
                got.extend(d.id for d in consumer.fetch(COUNT, 0.2))
            except _core.OperationalError as exc:
                errors.append(str(exc))
        assert errors, "the lost connection was not reported"
        assert sorted(got) == sorted(ids)
    finally:
        consumer.close()
        producer.close()
        client.close()
