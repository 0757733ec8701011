"""Client side of the celeriac and Celery adapters (``BENCH_IMPL`` picks one)."""

from __future__ import annotations

from typing import Any

from benches.app import echo, io, mark, noop
from benches.peers.common import BROKER, QUEUE, amqp_length, redis_length, sqlite_length


def start() -> None:
    """Nothing to connect ahead: the first ``delay`` does it (the warm-up call)."""


def send_noop() -> None:
    noop.delay()


def send_noops(n: int) -> None:
    for _ in range(n):
        noop.delay()


def send_mark(key: str) -> None:
    mark.delay(key)


def send_io(key: str, n: int) -> None:
    io.delay(key, n)


def pending() -> int:
    if BROKER == "redis":
        return redis_length(QUEUE)
    if BROKER == "amqp":
        return amqp_length(QUEUE)
    return sqlite_length("SELECT count(*) FROM messages WHERE queue = ?", QUEUE)


_result_ids: list[str] = []


def finish() -> None:
    """Delete the round trips' results from Redis (both flush their producers at exit)."""
    if BROKER == "redis" and _result_ids:
        from benches.peers.common import side_redis

        r = side_redis()
        for start in range(0, len(_result_ids), 1000):
            r.delete(*(f"celery-task-meta-{tid}" for tid in _result_ids[start : start + 1000]))


def call(i: int) -> Any:
    """One round trip: ``echo.delay(i).get()``."""
    res = echo.delay(i)
    _result_ids.append(res.id)
    return res.get(timeout=10)
