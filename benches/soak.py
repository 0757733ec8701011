"""The soak: does one worker's memory stay flat over a million tasks?

    python -m benches --scenarios soak [--soak-n 1000000] [--soak-shapes solo,prefork]

Not in the default run (it takes minutes). One celeriac worker on Redis runs ``--soak-n``
no-op tasks (1,000,000); a feeder process sends them in batches of ``FEED_CHUNK`` whenever
the queue holds fewer than ``FEED_HIGH_WATER``, so Redis never holds the million at once.
Every ``SAMPLE_EVERY`` seconds the PSS of the worker's processes (``/proc/PID/smaps_rollup``,
summed over the process group: a prefork worker and its child) is sampled with the number of
tasks done so far.

The check is on the worker's own PSS: its anonymous and shared-memory pages (``Pss_Anon`` +
``Pss_Shmem``), where a leak grows. The rest of PSS is file pages (the Python binary, the
extension, libc) divided among every process on the machine that maps them at that moment,
so it moves when unrelated processes start or exit (the feeder stays up to the last sample
for that reason); the total is reported beside it. After the warm-up (the first
``WARMUP_SHARE`` of the tasks) every sample must stay within ``FLAT_WITHIN`` of the first one
after it; the cell fails with its figures if not (``python -m benches`` then exits 1).
"""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benches.plan import Job
    from benches.run import Bench

#: The no-op tasks of the soak.
SOAK_N = 1_000_000
#: Shapes of the worker (``--soak-shapes``): worker mode -> the table's label.
SOAK_SHAPES = {"solo": "1 process", "prefork": "prefork -c 1"}
#: The tasks of the warm-up (allocator arenas, caches, the prefetch window filling up).
WARMUP_SHARE = 0.1
#: After the warm-up, the worker's own PSS stays within this share of its first reading.
FLAT_WITHIN = 0.05
SAMPLE_EVERY = 1.0
FEED_CHUNK = 10_000
FEED_HIGH_WATER = 20_000


def soak(bench: Bench, job: Job, queue: str) -> dict[str, Any]:
    from benches.run import ROOT, BenchError, _group_memory

    n = bench.args.soak_n
    marks, sent_key = f"{queue}:marks", f"{queue}:sent"
    r = bench.r
    with bench.worker(job, queue) as (proc, settings):
        bench.client(job, queue, "mark", "--marks", marks, timeout=60)
        bench.wait_marks(proc, marks, 1, 60)
        idle = _sample(_group_memory(proc.pid), 0.0, 0)
        feeder = subprocess.Popen(
            [bench.python, "-m", "benches.client", job.peer, "feed", "-n", str(n),
             "--marks", marks, "--progress", sent_key, "--chunk", str(FEED_CHUNK),
             "--high-water", str(FEED_HIGH_WATER)],
            cwd=ROOT, env=bench.env(job, queue), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        deadline = started + 600 + n / 500
        try:
            while True:
                done = r.blpop([marks], timeout=SAMPLE_EVERY) is not None
                seconds = time.monotonic() - started
                ran = n if done else int(r.get(sent_key) or 0) - int(r.llen(queue))
                samples.append(_sample(_group_memory(proc.pid), seconds, max(ran, 0)))
                if done:
                    break  # the sentinel sent after the n no-ops ran
                if proc.poll() is not None:
                    raise BenchError(f"worker exited with code {proc.returncode}")
                if feeder.poll() is not None:
                    out = feeder.stdout.read().decode() if feeder.stdout else ""
                    raise BenchError(f"the feeder exited with {feeder.returncode}:\n{out}")
                if seconds > deadline - started:
                    raise BenchError(f"not done in {seconds:.0f}s")
        finally:
            r.rpush(f"{sent_key}:stop", 1)  # the feeder may go now
            r.expire(f"{sent_key}:stop", 600)
            try:
                feeder.wait(30)
            except subprocess.TimeoutExpired:
                feeder.kill()
                feeder.wait(10)
    return verdict(n, settings, samples[-1]["seconds"], idle, samples)


def _sample(mem: dict[str, Any], seconds: float, done: int) -> dict[str, Any]:
    procs = mem["processes"]
    own = sum(p.get("pss_anon_kb", 0) + p.get("pss_shmem_kb", 0) for p in procs)
    return {
        "seconds": seconds, "done": done, "own_pss_kb": own, "pss_kb": mem["pss_kb"],
        "rss_kb": mem["rss_kb"], "processes": len(procs),
    }  # fmt: skip


def verdict(
    n: int, settings: str, seconds: float, idle: dict[str, Any], samples: list[dict[str, Any]]
) -> dict[str, Any]:
    """The figures; BenchError (naming them) when the worker's own PSS was not flat after
    the warm-up."""
    from benches.run import BenchError

    after = [s for s in samples if s["done"] >= n * WARMUP_SHARE]
    if len(after) < 3:
        raise BenchError(
            f"only {len(after)} PSS samples after the warm-up ({len(samples)} in all): "
            "too few to tell; give more tasks (--soak-n)"
        )
    base, last = after[0], after[-1]
    high = max(s["own_pss_kb"] for s in after)
    low = min(s["own_pss_kb"] for s in after)
    drift = max(high - base["own_pss_kb"], base["own_pss_kb"] - low) / base["own_pss_kb"]
    mb = 1 / 1024
    out = {
        "n": n, "settings": settings, "run_seconds": seconds, "rate": n / seconds,
        "warmup_tasks": int(n * WARMUP_SHARE), "processes": last["processes"],
        "idle_own_pss_mb": idle["own_pss_kb"] * mb, "idle_pss_mb": idle["pss_kb"] * mb,
        "baseline_own_pss_mb": base["own_pss_kb"] * mb, "baseline_pss_mb": base["pss_kb"] * mb,
        "final_own_pss_mb": last["own_pss_kb"] * mb, "final_pss_mb": last["pss_kb"] * mb,
        "max_own_pss_mb": high * mb, "min_own_pss_mb": low * mb,
        "max_pss_mb": max(s["pss_kb"] for s in after) * mb,
        "min_pss_mb": min(s["pss_kb"] for s in after) * mb,
        "drift_pct": 100 * drift,
        "growth_pct": 100 * (last["own_pss_kb"] - base["own_pss_kb"]) / base["own_pss_kb"],
        "final_rss_mb": last["rss_kb"] * mb, "samples": samples,
    }  # fmt: skip
    if drift > FLAT_WITHIN:
        raise BenchError(
            f"WORKER MEMORY NOT FLAT after the warm-up: its own PSS (anon + shmem) was "
            f"{out['baseline_own_pss_mb']:.1f} MB after {base['done']:,} tasks, then "
            f"between {out['min_own_pss_mb']:.1f} and {out['max_own_pss_mb']:.1f} MB "
            f"({out['drift_pct']:.1f} % > {100 * FLAT_WITHIN:.0f} %), "
            f"{out['final_own_pss_mb']:.1f} MB after {n:,} ({settings})",
            figures=out,
        )
    return out


def brief(rec: dict[str, Any]) -> str:
    return (
        f"own PSS {rec['baseline_own_pss_mb']:.1f} MB after warm-up, "
        f"{rec['final_own_pss_mb']:.1f} MB after {rec['n']:,} (drift {rec['drift_pct']:.1f} %;"
        f" total PSS {rec['baseline_pss_mb']:.1f} -> {rec['final_pss_mb']:.1f} MB), "
        f"{rec['rate']:,.0f} tasks/s"
    )
