"""The benchmark's app and tasks for celeriac and Celery: the very same module for both.

The implementation is chosen by ``BENCH_IMPL`` (``celeriac`` or ``celery``), so the worker
(``-A benches.app``) and the client import the same code and differ only in the ``Celery``
class. Broker and queue come from the environment (see ``benches/peers/common.py``):

- ``redis``: broker and result backend on Redis;
- ``amqp``: RabbitMQ (Celery through py-amqp, ``pyamqp://``), results through ``rpc://``;
- ``sqlite``: celeriac's embedded broker and result backend, one file.
"""

from __future__ import annotations

import os
import time

from benches.peers.common import (
    AMQP_URL,
    BROKER,
    IO_SLEEP,
    QUEUE,
    REDIS_URL,
    SQLITE_PATH,
    count_done,
)
from benches.peers.common import mark as _mark

IMPL = os.environ.get("BENCH_IMPL", "celery")

if IMPL == "celeriac":
    from celeriac import Celery
elif IMPL == "celery":
    from celery import Celery  # type: ignore[import-untyped,no-redef]
else:
    raise SystemExit(f"BENCH_IMPL must be 'celeriac' or 'celery', not {IMPL!r}")

if BROKER == "redis":
    broker, backend = REDIS_URL, REDIS_URL
elif BROKER == "amqp":
    broker = ("pyamqp" if IMPL == "celery" else "amqp") + "://" + AMQP_URL.split("://", 1)[1]
    backend = "rpc://"
elif BROKER == "sqlite" and IMPL == "celeriac":
    broker = backend = f"sqlite://{SQLITE_PATH}"
else:
    raise SystemExit(f"{IMPL} has no {BROKER} broker here")

app = Celery("benches", broker=broker, backend=backend)
app.conf.update(task_default_queue=QUEUE)


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    """The task being measured: does nothing, stores nothing."""


@app.task(name="bench.mark", ignore_result=True)
def mark(key: str) -> None:
    """Sentinel: push the wall-clock time it ran to a Redis list (see ``common.mark``)."""
    _mark(key)


@app.task(name="bench.io", ignore_result=True)
def io(key: str, n: int) -> None:
    """The I/O-bound task: a 100 ms blocking sleep, then count it done."""
    time.sleep(IO_SLEEP)
    count_done(key, n)


@app.task(name="bench.echo")
def echo(x: int) -> int:
    """The round-trip task: its result goes through the result backend."""
    return x
