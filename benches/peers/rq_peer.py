"""RQ adapter (Redis only). Jobs are enqueued with ``result_ttl=0`` (nothing kept after
success, as Celery's ``ignore_result``).

Worker: ``rq worker --worker-class rq.worker.SimpleWorker QUEUE``: runs jobs in the worker's
own process; RQ's default ``Worker`` forks a child for every job (far slower on no-ops).
"""

from __future__ import annotations

import time

from redis import Redis
from rq import Queue

from benches.peers.common import IO_SLEEP, QUEUE, REDIS_URL, bump, count_done, cpu_task
from benches.peers.common import mark as _mark

_queue: Queue | None = None


def noop() -> None:
    bump()


def mark(key: str) -> None:
    _mark(key)


def io(key: str, n: int) -> None:
    time.sleep(IO_SLEEP)
    count_done(key, n)


def cpu(key: str, n: int) -> None:
    cpu_task(key, n)


def _q() -> Queue:
    global _queue
    if _queue is None:
        _queue = Queue(QUEUE, connection=Redis.from_url(REDIS_URL))
    return _queue


def start() -> None:
    _q()


def send_noop() -> None:
    _q().enqueue(noop, result_ttl=0)


def send_noops(n: int) -> None:
    q = _q()
    for _ in range(n):
        q.enqueue(noop, result_ttl=0)


def send_noops_batch(n: int) -> None:
    """``Queue.enqueue_many``: every job in one Redis pipeline."""
    q = _q()
    q.enqueue_many([Queue.prepare_data(noop, result_ttl=0) for _ in range(n)])


def send_mark(key: str) -> None:
    _q().enqueue(mark, key, result_ttl=0)


def send_io(key: str, n: int) -> None:
    _q().enqueue(io, key, n, result_ttl=0)


def send_cpu(key: str, n: int) -> None:
    _q().enqueue(cpu, key, n, result_ttl=0)


def pending() -> int:
    return int(_q().count)


def finish() -> None:
    pass


def cleanup() -> None:
    """After the enqueue scenario: delete the queue and its never-run jobs' hashes."""
    _q().empty()  # type: ignore[no-untyped-call]
