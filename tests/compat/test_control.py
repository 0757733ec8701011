"""Remote control (pidbox) between celeriac and real Celery 5.7, on Redis.

A real ``celery.Celery(...).control`` reaches a celeriac worker (ping, inspect,
rate_limit, bad input), and celeriac's client reaches a real Celery worker.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from celeriac import _core, control
from celery import Celery

if TYPE_CHECKING:
    from compat.conftest import CompatDir

TIMEOUT = 3.0


@pytest.fixture
def redis_only(compat: CompatDir) -> CompatDir:
    if not compat.env["CELERIAC_TEST_BROKER"].startswith("redis"):
        pytest.skip("remote control is implemented on Redis only")
    return compat


def _client(broker: str) -> Any:
    return Celery("control-client", broker=broker, set_as_current=False)


def test_celery_client_controls_celeriac_worker(redis_only: CompatDir, start_worker: Any) -> None:
    node = f"celeriac-{uuid.uuid4().hex[:8]}@test"
    worker = start_worker("celeriac", "-n", node)
    client = _client(redis_only.env["CELERIAC_TEST_BROKER"])
    try:
        assert client.control.ping(destination=[node], timeout=TIMEOUT) == [{node: {"ok": "pong"}}]
        inspect = client.control.inspect(destination=[node], timeout=TIMEOUT)
        registered = inspect.registered()
        assert registered is not None
        assert "compat.add" in registered[node]
        assert not any(name.startswith("celery.") for name in registered[node])
        assert inspect.active() == {node: []}

        sender = redis_only.celery_app().app
        add = sender.send_task("compat.add", (2, 3), queue=redis_only.queue)
        assert add.get(timeout=10) == 5
        stats = inspect.stats()
        assert stats is not None
        assert stats[node]["total"] == {"compat.add": 1}
        assert {"pid", "clock", "uptime", "pool", "broker", "prefetch_count", "rusage"} <= set(
            stats[node]
        )

        reply = client.control.rate_limit(
            "compat.add", "10/m", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert reply == [{node: {"ok": "new rate limit set successfully"}}]
        registered = inspect.registered()
        assert registered is not None
        assert "compat.add [rate_limit=10/m]" in registered[node]
        bad = client.control.rate_limit(
            "compat.add", "ten", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert "Invalid rate limit string" in bad[0][node]["error"]
        unknown = client.control.rate_limit(
            "no.such.task", "1/s", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert unknown == [{node: {"error": "unknown task"}}]
        nope = client.control.broadcast(
            "no_such_command", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert nope == [{node: {"error": "KeyError('no_such_command')"}}]
    finally:
        client.close()
    assert worker.wait_for("no such control command")


def test_malformed_pidbox_message_is_logged(redis_only: CompatDir, start_worker: Any) -> None:
    node = f"celeriac-{uuid.uuid4().hex[:8]}@test"
    worker = start_worker("celeriac", "-n", node)
    broker = redis_only.env["CELERIAC_TEST_BROKER"]
    import redis

    client = redis.Redis.from_url(broker)
    try:
        client.publish("/0.celery.pidbox", b"not an envelope")
        client.publish(
            "/0.celery.pidbox",
            b'{"body": "bm90IGpzb24=", "properties": '
            b'{"body_encoding": "base64", "delivery_tag": "x"}}',
        )
    finally:
        client.close()
    worker.wait_for("dropped a malformed message")
    worker.wait_for("not JSON")
    replies = control.broadcast(
        redis_only.celeriac_app().app, "ping", destination=[node], timeout=TIMEOUT
    )
    assert replies == [{node: {"ok": "pong"}}]


def test_celeriac_client_reaches_celery_worker(redis_only: CompatDir, start_worker: Any) -> None:
    start_worker("celery")
    app = redis_only.celeriac_app().app
    deadline = time.monotonic() + 10
    replies: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not any(
        name.startswith("celery-") for r in replies for name in r
    ):
        replies = control.broadcast(app, "ping", timeout=1.0)
    ours = [r for r in replies if next(iter(r)).startswith("celery-")]
    assert ours and all(next(iter(r.values())) == {"ok": "pong"} for r in ours)


def test_mailbox_needs_redis() -> None:
    with pytest.raises(ValueError):
        _core.Mailbox("sqlite:///tmp/celeriac-no-pidbox.db")
