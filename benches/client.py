"""One client-side measurement, run by ``benches/run.py`` in a fresh process.

    BENCH_IMPL=celery BENCH_QUEUE=q python -m benches.client enqueue -n 20000

Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis

from benches.app import QUEUE, REDIS_URL, echo, mark, noop


def _wait_for_length(r: redis.Redis, expected: int, timeout: float) -> float:
    """Poll the queue's length until it holds ``expected`` messages; return the time then.

    A producer that writes asynchronously has not finished enqueueing until the broker
    holds every message, so the clock stops here, not when ``delay`` returns.
    """
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        length = int(r.llen(QUEUE))
        if length == expected:
            return now
        if length > expected or now > deadline:
            raise SystemExit(f"queue {QUEUE} holds {length} messages, expected {expected}")
        time.sleep(0.0005)


def enqueue(n: int) -> dict[str, Any]:
    """(a) ``noop.delay()`` n times from one process; clock stops when Redis holds them all."""
    r = redis.Redis.from_url(REDIS_URL)
    noop.delay()  # warm-up: connects the producer
    _wait_for_length(r, 1, 30.0)
    t0 = time.perf_counter()
    for _ in range(n):
        noop.delay()
    t_loop = time.perf_counter()
    t_end = _wait_for_length(r, n + 1, 120.0)
    seconds = max(t_end, t_loop) - t0
    return {"n": n, "seconds": seconds, "loop_seconds": t_loop - t0, "rate": n / seconds}


def fill(n: int, marks_key: str) -> dict[str, Any]:
    """Queue the drain scenario's input (not timed): a mark, n no-ops, a mark."""
    r = redis.Redis.from_url(REDIS_URL)
    mark.delay(marks_key)
    for _ in range(n):
        noop.delay()
    mark.delay(marks_key)
    _wait_for_length(r, n + 2, 120.0)
    return {"n": n, "queued": n + 2}


def roundtrip(calls: int, warmup: int) -> dict[str, Any]:
    """(c) sequential ``echo.delay(i).get()``; one latency per call, in milliseconds."""
    ids: list[str] = []
    # The first call also waits for the worker to start.
    first = echo.delay(-1)
    ids.append(first.id)
    if first.get(timeout=60) != -1:
        raise SystemExit("echo(-1) returned a wrong result")
    for i in range(warmup):
        res = echo.delay(i)
        ids.append(res.id)
        res.get(timeout=10)
    latencies: list[float] = []
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        res = echo.delay(i)
        value = res.get(timeout=10)
        latencies.append((clock() - t0) / 1e6)
        ids.append(res.id)
        if value != i:
            raise SystemExit(f"echo({i}) returned {value!r}")
    # Clean up the result keys (not timed).
    r = redis.Redis.from_url(REDIS_URL)
    for start in range(0, len(ids), 1000):
        r.delete(*(f"celery-task-meta-{tid}" for tid in ids[start : start + 1000]))
    return {"calls": calls, "latencies_ms": latencies}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.client")
    parser.add_argument("scenario", choices=["enqueue", "fill", "roundtrip"])
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--marks-key", default="")
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args(argv)
    if args.scenario == "enqueue":
        out = enqueue(args.n)
    elif args.scenario == "fill":
        out = fill(args.n, args.marks_key)
    else:
        out = roundtrip(args.n, args.warmup)
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
