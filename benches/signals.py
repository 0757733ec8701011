"""What signals cost the worker: the drain scenario (``-n`` no-op tasks waiting in Redis,
one ``celeriac worker -P solo``) with no receiver connected, with no-op receivers on
the task signals (``BENCH_SIGNAL_RECEIVERS``, see ``benches/app.py``), and, with
``--baseline DIR``, the same worker importing celeriac from ``DIR`` (e.g. the tree of
the commit before signals, with its built ``_core``) with none connected.

The variants alternate within each repeat, so every ratio comes from the same run:

    python -m benches.signals -n 20000 --repeats 3 [--baseline /tmp/old/python]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis

from benches.plan import Job
from benches.run import Bench, _group_cpu

VARIANTS = ("no receiver", "receivers connected")


class SignalBench(Bench):
    variant: str = VARIANTS[0]
    baseline: str | None = None

    def env(self, job: Job, queue: str) -> dict[str, str]:
        env = super().env(job, queue)
        if self.variant == "receivers connected":
            env["BENCH_SIGNAL_RECEIVERS"] = "1"
        elif self.variant == "baseline" and self.baseline:
            env["PYTHONPATH"] = os.pathsep.join([self.baseline, env["PYTHONPATH"]])
        return env

    def drain_cpu(self, job: Job, queue: str) -> dict[str, Any]:
        """The drain scenario, also timing the worker's CPU between the first sentinel
        and the last: on a shared machine CPU per task is steadier than the rate."""
        n = self.args.n
        marks = f"{queue}:marks"
        self.client(job, queue, "fill", "-n", str(n), "--marks", marks, timeout=60 + n / 100)
        with self.worker(job, queue) as (proc, _):
            (first,) = self.wait_marks(proc, marks, 1, 60)
            cpu_first = _group_cpu(proc.pid)[1]
            (last,) = self.wait_marks(proc, marks, 1, 60 + n / 50)
            cpu_last = _group_cpu(proc.pid)[1]
        return {"rate": n / (last - first), "cpu_us": (cpu_last - cpu_first) / n * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.signals", description=__doc__)
    parser.add_argument("-n", type=int, default=20_000, help="no-op tasks per drain (20000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="a celeriac tree to compare with (no receivers)")
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args(argv)
    args.amqp_url, args.io_n, args.cpu_n = "", 0, 0
    variants = [*VARIANTS, *(["baseline"] if args.baseline else [])]
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    r = redis.Redis.from_url(args.redis_url, socket_timeout=10)
    with tempfile.TemporaryDirectory() as tmp:
        bench = SignalBench(python=sys.executable, args=args, r=r, tmp=Path(tmp))
        bench.baseline = args.baseline
        for repeat in range(args.repeats):
            for variant in variants:
                bench.variant = variant
                job = Job("redis", "drain", variant, "celeriac", repeat)
                queue = f"bench-signals-{os.getpid()}-{repeat}-{variants.index(variant)}"
                try:
                    out: dict[str, Any] = bench.drain_cpu(job, queue)
                finally:
                    bench.purge(job, queue)
                rates[variant].append(out["rate"])
                cpu[variant].append(out["cpu_us"])
                print(
                    f"repeat {repeat + 1}: {variant:20} {out['rate']:9,.0f} tasks/s "
                    f"{out['cpu_us']:6.1f} us CPU/task",
                    flush=True,
                )
    print(f"\n{args.n} no-op tasks, celeriac worker -P solo, Redis; {args.repeats} repeats")
    for variant in variants:
        print(
            f"  {variant:20} median {statistics.median(rates[variant]):9,.0f} tasks/s, "
            f"median {statistics.median(cpu[variant]):6.1f} us CPU/task, "
            f"least {min(cpu[variant]):6.1f} us"
        )
    for variant in variants[1:]:
        # Paired: each repeat's variants ran back to back.
        rate = statistics.median(
            a / b for a, b in zip(rates[variant], rates[VARIANTS[0]], strict=True)
        )
        used = statistics.median(a / b for a, b in zip(cpu[variant], cpu[VARIANTS[0]], strict=True))
        print(f"  {variant} / no receiver: rate x{rate:.3f}, CPU per task x{used:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
