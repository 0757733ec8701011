"""A closed producer or consumer raises ``ClosedError``, a lost or refused connection
the plain ``OperationalError``: the worker tells "stop" from "retry" by the class."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from celeriac import _core
from celeriac.exceptions import ClosedError, OperationalError
from conftest import REDIS_URL


def test_closed_error_is_an_operational_error() -> None:
    assert issubclass(ClosedError, OperationalError)
    assert ClosedError is _core.ClosedError


# SQLite is left out: its fetch on a closed consumer waits and returns [] (its fetch
# thread keeps the delivery channel open), a separate defect; AMQP would leave a
# durable queue behind on the shared broker.
@pytest.mark.parametrize("url", [REDIS_URL])
def test_fetch_from_a_closed_consumer_raises_closed_error(url: str) -> None:
    consumer = _core.Consumer(url, [f"closed-{uuid.uuid4()}"], prefetch_count=1)
    consumer.close()
    with pytest.raises(ClosedError):
        consumer.fetch(1, 1.0)


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
