"""The benchmark's app and tasks, the same module for both implementations.

The implementation is chosen by the ``BENCH_IMPL`` environment variable (``celeriac`` or
``celery``), so the worker (``-A benches.app``) and the client import the very same code
and differ only in the ``Celery`` class. The orchestrator (``benches/run.py``) sets
``BENCH_QUEUE`` to a fresh queue name for every measurement.
"""

from __future__ import annotations

import os
import time
from typing import Any

IMPL = os.environ.get("BENCH_IMPL", "celery")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")

if IMPL == "celeriac":
    from celeriac import Celery
elif IMPL == "celery":
    from celery import Celery  # type: ignore[import-untyped,no-redef]
else:
    raise SystemExit(f"BENCH_IMPL must be 'celeriac' or 'celery', not {IMPL!r}")

app = Celery("benches", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(task_default_queue=QUEUE)

_redis: Any = None


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    """The task being measured: does nothing, stores nothing."""


@app.task(name="bench.mark", ignore_result=True)
def mark(key: str) -> None:
    """Sentinel for the drain scenario: push the wall-clock time it ran to a Redis list.

    One is queued before the no-op tasks and one after; as the queue is FIFO and the worker
    runs one task at a time, they tell when the first and the last task ran without costing
    the other tasks anything.
    """
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(REDIS_URL)
    _redis.rpush(key, repr(time.time()))


@app.task(name="bench.echo")
def echo(x: int) -> int:
    """The round-trip task: its result goes through the result backend."""
    return x
