"""What every peer adapter shares: the settings from the environment and the side channel.

Each measurement runs its worker and its client in fresh processes; the orchestrator
(``benches/run.py``) passes them the broker and a fresh queue name through the
environment:

- ``BENCH_BROKER``: ``redis``, ``amqp`` or ``sqlite``;
- ``BENCH_QUEUE``: the queue name, unique to the measurement (every key, queue or file the
  peer makes contains it, so the orchestrator can delete them all);
- ``BENCH_REDIS_URL``, ``BENCH_AMQP_URL``, ``BENCH_SQLITE``: where the brokers are.

The side channel is a Redis list written by sentinel tasks (:func:`mark`) and by the
I/O-bound task once the n-th one is done (:func:`count_done`): the orchestrator reads it,
so completion costs the measured tasks nothing (the I/O-bound tasks pay one ``INCR`` each,
under 1 % of their 100 ms).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# Imported here, in the worker's parent, by every peer's app module alike: a prefork child
# then does not import the side channel's client at its first task (~0.2 s of CPU each).
import redis

BROKER = os.environ.get("BENCH_BROKER", "redis")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
SQLITE_PATH = os.environ.get("BENCH_SQLITE", f"/tmp/{QUEUE}.sqlite3")
#: the drain's tally: a folder where every process that runs a no-op keeps its count (unset:
#: the no-ops count nothing)
COUNTER_DIR = os.environ.get("BENCH_COUNTER_DIR", "")

#: the I/O-bound task's sleep, seconds
IO_SLEEP = 0.1
#: the CPU-bound task's work, seconds (calibrated once per run: ``BENCH_CPU_ROUNDS``)
CPU_SECONDS = 0.002
CPU_ROUNDS = int(os.environ.get("BENCH_CPU_ROUNDS", "0") or 0)

_redis: Any = None
_redis_pid = 0


def side_redis() -> Any:
    """A Redis client for the side channel, made in the process that uses it (after a fork)."""
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        _redis = redis.Redis.from_url(REDIS_URL)
        _redis_pid = os.getpid()
    return _redis


def mark(key: str) -> None:
    """The sentinel's body: push the wall-clock time it ran to the list ``key``."""
    side_redis().rpush(key, repr(time.time()))


def count_done(key: str, n: int) -> None:
    """Count one finished task; the n-th pushes the time to ``key`` (as a sentinel would)."""
    r = side_redis()
    if int(r.incr(f"{key}:count")) == n:
        r.rpush(key, repr(time.time()))


_tally: mmap.mmap | None = None
_tally_pid = 0
_tally_count = 0
_tally_lock = threading.Lock()


def _reset_tally_lock() -> None:
    global _tally_lock
    _tally_lock = threading.Lock()  # a forked child: another thread may have held it


os.register_at_fork(after_in_child=_reset_tally_lock)


def bump() -> None:
    """Count one no-op run: every process keeps its own count in a file of 8 bytes in
    ``COUNTER_DIR`` (shared memory: no system call, no broker or Redis command per task,
    and the count survives the process being killed). :func:`tally` adds them up."""
    global _tally, _tally_pid, _tally_count
    if not COUNTER_DIR:
        return
    with _tally_lock:  # threads of one worker share the process's count
        if _tally_pid != os.getpid():
            path = Path(COUNTER_DIR) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, 8)
                _tally = mmap.mmap(fd, 8)
            finally:
                os.close(fd)
            _tally_pid, _tally_count = os.getpid(), 0
        _tally_count += 1
        assert _tally is not None
        struct.pack_into("<Q", _tally, 0, _tally_count)


def tally(directory: str | Path) -> int:
    """The no-ops run so far by every process that counted in ``directory``."""
    total = 0
    for path in Path(directory).iterdir():
        data = path.read_bytes()
        if len(data) == 8:  # a file being created is counted at the next look
            total += struct.unpack("<Q", data)[0]
    return total


def burn(rounds: int = 0) -> bytes:
    """The CPU-bound task's body: ``rounds`` chained SHA-256 of 32 bytes (Python code
    holding the GIL all along: ``hashlib`` only releases it for inputs over 2 KiB)."""
    digest = b"celeriac-bench-cpu-bound-task-32"
    sha256 = hashlib.sha256
    for _ in range(rounds or CPU_ROUNDS):
        digest = sha256(digest).digest()
    return digest


def calibrate(seconds: float = CPU_SECONDS) -> int:
    """How many rounds of :func:`burn` take ``seconds`` here (best of a few tries, so a
    busy moment makes the task shorter, not longer)."""
    probe = 2000
    burn(probe)  # warm-up
    best = min(_timed(probe) for _ in range(7))
    return max(1, round(seconds * probe / best))


def _timed(rounds: int) -> float:
    t0 = time.perf_counter()
    burn(rounds)
    return time.perf_counter() - t0


def cpu_task(key: str, n: int) -> None:
    """The CPU-bound task: about ``CPU_SECONDS`` of hashing, then count it done."""
    burn()
    count_done(key, n)


def redis_length(key: str) -> int:
    return int(side_redis().llen(key))


_amqp: Any = None
_amqp_channel: Any = None


def amqp_length(queue: str) -> int:
    """Ready messages in a RabbitMQ queue (a passive declare); 0 if it does not exist yet."""
    global _amqp, _amqp_channel
    import amqp  # type: ignore[import-untyped]

    if _amqp is None:
        rest = AMQP_URL.split("://", 1)[1]
        creds, _, hostpart = rest.rpartition("@")
        user, _, password = creds.partition(":")
        _amqp = amqp.Connection(
            host=hostpart.split("/")[0], userid=user or "guest", password=password or "guest"
        )
        _amqp.connect()
    if _amqp_channel is None or not _amqp_channel.is_open:
        _amqp_channel = _amqp.channel()
    try:
        _, count, _ = _amqp_channel.queue_declare(queue, passive=True)
    except amqp.exceptions.NotFound:
        _amqp_channel = None  # the broker closed the channel
        return 0
    return int(count)


_COUNTER = """
import sqlite3, sys
for line in sys.stdin:
    path, sql, *params = line.rstrip("\\n").split("\\t")
    try:
        conn = sqlite3.connect(path, timeout=30)
        try:
            n = conn.execute(sql, params).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        n = 0
    print(n, flush=True)
"""
_counter: Any = None


def sqlite_length(sql: str, *params: str) -> int:
    """Rows counted by ``sql`` in the measurement's SQLite file (0 if it has no table yet).

    Counted in a helper process: two SQLite libraries in one process (Python's and the
    copy inside celeriac's extension) clear each other's POSIX locks and can corrupt the
    file (sqlite.org/howtocorrupt.html, 2.2.1).
    """
    global _counter
    if not os.path.exists(SQLITE_PATH):
        return 0
    if _counter is None:
        _counter = subprocess.Popen(
            [sys.executable, "-c", _COUNTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    assert _counter.stdin is not None and _counter.stdout is not None
    _counter.stdin.write("\t".join([SQLITE_PATH, sql, *params]) + "\n")
    _counter.stdin.flush()
    return int(_counter.stdout.readline())
