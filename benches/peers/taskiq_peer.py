"""taskiq adapter: ``taskiq_redis.ListQueueBroker`` (a Redis list), no result backend; the
tasks are ``async def`` (taskiq's native kind).

Worker: ``taskiq worker benches.peers.taskiq_peer:broker --workers N`` (a parent process
plus N worker processes, each running up to ``--max-async-tasks`` tasks at once).
"""

from __future__ import annotations

import asyncio
from typing import Any

from taskiq_redis import ListQueueBroker

from benches.peers.common import (
    BROKER,
    IO_SLEEP,
    QUEUE,
    REDIS_URL,
    bump,
    count_done,
    cpu_task,
    redis_length,
)
from benches.peers.common import mark as _mark

if BROKER != "redis":
    raise SystemExit(f"taskiq has no {BROKER} broker here")

broker = ListQueueBroker(REDIS_URL, queue_name=QUEUE)


@broker.task(task_name="bench.noop")
async def noop() -> None:
    bump()


@broker.task(task_name="bench.mark")
async def mark(key: str) -> None:
    _mark(key)  # one blocking Redis call, once per run


@broker.task(task_name="bench.io")
async def io(key: str, n: int) -> None:
    await asyncio.sleep(IO_SLEEP)
    await asyncio.to_thread(count_done, key, n)


@broker.task(task_name="bench.cpu")
async def cpu(key: str, n: int) -> None:
    cpu_task(key, n)  # blocks the event loop, as CPU-bound work in an async task does


_loop = asyncio.new_event_loop()


def _run(coro: Any) -> Any:
    return _loop.run_until_complete(coro)


def start() -> None:
    _run(broker.startup())


def send_noop() -> None:
    _run(noop.kiq())


async def _noops(n: int) -> None:
    for _ in range(n):
        await noop.kiq()


def send_noops(n: int) -> None:
    _run(_noops(n))


def send_mark(key: str) -> None:
    _run(mark.kiq(key))


def send_io(key: str, n: int) -> None:
    _run(io.kiq(key, n))


def send_cpu(key: str, n: int) -> None:
    _run(cpu.kiq(key, n))


def pending() -> int:
    return redis_length(QUEUE)


def finish() -> None:
    _run(broker.shutdown())
