"""The benchmark's app and tasks for celeriac and Celery: the very same module for both.

The implementation is chosen by ``BENCH_IMPL`` (``celeriac`` or ``celery``), so the worker
(``-A benches.app``) and the client import the same code and differ only in the ``Celery``
class. Broker and queue come from the environment (see ``benches/peers/common.py``):

- ``redis``: broker and result backend on Redis;
- ``amqp``: RabbitMQ (Celery through py-amqp, ``pyamqp://``), results through ``rpc://``;
- ``sqlite``: celeriac's embedded broker and result backend, one file; Celery's
  ``sqla+sqlite://`` (kombu's SQLAlchemy transport) and ``db+sqlite://`` results.
"""

from __future__ import annotations

import asyncio
import os
import time

from benches.peers.common import (
    AMQP_URL,
    BROKER,
    IO_SLEEP,
    QUEUE,
    REDIS_URL,
    SQLITE_PATH,
    bump,
    count_done,
    cpu_task,
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
elif BROKER == "sqlite":
    # Celery's SQLite: kombu's SQLAlchemy transport and the SQLAlchemy result backend.
    broker, backend = f"sqla+sqlite:///{SQLITE_PATH}", f"db+sqlite:///{SQLITE_PATH}-results"
else:
    raise SystemExit(f"{IMPL} has no {BROKER} broker here")

app = Celery("benches", broker=broker, backend=backend)
app.conf.update(task_default_queue=QUEUE)
if os.environ.get("BENCH_SERIALIZER"):  # the serializer scenario: this one, not JSON
    serializer = os.environ["BENCH_SERIALIZER"]
    app.conf.update(task_serializer=serializer, accept_content=["json", serializer])
if os.environ.get("BENCH_ASYNC_CONCURRENCY"):  # celeriac's async def tasks, this many at once
    app.conf.update(worker_async_concurrency=int(os.environ["BENCH_ASYNC_CONCURRENCY"]))


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    """The task being measured: does nothing but count itself (``common.bump``), stores
    nothing."""
    bump()


@app.task(name="bench.mark", ignore_result=True)
def mark(key: str) -> None:
    """Sentinel: push the wall-clock time it ran to a Redis list (see ``common.mark``)."""
    _mark(key)


@app.task(name="bench.io", ignore_result=True)
def io(key: str, n: int) -> None:
    """The I/O-bound task: a 100 ms blocking sleep, then count it done."""
    time.sleep(IO_SLEEP)
    count_done(key, n)


async def _io_async(key: str, n: int) -> None:
    """The I/O-bound task as ``async def`` (celeriac only; taskiq's is the same)."""
    await asyncio.sleep(IO_SLEEP)
    await asyncio.to_thread(count_done, key, n)


#: Registered only for the async run: a celeriac worker with any ``async def`` task widens
#: every process's prefetch window by ``worker_async_concurrency`` (sync runs keep theirs).
ASYNC_RUN = bool(os.environ.get("BENCH_ASYNC_CONCURRENCY") or os.environ.get("BENCH_IO_ASYNC"))
io_async = app.task(name="bench.io_async", ignore_result=True)(_io_async) if ASYNC_RUN else None


@app.task(name="bench.cpu", ignore_result=True)
def cpu(key: str, n: int) -> None:
    """The CPU-bound task: about 2 ms of hashing, then count it done."""
    cpu_task(key, n)


@app.task(name="bench.echo")
def echo(x: int) -> int:
    """The round-trip task: its result goes through the result backend."""
    return x


def _ignore_signal(**kwargs: object) -> None:
    """A receiver that does nothing: what a connected signal costs (``benches.signals``)."""


if os.environ.get("BENCH_SIGNAL_RECEIVERS"):
    if IMPL == "celeriac":
        from celeriac import signals
    else:
        from celery import signals  # type: ignore[no-redef]
    for _signal in (signals.task_received, signals.task_prerun, signals.task_postrun,
                    signals.task_success):  # fmt: skip
        _signal.connect(_ignore_signal)
