"""One client-side step of a measurement, run by ``benches/run.py`` in a fresh process.

    BENCH_QUEUE=q BENCH_BROKER=redis python -m benches.client celery enqueue -n 20000

Prints one JSON object on the last line of stdout. Every peer adapter module
(``benches/peers/*``) offers the same functions: ``start``, ``send_noop``, ``send_noops``,
``send_mark``, ``send_io``, ``send_cpu``, ``pending``, ``finish``, for round trips
``call``, and where the library has a batch API, ``send_noops_batch``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from types import ModuleType
from typing import Any

MODULES = {
    "celeriac": "benches.peers.celery_like",
    "celery": "benches.peers.celery_like",
    "dramatiq": "benches.peers.dramatiq_peer",
    "rq": "benches.peers.rq_peer",
    "huey": "benches.peers.huey_peer",
    "taskiq": "benches.peers.taskiq_peer",
}


def load(peer: str) -> ModuleType:
    if peer in ("celeriac", "celery"):
        os.environ["BENCH_IMPL"] = peer
    return importlib.import_module(MODULES[peer])


def wait_pending(mod: ModuleType, expected: int, timeout: float) -> float:
    """Poll the queue until it holds ``expected`` messages; return the time then.

    A producer that writes asynchronously has not finished enqueueing until the broker
    holds every message, so the clock stops here, not when the last call returns.
    """
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        length = mod.pending()
        if length == expected:
            return now
        if length > expected or now > deadline:
            raise SystemExit(f"the queue holds {length} messages, expected {expected}")
        time.sleep(0.0005)


def enqueue(mod: ModuleType, n: int, batch: bool = False) -> dict[str, Any]:
    """n single sends from one process (or, with ``batch``, one call of the library's
    batch API); the clock stops when the broker holds them all."""
    if batch and not hasattr(mod, "send_noops_batch"):
        raise SystemExit("this peer has no batch API")
    mod.start()
    mod.send_noop()  # warm-up: connects the producer, declares the queue
    wait_pending(mod, 1, 30.0)
    t0 = time.perf_counter()
    if batch:
        mod.send_noops_batch(n)
    else:
        mod.send_noops(n)
    t_loop = time.perf_counter()
    t_end = wait_pending(mod, n + 1, 120.0)
    seconds = max(t_end, t_loop) - t0
    mod.finish()
    if hasattr(mod, "cleanup"):
        mod.cleanup()
    # wait_pending returned: the broker held exactly n + 1 (the warm-up's one included).
    return {"n": n, "seconds": seconds, "loop_seconds": t_loop - t0, "rate": n / seconds,
            "held": n}  # fmt: skip


def fill(
    mod: ModuleType, n: int, marks: str, kind: str, wait: bool, clock: bool = False
) -> dict[str, Any]:
    """Queue a drain's input (not timed): a sentinel, then n no-ops and a sentinel, or n
    I/O-bound or CPU-bound tasks (the last one done pushes the second time). With
    ``wait``, return once the broker holds them all (no worker runs yet). With ``clock``,
    no first sentinel: this process pushes the time it starts sending (a worker runs)."""
    mod.start()
    if clock:
        from benches.peers.common import side_redis

        side_redis().rpush(marks, repr(time.time()))
    else:
        mod.send_mark(marks)
    if kind == "noop":
        mod.send_noops(n)
        mod.send_mark(marks)
        queued = n + 2
    else:
        send = mod.send_io if kind == "io" else mod.send_cpu
        for _ in range(n):
            send(marks, n)
        queued = n + 1
    if wait:
        wait_pending(mod, queued, 120.0 + n / 100)
    mod.finish()
    return {"n": n, "queued": queued}


def feed(
    mod: ModuleType, n: int, marks: str, progress: str, chunk: int, high_water: int
) -> dict[str, Any]:
    """The soak's input: n no-ops in batches of ``chunk``, each sent once the queue holds
    fewer than ``high_water`` (the broker never holds all n), then a sentinel. The count
    sent so far is kept in the side channel's key ``progress``."""
    from benches.peers.common import side_redis

    mod.start()
    send = getattr(mod, "send_noops_batch", None)
    if send is None or os.environ.get("BENCH_IMPL") != "celeriac":
        send = mod.send_noops
    sent = 0
    while sent < n:
        while mod.pending() >= high_water:
            time.sleep(0.05)
        batch = min(chunk, n - sent)
        send(batch)
        sent += batch
        side_redis().set(progress, sent, ex=3600)
    mod.send_mark(marks)
    # Up until the soak has its last sample: this process maps the same files as the
    # worker, and its exit would change the worker's PSS (their shared pages' share).
    side_redis().blpop([f"{progress}:stop"], timeout=600)
    mod.finish()
    return {"n": n}


def mark(mod: ModuleType, marks: str) -> dict[str, Any]:
    """One sentinel (the memory scenario's 'the worker is ready')."""
    mod.start()
    mod.send_mark(marks)
    mod.finish()
    return {}


def roundtrip(mod: ModuleType, calls: int, warmup: int) -> dict[str, Any]:
    """Sequential ``call(i)`` (send, then wait for the result); one latency per call, ms."""
    mod.start()
    # The first call also waits for the worker to start.
    for i in range(warmup):
        if mod.call(i) != i:
            raise SystemExit(f"call({i}) returned a wrong result")
    latencies: list[float] = []
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        value = mod.call(i)
        latencies.append((clock() - t0) / 1e6)
        if value != i:
            raise SystemExit(f"call({i}) returned {value!r}")
    mod.finish()
    return {"calls": calls, "latencies_ms": latencies}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.client")
    parser.add_argument("peer", choices=sorted(MODULES))
    parser.add_argument("step", choices=["enqueue", "fill", "feed", "mark", "roundtrip"])
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--marks", default="")
    parser.add_argument("--kind", choices=["noop", "io", "cpu"], default="noop")
    parser.add_argument("--batch", action="store_true", help="enqueue: the batch API")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--no-wait", action="store_true", help="fill: a worker is running")
    parser.add_argument("--clock", action="store_true", help="fill: push the start time")
    parser.add_argument("--progress", default="", help="feed: the key of the count sent")
    parser.add_argument("--chunk", type=int, default=10_000, help="feed: tasks per batch")
    parser.add_argument("--high-water", type=int, default=20_000, help="feed: queue bound")
    args = parser.parse_args(argv)
    mod = load(args.peer)
    if args.step == "enqueue":
        out = enqueue(mod, args.n, args.batch)
    elif args.step == "fill":
        out = fill(mod, args.n, args.marks, args.kind, not args.no_wait, args.clock)
    elif args.step == "feed":
        out = feed(mod, args.n, args.marks, args.progress, args.chunk, args.high_water)
    elif args.step == "mark":
        out = mark(mod, args.marks)
    else:
        out = roundtrip(mod, args.n, args.warmup)
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
