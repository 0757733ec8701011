"""``Consumer.add_queue`` / ``cancel_queue`` (what ``add_consumer`` and
``cancel_consumer`` use) on the three transports, against real brokers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac import _core
from conftest import AMQP_URL, REDIS_URL, delete_amqp

#: How long a consumer is watched not taking a message it must not take.
QUIET = 1.5


@pytest.fixture(params=["redis", "amqp", "sqlite"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(url, a queue-name prefix no other test uses); its queues removed afterwards."""
    prefix = f"celeriac-test-addq-{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'broker.db'}", prefix
        return
    url = REDIS_URL if request.param == "redis" else AMQP_URL
    yield url, prefix
    names = [f"{prefix}.{suffix}" for suffix in ("a", "b")]
    if request.param == "redis":
        import redis

        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=f"*{prefix}*", count=1000):
                client.delete(key)
        finally:
            client.close()
    else:
        delete_amqp(url, *names)


def _fetch(consumer: _core.Consumer, want: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got.extend(consumer.fetch(10, 0.2))
    return got


def _quiet(consumer: _core.Consumer) -> list[Any]:
    """Whatever the consumer hands over within ``QUIET`` seconds."""
    got: list[Any] = []
    deadline = time.monotonic() + QUIET
    while time.monotonic() < deadline:
        got.extend(consumer.fetch(10, 0.2))
    return got


def test_queues_are_added_and_cancelled_at_run_time(broker: tuple[str, str]) -> None:
    url, prefix = broker
    first, second = f"{prefix}.a", f"{prefix}.b"
    producer = _core.Producer(url, origin="test")
    consumer = _core.Consumer(url, [first], prefetch_count=4)
    try:
        assert consumer.add_queue(second) is True
        assert consumer.add_queue(second) is False
        producer.send("t.b1", "b1", [], {}, second, {})
        producer.flush(10.0)
        [got] = _fetch(consumer, 1)
        assert (got.id, got.routing_key) == ("b1", second)
        consumer.ack([got.delivery_tag])

        assert consumer.cancel_queue(second) is True
        assert consumer.cancel_queue(second) is False
        producer.send("t.b2", "b2", [], {}, second, {})
        producer.send("t.a1", "a1", [], {}, first, {})
        producer.flush(10.0)
        got_ids = [d.id for d in _fetch(consumer, 1)]
        assert got_ids == ["a1"]
        assert _quiet(consumer) == []

        # No queue at all: nothing is taken, and a queue added back is served again.
        assert consumer.cancel_queue(first) is True
        producer.send("t.a2", "a2", [], {}, first, {})
        producer.flush(10.0)
        assert _quiet(consumer) == []
        assert consumer.add_queue(second) is True
        got = _fetch(consumer, 1)
        assert [d.id for d in got] == ["b2"]
        consumer.ack([d.delivery_tag for d in got])
    finally:
        consumer.close()
        producer.close()


def test_a_bad_queue_name_is_refused_and_the_consumer_goes_on(broker: tuple[str, str]) -> None:
    url, prefix = broker
    if url.startswith("redis"):
        pytest.skip("Redis takes any key name")
    first = f"{prefix}.a"
    bad = "x" * 300 if url.startswith("amqp") else "bad\0name"
    producer = _core.Producer(url, origin="test")
    consumer = _core.Consumer(url, [first], prefetch_count=4)
    try:
        with pytest.raises(ValueError):
            consumer.add_queue(bad)
        assert consumer.cancel_queue(bad) is False
        producer.send("t.a", "a", [], {}, first, {})
        producer.flush(10.0)
        got = _fetch(consumer, 1)
        assert [d.id for d in got] == ["a"]
        consumer.ack([d.delivery_tag for d in got])
    finally:
        consumer.close()
        producer.close()
