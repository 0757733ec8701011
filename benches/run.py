"""celeriac against Celery on the same Redis, in one run.

    python -m benches [-n 20000] [--calls 2000] [--repeats 3] [--only drain] [--impl celery]

Scenarios (each measurement runs in fresh processes, on a fresh queue name, after the
queue's keys are deleted):

- ``enqueue``: one process calls ``noop.delay()`` n times; the clock stops when Redis holds
  all n messages (so an asynchronous producer is charged for its writes).
- ``drain``: n no-op tasks are queued (not timed) between two sentinel tasks that push the
  time they ran to a Redis list; one worker process is started and the clock runs from its
  start to the second sentinel. No task pays for the measurement.
- ``roundtrip``: one worker; ``echo.delay(i).get()`` called one after the other, results
  through the Redis result backend; p50/p90/p99 of the latency.

Prints a table and writes raw numbers and machine facts to ``benches/results/*.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python benches/run.py`
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

SCENARIOS = ("enqueue", "drain", "roundtrip")
IMPLS = ("celeriac", "celery")
RESULTS_DIR = ROOT / "benches" / "results"


class BenchError(Exception):
    """A measurement that could not be taken; the run goes on with the others."""


@dataclass
class Bench:
    python: str
    redis_url: str
    r: redis.Redis
    results: list[dict[str, Any]] = field(default_factory=list)

    # -- plumbing ---------------------------------------------------------------------------

    def env(self, impl: str, queue: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["BENCH_IMPL"] = impl
        env["BENCH_QUEUE"] = queue
        env["BENCH_REDIS_URL"] = self.redis_url
        return env

    def purge(self, queue: str) -> None:
        """Delete the queue, its priority sub-lists, its bindings and its sentinel list."""
        keys = list(self.r.scan_iter(match=f"{queue}*", count=1000))
        keys += [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        self.r.delete(*keys)
        # A Celery worker binds its remote-control mailbox, named after its node name.
        for binding in ("_kombu.binding.celery.pidbox", "_kombu.binding_permanent.celery.pidbox"):
            members = [m for m in self.r.smembers(binding) if queue.encode() in m]
            if members:
                self.r.srem(binding, *members)

    def client(self, impl: str, queue: str, *args: str, timeout: float) -> dict[str, Any]:
        cmd = [self.python, "-m", "benches.client", *args]
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=self.env(impl, queue),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"client {' '.join(args)} timed out after {timeout:.0f}s") from exc
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise BenchError(
                f"client {' '.join(args)} exited {proc.returncode}:\n"
                + _tail(proc.stdout + proc.stderr)
            )
        try:
            result: dict[str, Any] = json.loads(lines[-1])
        except ValueError as exc:
            raise BenchError(
                f"client {' '.join(args)} printed no result:\n{_tail(proc.stdout)}"
            ) from exc
        return result

    def worker_cmd(self, impl: str, queue: str, pool: str) -> list[str]:
        if impl == "celeriac":
            return [
                self.python, "-m", "celeriac", "-A", "benches.app", "worker",
                "-P", pool, "-c", "1", "-Q", queue, "-l", "warning",
            ]  # fmt: skip
        # Celery's cluster features that celeriac does not have are switched off: they cost
        # start-up time (mingle waits for replies), not per-task time.
        return [
            self.python, "-m", "celery", "-A", "benches.app", "worker",
            "--pool", pool, "--concurrency", "1", "-Q", queue, "-l", "warning",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{queue}@%h",
        ]  # fmt: skip

    @contextlib.contextmanager
    def worker(self, impl: str, queue: str, pool: str) -> Iterator[subprocess.Popen[bytes]]:
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                self.worker_cmd(impl, queue, pool),
                cwd=ROOT,
                env=self.env(impl, queue),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: prefork children too
            )
            try:
                yield proc
            except BenchError as exc:
                log.seek(0)
                raise BenchError(f"{exc}\nworker log:\n{_tail(log.read().decode())}") from exc
            finally:
                _stop(proc)

    # -- measurements -----------------------------------------------------------------------

    def enqueue(self, impl: str, n: int) -> dict[str, Any]:
        queue = _queue_name(impl, "enqueue")
        self.purge(queue)
        try:
            out = self.client(impl, queue, "enqueue", "-n", str(n), timeout=60 + n / 100)
        finally:
            self.purge(queue)
        return out

    def drain(self, impl: str, n: int, pool: str) -> dict[str, Any]:
        queue = _queue_name(impl, "drain")
        marks = f"{queue}:marks"
        self.purge(queue)
        try:
            self.client(
                impl, queue, "fill", "-n", str(n), "--marks-key", marks, timeout=60 + n / 100
            )
            times: list[float] = []
            deadline = time.monotonic() + 60 + n / 100
            t_start = time.time()
            with self.worker(impl, queue, pool) as proc:
                while len(times) < 2:
                    item = self.r.blpop([marks], timeout=1)
                    if item is not None:
                        times.append(float(item[1]))
                    elif proc.poll() is not None:
                        raise BenchError(f"worker exited with code {proc.returncode}")
                    elif time.monotonic() > deadline:
                        raise BenchError(f"drain not done in time ({len(times)} sentinels seen)")
            left = int(self.r.llen(queue))
        finally:
            self.purge(queue)
        if left:
            raise BenchError(f"{left} messages left in the queue after the last sentinel")
        first, last = times
        return {
            "n": n,
            "pool": pool,
            "seconds": last - t_start,
            "startup_seconds": first - t_start,
            "rate_after_first": n / (last - first),
        }

    def roundtrip(self, impl: str, calls: int) -> dict[str, Any]:
        queue = _queue_name(impl, "roundtrip")
        self.purge(queue)
        try:
            with self.worker(impl, queue, "solo") as proc:
                out = self.client(impl, queue, "roundtrip", "-n", str(calls), timeout=120 + calls)
                if proc.poll() is not None:
                    raise BenchError(f"worker exited with code {proc.returncode}")
        finally:
            self.purge(queue)
        lat = out["latencies_ms"]
        q = statistics.quantiles(lat, n=100, method="inclusive")
        out.update(p50_ms=q[49], p90_ms=q[89], p99_ms=q[98], mean_ms=statistics.fmean(lat))
        return out

    def measure(self, impl: str, scenario: str, repeat: int, **kw: Any) -> None:
        label = f"{scenario}{'/' + kw['pool'] if 'pool' in kw else ''}"
        record: dict[str, Any] = {"impl": impl, "scenario": label, "repeat": repeat}
        t0 = time.monotonic()
        try:
            record.update(getattr(self, scenario)(impl, **kw), ok=True)
            print(f"  {label:<16} {impl:<9} {_brief(record)}", flush=True)
        except (BenchError, redis.RedisError) as exc:
            record.update(ok=False, error=str(exc))
            print(f"  {label:<16} {impl:<9} FAILED: {exc}", flush=True)
        record["wall_seconds"] = time.monotonic() - t0
        self.results.append(record)


# -- helpers ---------------------------------------------------------------------------------


def _queue_name(impl: str, scenario: str) -> str:
    return f"bench-{impl}-{scenario}-{uuid.uuid4().hex[:10]}"


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL to the worker's own process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group we created
    proc.wait(timeout=15)


def _brief(rec: dict[str, Any]) -> str:
    scen = rec["scenario"]
    if scen == "enqueue":
        return f"{rec['rate']:>12,.0f} tasks/s"
    if scen.startswith("drain"):
        return (
            f"{rec['seconds']:>8.2f} s  (start-up {rec['startup_seconds']:.2f} s, "
            f"{rec['rate_after_first']:,.0f} tasks/s after it)"
        )
    return f"p50 {rec['p50_ms']:.3f} ms  p90 {rec['p90_ms']:.3f} ms  p99 {rec['p99_ms']:.3f} ms"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_facts(r: redis.Redis, python: str) -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_total = Path("/proc/meminfo").read_text().splitlines()[0].split()[1] + " kB"
    server = r.info("server")
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "mem_total": mem_total,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "python_executable": python,
        "versions": {d: _version(d) for d in ("celeriac", "celery", "kombu", "redis", "billiard")},
        "redis_server": server.get("redis_version"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def celeriac_pools(python: str) -> list[str]:
    """The pools celeriac's worker offers (its command line's choices)."""
    probe = "from celeriac.cli import POOL_CHOICES; print(' '.join(POOL_CHOICES))"
    proc = subprocess.run(
        [python, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    return proc.stdout.split() if proc.returncode == 0 else ["solo"]


def celeriac_problem(python: str) -> str | None:
    """Why celeriac cannot be benchmarked (not built, not importable), or None."""
    probe = "import celeriac, celeriac._core; celeriac.Celery"
    proc = subprocess.run(
        [python, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return f"celeriac is not importable ({last}); build it with `make dev`"


# -- report ----------------------------------------------------------------------------------

# (scenario, metric key, label, higher is better)
METRICS = [
    ("enqueue", "rate", "tasks/s", True),
    ("drain/solo", "seconds", "total s", False),
    ("drain/solo", "startup_seconds", "start-up s", False),
    ("drain/solo", "rate_after_first", "tasks/s after start-up", True),
    ("roundtrip", "p50_ms", "p50 ms", False),
    ("roundtrip", "p90_ms", "p90 ms", False),
    ("roundtrip", "p99_ms", "p99 ms", False),
]


def _median(results: list[dict[str, Any]], impl: str, scenario: str, key: str) -> float | None:
    values = [
        r[key] for r in results if r["impl"] == impl and r["scenario"] == scenario and r["ok"]
    ]
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def summarize(results: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    titles = {
        "enqueue": f"enqueue {args.n:,} (delay)",
        "drain/solo": f"drain {args.n:,}, solo pool",
        "roundtrip": f"round trip x{args.calls:,}",
    }
    rows = []
    for scenario, key, label, higher in METRICS:
        a = _median(results, "celeriac", scenario, key)
        b = _median(results, "celery", scenario, key)
        ratio = None
        if a and b:
            ratio = a / b if higher else b / a
        rows.append(
            {"scenario": titles[scenario], "metric": label, "celeriac": a, "celery": b,
             "speedup": ratio, "comparison": "celeriac vs Celery"}
        )  # fmt: skip
    # Celery's default pool, prefork with one child; measured in the first repeat only.
    b = _median(results, "celery", "drain/prefork", "seconds")
    if b is not None:
        a = _median(results, "celeriac", "drain/prefork", "seconds")
        versus = "prefork -c 1"
        if a is None:  # a celeriac without a prefork pool: compare its solo pool
            a = _median(results, "celeriac", "drain/solo", "seconds")
            versus = "solo"
        rows.append(
            {"scenario": f"drain {args.n:,}, prefork -c 1", "metric": "total s",
             "celeriac": a, "celery": b, "speedup": b / a if a else None,
             "comparison": f"celeriac {versus} vs Celery prefork -c 1"}
        )  # fmt: skip
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("scenario", "metric", "celeriac", "Celery", "speed-up")
    body = [
        (
            r["scenario"],
            r["metric"],
            _fmt(r["celeriac"]),
            _fmt(r["celery"]),
            f"{r['speedup']:.2f}x" if r["speedup"] else "n/a",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print()
    for i, row in enumerate([header, *body]):
        cells = [
            c.ljust(w) if j < 2 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if i == 0:
            print(line)
    print(
        "\nspeed-up: how many times faster celeriac is (higher is better); medians of the "
        "repeats.\nprefork -c 1: the first repeat only."
    )
    for r in rows:
        if "celeriac solo" in r["comparison"]:
            print(f"{r['scenario']}: {r['comparison']} (this celeriac has no prefork pool)")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benches", description="celeriac vs Celery on the same Redis."
    )
    p.add_argument("-n", type=int, default=20_000, help="tasks for enqueue and drain (20000)")
    p.add_argument("--calls", type=int, default=2_000, help="round-trip calls (2000)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per cell (3)")
    p.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (may be repeated)",
    )
    p.add_argument(
        "--impl", action="append", choices=IMPLS, help="only this implementation (may be repeated)"
    )
    p.add_argument(
        "--no-prefork",
        action="store_true",
        help="skip the prefork -c 1 drains (run in the first repeat)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="broker and result backend for both (redis://127.0.0.1:6379/0)",
    )
    p.add_argument("--json", type=Path, help="where to write the raw results")
    args = p.parse_args(argv)
    if args.n < 1 or args.calls < 10 or args.repeats < 1:
        p.error("need -n >= 1, --calls >= 10 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = sys.executable
    r = redis.Redis.from_url(args.redis_url, socket_timeout=10)
    try:
        r.ping()
    except redis.RedisError as exc:
        print(f"Redis at {args.redis_url} is not reachable: {exc}", file=sys.stderr)
        return 2

    scenarios = args.only or list(SCENARIOS)
    impls = args.impl or list(IMPLS)
    skipped: dict[str, str] = {}
    if "celeriac" in impls and (problem := celeriac_problem(python)):
        if args.impl:
            print(problem, file=sys.stderr)
            return 2
        skipped["celeriac"] = problem
        impls.remove("celeriac")
        print(f"note: {problem}; measuring Celery alone\n")

    pools = {"celery": ["solo", "prefork"], "celeriac": celeriac_pools(python)}
    bench = Bench(python=python, redis_url=args.redis_url, r=r)
    facts = machine_facts(r, python)
    print(
        f"{facts['cpu_count']} cores ({facts['cpu_model']}), Python {facts['python']}, "
        f"Redis {facts['redis_server']}, Celery {facts['versions']['celery']}, "
        f"celeriac {facts['versions']['celeriac']}"
    )
    started = time.time()
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}")
        order = impls if rep % 2 == 0 else impls[::-1]  # alternate to spread any drift
        for scenario in scenarios:
            for impl in order:
                if scenario == "enqueue":
                    bench.measure(impl, "enqueue", rep, n=args.n)
                elif scenario == "drain":
                    bench.measure(impl, "drain", rep, n=args.n, pool="solo")
                    # Celery's prefork pool is slow to drain: measured in the first repeat only.
                    if rep == 0 and not args.no_prefork and "prefork" in pools[impl]:
                        bench.measure(impl, "drain", rep, n=args.n, pool="prefork")
                else:
                    bench.measure(impl, "roundtrip", rep, calls=args.calls)

    rows = summarize(bench.results, args)
    print_table(rows)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.json or RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {
        "started": started,
        "duration_seconds": time.time() - started,
        "params": {
            "n": args.n, "calls": args.calls, "repeats": args.repeats, "scenarios": scenarios,
            "impls": impls, "skipped": skipped, "redis_url": args.redis_url, "pools": pools,
            "celery_worker_flags": "--without-gossip --without-mingle --without-heartbeat",
        },
        "machine": facts,
        "summary": rows,
        "runs": bench.results,
    }  # fmt: skip
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nraw results: {out}")
    failed = [rec for rec in bench.results if not rec["ok"]]
    if failed:
        print(f"{len(failed)} measurement(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
