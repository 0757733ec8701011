"""Client side of the celeriac and Celery adapters (``BENCH_IMPL`` picks one)."""

from __future__ import annotations

import os
from typing import Any

from benches.app import IMPL, cpu, echo, io, io_async, mark, noop
from benches.peers.common import BROKER, QUEUE, amqp_length, redis_length, sqlite_length


def start() -> None:
    """Nothing to connect ahead: the first ``delay`` does it (the warm-up call)."""


def send_noop() -> None:
    noop.delay()


def send_noops(n: int) -> None:
    for _ in range(n):
        noop.delay()


def send_noops_batch(n: int) -> None:
    """celeriac only: ``noop.delay_many`` (one call, one hand-over to the producer)."""
    delay_many = getattr(noop, "delay_many", None)
    if delay_many is None:
        raise SystemExit("Celery has no batch API for single tasks")
    delay_many([()] * n)


def send_mark(key: str) -> None:
    mark.delay(key)


def send_io(key: str, n: int) -> None:
    """The sync task, or with ``BENCH_IO_ASYNC`` set, the ``async def`` one."""
    task = io_async if os.environ.get("BENCH_IO_ASYNC") else io
    if task is None:
        raise SystemExit("BENCH_IO_ASYNC is set but bench.io_async is not registered")
    task.delay(key, n)


def send_cpu(key: str, n: int) -> None:
    cpu.delay(key, n)


def pending() -> int:
    if BROKER == "redis":
        return redis_length(QUEUE)
    if BROKER == "amqp":
        return amqp_length(QUEUE)
    if IMPL == "celery":  # kombu's SQLAlchemy transport keeps delivered rows, invisible
        return sqlite_length(
            "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
            " WHERE q.name = ? AND m.visible = 1",
            QUEUE,
        )
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
    """One round trip: ``echo.delay(i).get()``. The first call also waits for the worker
    to start (Celery's takes seconds on a busy machine), so it may take longer."""
    res = echo.delay(i)
    _result_ids.append(res.id)
    return res.get(timeout=60 if len(_result_ids) == 1 else 10)
