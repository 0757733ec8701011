"""Huey adapter: ``RedisHuey`` (blocking reads) or ``SqliteHuey`` (one file), no results
stored for the no-op (it returns ``None``).

Worker: ``huey_consumer benches.peers.huey_peer.huey -w N -k thread|process``.
"""

from __future__ import annotations

import time

from huey import RedisHuey, SqliteHuey  # type: ignore[import-untyped]

from benches.peers.common import (
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

if BROKER == "redis":
    huey = RedisHuey(QUEUE, url=REDIS_URL)
elif BROKER == "sqlite":
    huey = SqliteHuey(QUEUE, filename=SQLITE_PATH)
else:
    raise SystemExit(f"huey has no {BROKER} broker")


@huey.task()  # type: ignore[untyped-decorator]
def noop() -> None:
    bump()


@huey.task()  # type: ignore[untyped-decorator]
def mark(key: str) -> None:
    _mark(key)


@huey.task()  # type: ignore[untyped-decorator]
def io(key: str, n: int) -> None:
    time.sleep(IO_SLEEP)
    count_done(key, n)


@huey.task()  # type: ignore[untyped-decorator]
def cpu(key: str, n: int) -> None:
    cpu_task(key, n)


def start() -> None:
    pass


def send_noop() -> None:
    noop()


def send_noops(n: int) -> None:
    for _ in range(n):
        noop()


def send_mark(key: str) -> None:
    mark(key)


def send_io(key: str, n: int) -> None:
    io(key, n)


def send_cpu(key: str, n: int) -> None:
    cpu(key, n)


def pending() -> int:
    return int(huey.pending_count())


def finish() -> None:
    pass
