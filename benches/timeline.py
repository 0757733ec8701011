"""The latency timeline (docs/latency.md): one round trip and one window refill, hop by hop.

    python -m benches.timeline [--broker redis|amqp|sqlite] [--calls 500] [--drain 2000]

Starts a celeriac worker (``-P solo``, the defaults) with ``CELERIAC_TRACE`` set, runs
sequential ``echo.delay(i).get()`` calls from this process, then a drain of no-ops, and
prints each hop's median time since the call started (round trip) or since the worker
thread last asked for work (drain), with the thread it ran on. Every process writes
``<CLOCK_MONOTONIC ns> <pid> <tid> <hop>`` lines to one file (``src/trace.rs``,
``celeriac/_trace.py``); the hops are listed in docs/latency.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

Line = tuple[int, int, int, str]


def read(path: Path) -> list[Line]:
    lines = []
    for text in path.read_text().splitlines():
        ns, pid, tid, name = text.split(" ", 3)
        lines.append((int(ns), int(pid), int(tid), name))
    lines.sort()
    return lines


def where(line: Line, caller: int) -> str:
    _, pid, tid, _ = line
    role = "caller" if pid == caller else "worker"
    return f"{role} {'python' if pid == tid else 'runtime'}"


def roundtrip_table(lines: list[Line], caller: int, warmup: int) -> list[tuple[str, float, int]]:
    """(hop at thread, median µs since call.start, calls that had it) in median order."""
    since: dict[str, list[float]] = defaultdict(list)
    start = None
    calls = 0
    for line in lines:
        ns, pid, _, name = line
        if pid == caller and name == "call.start":
            calls += 1
            start = ns if calls > warmup else None
            seen: set[str] = set()
            continue
        if start is None:
            continue
        key = f"{name} [{where(line, caller)}]"
        if key not in seen:  # the first time in this call
            seen.add(key)
            since[key].append((ns - start) / 1000)
        if pid == caller and name == "call.done":
            start = None
    rows = [(key, statistics.median(v), len(v)) for key, v in since.items()]
    return sorted(rows, key=lambda row: row[1])


def drain_table(lines: list[Line], worker_main: int) -> list[tuple[str, float, int]]:
    """Each hop's median µs since the worker's Python thread last entered fetch."""
    since: dict[str, list[float]] = defaultdict(list)
    start = None
    for ns, pid, tid, name in lines:
        if tid == worker_main and name == "consume.fetch":
            start = ns
            seen: set[str] = set()
            continue
        if start is None or pid != worker_main:
            continue
        key = f"{name} [worker {'python' if tid == pid else 'runtime'}]"
        if key not in seen:
            seen.add(key)
            since[key].append((ns - start) / 1000)
    rows = [(key, statistics.median(v), len(v)) for key, v in since.items()]
    return sorted(rows, key=lambda row: row[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.timeline")
    p.add_argument("--broker", choices=["redis", "amqp", "sqlite"], default="redis")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--drain", type=int, default=2000, help="no-ops for the refill trace (0: none)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="celeriac-timeline-"))
    trace = tmp / "trace.txt"
    queue = f"timeline-{uuid.uuid4().hex[:8]}"
    os.environ.update(
        CELERIAC_TRACE=str(trace),
        BENCH_IMPL="celeriac",
        BENCH_BROKER=args.broker,
        BENCH_QUEUE=queue,
        BENCH_SQLITE=str(tmp / "timeline.sqlite3"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    from celeriac import _trace

    from benches.app import echo, noop  # after the environment: it picks the broker

    argv_worker = [sys.executable, "-m", "celeriac", "-A", "benches.app", "worker",
                   "-P", "solo", "-c", "1", "-Q", queue, "-l", "warning"]  # fmt: skip
    worker = subprocess.Popen(argv_worker, cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        for i in range(args.calls + args.warmup):
            _trace.hop("call.start")
            result = echo.delay(i)
            _trace.hop("call.sent")
            value = result.get(timeout=60)
            _trace.hop("call.done")
            if value != i:
                raise SystemExit(f"call {i} returned {value!r}")
        mark = len(read(trace))
        if args.drain:
            worker.terminate()
            worker.wait(30)
            for _ in range(args.drain):
                noop.delay()
            echo.delay(-1)
            worker = subprocess.Popen(argv_worker, cwd=ROOT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            ran = args.calls + args.warmup + args.drain + 1
            while trace.read_text().count(" py.task.end\n") < ran:
                if time.monotonic() > deadline:
                    raise SystemExit("the drain did not finish")
                time.sleep(0.5)
            time.sleep(1)
    finally:
        worker.terminate()
        worker.wait(30)
    lines = read(trace)
    caller = os.getpid()
    print(f"round trip on {args.broker}: median µs since call.start ({args.calls} calls)")
    for key, median, count in roundtrip_table(lines, caller, args.warmup):
        print(f"  {median:9.1f}  {key}  (n={count})")
    if args.drain:
        drained = lines[mark:]
        main_pid = [pid for _, pid, _, name in drained if name == "consume.fetch"][-1]
        print(f"drain on {args.broker}: median µs since the worker thread entered fetch")
        for key, median, count in drain_table(drained, main_pid):
            print(f"  {median:9.1f}  {key}  (n={count})")
    print(f"trace: {trace}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
