"""``_core.EventPublisher`` and ``celeriac.events`` on the real Redis: channel names,
the kombu envelope, and bad input (unencodable bodies, a broker that is not there,
a transport without broadcast)."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from pathlib import Path

import pytest
import redis
from celeriac import Celery, _core
from celeriac.events import EventDispatcher, utcoffset, worker_fields

REDIS_URL = "redis://127.0.0.1:6379/0"


def _next_message(pubsub: redis.client.PubSub, wait: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "pmessage":
            return message
    raise AssertionError("no message published")


def test_redis_publish_is_a_kombu_fanout_message() -> None:
    exchange = f"celeriac-test-ev-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    pubsub.psubscribe(f"/0.{exchange}/*")
    publisher = _core.EventPublisher(REDIS_URL)
    try:
        publisher.publish(
            exchange, "worker.heartbeat", {"type": "worker-heartbeat"}, headers={"hostname": "w"}
        )
        publisher.flush(10.0)
        message = _next_message(pubsub)
        assert message["channel"] == f"/0.{exchange}/worker.heartbeat".encode()
        envelope = json.loads(message["data"])  # type: ignore[arg-type]
        assert envelope["headers"] == {"hostname": "w"}
        assert envelope["properties"]["delivery_info"] == {
            "exchange": exchange,
            "routing_key": "worker.heartbeat",
        }
        assert json.loads(base64.b64decode(envelope["body"])) == {"type": "worker-heartbeat"}
    finally:
        publisher.close()
        pubsub.close()
        client.close()


def test_bad_bodies_raise_and_the_publisher_keeps_working() -> None:
    publisher = _core.EventPublisher(REDIS_URL)
    try:
        with pytest.raises(TypeError):
            publisher.publish("celeriac-test-ev", "x", object())
        with pytest.raises(TypeError):
            publisher.publish("celeriac-test-ev", "x", {}, headers={"h": object()})
        publisher.publish("celeriac-test-ev", "x", {"ok": True})
        publisher.flush(10.0)
        assert publisher.dropped == 0
    finally:
        publisher.close()
    with pytest.raises(_core.CeleriacError):
        publisher.publish("celeriac-test-ev", "x", {})  # closed


def test_sqlite_broadcasts_reach_a_receiver(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'x.db'}"
    receiver = _core.EventReceiver(url)
    publisher = _core.EventPublisher(url)
    publisher.publish("celeryev", "worker.online", {"type": "worker-online"}, headers={"h": 1})
    publisher.flush(10)
    publisher.close()
    got = receiver.receive(10)
    assert got is not None
    routing_key, headers, body = got
    assert (routing_key, headers["h"], _core.loads(body)) == (
        "worker.online",
        1,
        {"type": "worker-online"},
    )


def test_dispatcher_with_no_broker_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    app = Celery("ev", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.broker_connection_timeout = 0.5
    events = EventDispatcher(app, "w@test")
    with caplog.at_level(logging.WARNING, logger="celeriac.events"):
        events.send("worker-online", **worker_fields(2.0, 0, 0))
        events.send_task("task-started", uuid="x")
        events.close()
    assert "Events are off" in caplog.text


def test_event_fields() -> None:
    app = Celery("ev", broker=REDIS_URL, set_as_current=False)
    events = EventDispatcher(app, "w@test", enabled=False)
    first = events.event("worker-online", worker_fields(2.0, 1, 2))
    second = events.event("worker-heartbeat", {})
    assert first["hostname"] == "w@test"
    assert first["type"] == "worker-online"
    assert first["freq"] == 2.0 and first["active"] == 1 and first["processed"] == 2
    assert len(first["loadavg"]) == 3
    assert second["clock"] == first["clock"] + 1
    assert isinstance(first["utcoffset"], float) and first["utcoffset"] == utcoffset()
    events.send_task("task-started", uuid="x")  # disabled: nothing buffered
    assert not events._buffer
    events.close()
