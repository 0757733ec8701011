"""A closed producer or consumer raises ``ClosedError``, a lost or refused connection
the plain ``OperationalError``: the worker tells "stop" from "retry" by the class."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from celeriac import _core
from celeriac.exceptions import ClosedError, OperationalError
from conftest import AMQP_URL, REDIS_URL
from kombu.connection import Connection


def test_closed_error_is_an_operational_error() -> None:
    assert issubclass(ClosedError, OperationalError)
    assert ClosedError is _core.ClosedError


def _fetch_after_close(url: str, queue: str) -> None:
    consumer = _core.Consumer(url, [queue], prefetch_count=1)
    consumer.close()
    with pytest.raises(ClosedError):
        consumer.fetch(1, 5.0)


def test_fetch_from_a_closed_consumer_raises_closed_error() -> None:
    _fetch_after_close(REDIS_URL, f"closed-{uuid.uuid4()}")


def test_fetch_from_a_closed_sqlite_consumer_raises_closed_error(tmp_path: Path) -> None:
    started = time.monotonic()
    _fetch_after_close(f"sqlite://{tmp_path / 'broker.db'}", "closed")
    # Raised at once, not after waiting out the fetch's timeout.
    assert time.monotonic() - started < 4.0


def test_fetch_from_a_closed_amqp_consumer_raises_closed_error() -> None:
    queue = f"closed-{uuid.uuid4()}"
    try:
        _fetch_after_close(AMQP_URL, queue)
    finally:
        # The consumer declared a durable queue on the shared broker.
        with Connection(AMQP_URL) as connection:
            connection.channel().queue_delete(queue)


def test_send_on_a_closed_producer_raises_closed_error(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'broker.db'}"
    producer = _core.Producer(url, origin="test")
    producer.close()
    with pytest.raises(ClosedError):
        producer.send("tasks.add", str(uuid.uuid4()), [1, 2], {}, "q")
        producer.flush(1.0)


def test_a_refused_connection_is_not_a_closed_error() -> None:
    # Nothing listens on port 1: the connection is refused, which a retry may cure.
    with pytest.raises(OperationalError) as caught:
        _core.Producer("redis://127.0.0.1:1/0", origin="test")
    assert not isinstance(caught.value, ClosedError)
