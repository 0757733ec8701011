"""celeriac against Celery and the pure-Python queues, on Redis, RabbitMQ and SQLite.

    python -m benches [-n 10000] [--repeats 3] [--brokers redis,amqp] [--peers celery,rq]
                      [--scenarios enqueue,drain] [--json out.json]

Every measurement runs in fresh processes on a fresh queue (or SQLite file) whose name is
unique to it; its keys, queues and files are deleted before and after. Scenarios:

- ``enqueue``: one process sends n no-op tasks, one call per task; the clock stops when
  the broker holds all n (an asynchronous producer is charged for its writes);
- ``drain``: n no-ops queued (not timed) between two sentinel tasks that push the time they
  ran to a Redis list; one worker starts; the clock runs from its start to the second
  sentinel (no task pays for the measurement). Shapes: one process (solo), prefork -c 1,
  prefork -c 2, threads -c 2;
- ``io``: 1,000 tasks of ``time.sleep(0.1)`` (``asyncio.sleep`` for taskiq) with a
  concurrency of 50; each counts itself done (one ``INCR``), the last pushes the time;
- ``roundtrip``: sequential ``delay(i).get()``, p50/p90/p99 (celeriac and Celery);
- ``memory``: PSS and RSS of the worker's processes (``/proc/PID/smaps_rollup``) once it
  is idle and ready, and after it ran n tasks.

Prints a table with ratios to Celery and to the best pure-Python peer, writes the raw
numbers and the machine's facts to ``benches/results/bench-*.json`` and a bar chart next
to it (``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
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

from benches.peers import BROKERS, DISTRIBUTIONS, PEERS, worker_spec  # noqa: E402
from benches.report import print_table, summarize, write_chart  # noqa: E402

SCENARIOS = ("enqueue", "drain", "io", "roundtrip", "memory")
ALL_BROKERS = ("redis", "amqp", "sqlite")
RESULTS_DIR = ROOT / "benches" / "results"
#: drain shapes: label -> (worker mode, concurrency)
DRAIN_SHAPES = {
    "1 process": ("solo", 1),
    "prefork -c 1": ("prefork", 1),
    "prefork -c 2": ("prefork", 2),
    "threads -c 2": ("threads", 2),
}


class BenchError(Exception):
    """A measurement that could not be taken; the run goes on with the others."""


@dataclass(frozen=True)
class Job:
    broker: str
    scenario: str
    shape: str  # "" or a label of DRAIN_SHAPES, or the io / memory shape
    peer: str
    repeat: int
    mode: str = "solo"
    c: int = 1


@dataclass
class Bench:
    python: str
    args: argparse.Namespace
    r: redis.Redis
    tmp: Path
    results: list[dict[str, Any]] = field(default_factory=list)

    # -- plumbing ---------------------------------------------------------------------------

    def env(self, job: Job, queue: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(
            BENCH_BROKER=job.broker,
            BENCH_QUEUE=queue,
            BENCH_REDIS_URL=self.args.redis_url,
            BENCH_AMQP_URL=self.args.amqp_url,
            BENCH_SQLITE=str(self.tmp / f"{queue}.sqlite3"),
        )
        if job.peer in ("celeriac", "celery"):
            env["BENCH_IMPL"] = job.peer
        return env

    def purge(self, job: Job, queue: str) -> None:
        """Delete everything named after the queue: Redis keys, RabbitMQ queues, files."""
        keys = list(self.r.scan_iter(match=f"*{queue}*", count=1000))
        if keys:
            self.r.delete(*keys)
        for binding in ("_kombu.binding.celery.pidbox", "_kombu.binding_permanent.celery.pidbox"):
            members = [m for m in self.r.smembers(binding) if queue.encode() in m]
            if members:
                self.r.srem(binding, *members)
        for path in self.tmp.glob(f"{queue}*"):
            path.unlink(missing_ok=True)
        if job.broker == "amqp":
            _amqp_delete(self.args.amqp_url, [queue, f"{queue}.DQ", f"{queue}.XQ"])

    def client(self, job: Job, queue: str, *args: str, timeout: float) -> dict[str, Any]:
        cmd = [self.python, "-m", "benches.client", job.peer, *args]
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=self.env(job, queue), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=timeout, check=False,
            )  # fmt: skip
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
            raise BenchError(f"client printed no result:\n{_tail(proc.stdout)}") from exc
        return result

    @contextlib.contextmanager
    def worker(self, job: Job, queue: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
        spec = worker_spec(job.peer, self.python, queue, job.mode, job.c, job.broker)
        if spec is None:
            raise BenchError(f"{job.peer} has no {job.mode} mode")
        argv = [self.args.redis_url if a == "$REDIS_URL" else a for a in spec.argv]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env(job, queue), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: children too
            )  # fmt: skip
            try:
                yield proc, spec.settings
            except BenchError as exc:
                log.seek(0)
                raise BenchError(f"{exc}\nworker log:\n{_tail(log.read().decode())}") from exc
            finally:
                _stop(proc)

    def wait_marks(
        self, proc: subprocess.Popen[bytes], key: str, count: int, timeout: float
    ) -> list[float]:
        times: list[float] = []
        deadline = time.monotonic() + timeout
        while len(times) < count:
            item = self.r.blpop([key], timeout=1)
            if item is not None:
                times.append(float(item[1]))
            elif proc.poll() is not None:
                raise BenchError(f"worker exited with code {proc.returncode}")
            elif time.monotonic() > deadline:
                raise BenchError(f"not done in {timeout:.0f}s ({len(times)} sentinels seen)")
        return times

    # -- measurements -----------------------------------------------------------------------

    def enqueue(self, job: Job, queue: str) -> dict[str, Any]:
        n = self.args.n
        return self.client(job, queue, "enqueue", "-n", str(n), timeout=60 + n / 100)

    def drain(self, job: Job, queue: str, kind: str = "noop") -> dict[str, Any]:
        n = self.args.io_n if kind == "io" else self.args.n
        marks = f"{queue}:marks"
        self.client(job, queue, "fill", "-n", str(n), "--marks", marks, "--kind", kind,
                    timeout=60 + n / 100)  # fmt: skip
        t_start = time.time()
        with self.worker(job, queue) as (proc, settings):
            first, last = self.wait_marks(proc, marks, 2, 60 + n / 50)
        out = {
            "n": n, "settings": settings, "seconds": last - t_start,
            "startup_seconds": first - t_start, "run_seconds": last - first,
            "rate": n / (last - first),
        }  # fmt: skip
        if kind == "io":
            out["ideal_seconds"] = n * 0.1 / job.c
            out["efficiency"] = out["ideal_seconds"] / out["run_seconds"]
        return out

    def io(self, job: Job, queue: str) -> dict[str, Any]:
        return self.drain(job, queue, kind="io")

    def roundtrip(self, job: Job, queue: str) -> dict[str, Any]:
        calls = self.args.calls
        with self.worker(job, queue) as (proc, settings):
            out = self.client(job, queue, "roundtrip", "-n", str(calls), timeout=120 + calls)
            if proc.poll() is not None:
                raise BenchError(f"worker exited with code {proc.returncode}")
        lat = out.pop("latencies_ms")
        q = statistics.quantiles(lat, n=1000, method="inclusive")
        out.update(
            settings=settings, p50_ms=q[499], p90_ms=q[899], p99_ms=q[989],
            mean_ms=statistics.fmean(lat), max_ms=max(lat),
        )  # fmt: skip
        return out

    def memory(self, job: Job, queue: str) -> dict[str, Any]:
        n = self.args.mem_n
        marks = f"{queue}:marks"
        with self.worker(job, queue) as (proc, settings):
            self.client(job, queue, "mark", "--marks", marks, timeout=60)
            self.wait_marks(proc, marks, 1, 60)
            time.sleep(1.0)  # let start-up finish (prefork children, consumers)
            idle = _group_memory(proc.pid)
            self.client(job, queue, "fill", "-n", str(n), "--marks", marks, "--no-wait",
                        timeout=60 + n / 100)  # fmt: skip
            self.wait_marks(proc, marks, 2, 60 + n / 50)
            time.sleep(0.5)
            after = _group_memory(proc.pid)
        return {
            "n": n, "settings": settings, "idle": idle, "after": after,
            "idle_pss_mb": idle["pss_kb"] / 1024, "after_pss_mb": after["pss_kb"] / 1024,
            "idle_rss_mb": idle["rss_kb"] / 1024, "after_rss_mb": after["rss_kb"] / 1024,
            "processes": len(after["processes"]),
            "max_process_pss_mb": max(p["pss_kb"] for p in after["processes"]) / 1024,
        }  # fmt: skip

    def measure(self, job: Job) -> dict[str, Any]:
        queue = f"bench_{job.peer}_{job.scenario}_{uuid.uuid4().hex[:10]}"
        record: dict[str, Any] = {
            "broker": job.broker, "scenario": job.scenario, "shape": job.shape,
            "peer": job.peer, "repeat": job.repeat, "mode": job.mode, "c": job.c,
        }  # fmt: skip
        t0 = time.monotonic()
        self.purge(job, queue)
        try:
            record.update(getattr(self, job.scenario)(job, queue), ok=True)
        except (BenchError, redis.RedisError, OSError) as exc:
            record.update(ok=False, error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                self.purge(job, queue)
        record["wall_seconds"] = time.monotonic() - t0
        self.results.append(record)
        return record


# -- helpers ---------------------------------------------------------------------------------


def _amqp_delete(url: str, queues: list[str]) -> None:
    import amqp  # type: ignore[import-untyped]

    rest = url.split("://", 1)[1]
    creds, _, hostpart = rest.rpartition("@")
    user, _, password = creds.partition(":")
    with amqp.Connection(
        host=hostpart.split("/")[0], userid=user or "guest", password=password or "guest"
    ) as conn:
        conn.connect()
        for name in queues:
            ch = conn.channel()
            with contextlib.suppress(amqp.exceptions.AMQPError):
                ch.queue_delete(name)
            ch = conn.channel() if not ch.is_open else ch
            with contextlib.suppress(amqp.exceptions.AMQPError):
                ch.exchange_delete(name)


def _group_memory(pgid: int) -> dict[str, Any]:
    """PSS and RSS (kB) of every process in the process group ``pgid`` (the worker's)."""
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid:  # field 5: pgrp
                continue
            rollup = (entry / "smaps_rollup").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except (OSError, ValueError):
            continue
        mem = {"pid": int(entry.name), "cmd": cmd.strip()}
        for line in rollup.splitlines():
            key, _, value = line.partition(":")
            if key in ("Pss", "Rss", "Pss_Anon", "Private_Dirty"):
                mem[key.lower() + "_kb"] = int(value.split()[0])
        procs.append(mem)
    return {
        "pss_kb": sum(p.get("pss_kb", 0) for p in procs),
        "rss_kb": sum(p.get("rss_kb", 0) for p in procs),
        "processes": procs,
    }


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL to the worker's own process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group we created
    proc.wait(timeout=15)


def _brief(rec: dict[str, Any]) -> str:
    if not rec["ok"]:
        return "FAILED: " + str(rec["error"]).splitlines()[0]
    scen = rec["scenario"]
    if scen == "enqueue":
        return f"{rec['rate']:>10,.0f} tasks/s"
    if scen in ("drain", "io"):
        extra = f", {rec['efficiency']:.0%} of ideal" if scen == "io" else ""
        return (
            f"{rec['rate']:>10,.0f} tasks/s after start-up ({rec['startup_seconds']:.2f} s){extra}"
        )
    if scen == "memory":
        return (
            f"PSS idle {rec['idle_pss_mb']:.1f} MB, after {rec['n']:,} tasks "
            f"{rec['after_pss_mb']:.1f} MB ({rec['processes']} processes)"
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
    rabbit = None
    if shutil.which("rabbitmqctl"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True,
                                 text=True, timeout=20, check=False)  # fmt: skip
            rabbit = out.stdout.strip() or None
    dists = ["celeriac", "celery", "kombu", "amqp", "redis", "billiard", "dramatiq", "pika",
             "rq", "huey", "taskiq", "taskiq-redis"]  # fmt: skip
    import sqlite3

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
        "versions": {d: _version(d) for d in dists},
        "redis_server": r.info("server").get("redis_version"),
        "rabbitmq_server": rabbit,
        "sqlite": sqlite3.sqlite_version,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _probe(python: str, code: str) -> str | None:
    """None if ``code`` runs in a fresh interpreter, else its last error line."""
    proc = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["?"])[-1]


def available_peers(python: str, wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    modules = {"celeriac": "celeriac._core", "celery": "celery", "dramatiq": "dramatiq",
               "rq": "rq", "huey": "huey", "taskiq": "taskiq_redis"}  # fmt: skip
    ok, skipped = [], {}
    for peer in wanted:
        problem = _probe(python, f"import {modules[peer]}")
        if problem is None:
            ok.append(peer)
        else:
            hint = "`make dev`" if peer == "celeriac" else "`pip install -e .[bench]`"
            skipped[peer] = f"not importable ({problem}); {hint}"
    return ok, skipped


def amqp_up(url: str) -> str | None:
    try:
        _amqp_delete(url, [f"bench_probe_{uuid.uuid4().hex[:8]}"])
    except Exception as exc:
        return f"RabbitMQ at {url.rpartition('@')[2]} is not reachable ({exc})"
    return None


# -- the plan --------------------------------------------------------------------------------


def plan(args: argparse.Namespace, peers: list[str], brokers: list[str]) -> list[Job]:
    """Every measurement of the run, in order: repeat by repeat, scenario by scenario, the
    peers alternating their order between repeats to spread any drift."""
    jobs: list[Job] = []
    for rep in range(args.repeats):
        order = peers if rep % 2 == 0 else peers[::-1]
        for broker in brokers:
            on = [p for p in order if broker in BROKERS[p]]
            for scenario in args.scenarios:
                if scenario == "enqueue":
                    jobs += [Job(broker, "enqueue", "", p, rep) for p in on]
                elif scenario == "drain":
                    for label, (mode, c) in DRAIN_SHAPES.items():
                        if label != "1 process" and (
                            broker != "redis" or rep >= args.extra_repeats
                        ):
                            continue
                        if args.no_prefork and mode == "prefork":
                            continue
                        jobs += [
                            Job(broker, "drain", label, p, rep, mode, c)
                            for p in on
                            if worker_spec(p, "python", "q", mode, c, broker) is not None
                            and (label != "prefork -c 1" or p in ("celeriac", "celery"))
                        ]
                elif scenario == "io":
                    if broker != "redis" or rep >= args.extra_repeats:
                        continue
                    for mode in ("threads", "prefork", "async"):
                        if args.no_prefork and mode == "prefork":
                            continue
                        label = f"{mode} -c {args.io_c}"
                        jobs += [
                            Job(broker, "io", label, p, rep, mode, args.io_c)
                            for p in on
                            if worker_spec(p, "python", "q", mode, args.io_c, broker) is not None
                            and (mode != "prefork" or p in ("celeriac", "celery"))
                        ]
                elif scenario == "roundtrip":
                    jobs += [
                        Job(broker, "roundtrip", "", p, rep)
                        for p in on
                        if p in ("celeriac", "celery")
                    ]
                elif scenario == "memory":
                    if broker != "redis" or rep >= args.extra_repeats:
                        continue
                    jobs += [Job(broker, "memory", "1 process", p, rep) for p in on]
                    if not args.no_prefork:
                        jobs += [
                            Job(broker, "memory", "prefork -c 1", p, rep, "prefork", 1)
                            for p in on
                            if p in ("celeriac", "celery")
                        ]
    return jobs


# -- main ------------------------------------------------------------------------------------


def _csv(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benches",
        description="celeriac against Celery and pure-Python task queues.",
    )
    p.add_argument("-n", type=int, default=10_000, help="tasks for enqueue and drain (10000)")
    p.add_argument("--calls", type=int, default=2_000, help="round-trip calls (2000)")
    p.add_argument("--io-n", type=int, default=1_000, help="I/O-bound tasks (1000)")
    p.add_argument("--io-c", type=int, default=50, help="I/O-bound concurrency (50)")
    p.add_argument("--mem-n", type=int, default=10_000, help="tasks before the memory reading")
    p.add_argument("--repeats", type=int, default=2, help="repeats of the main cells (2)")
    p.add_argument(
        "--extra-repeats", type=int, default=1,
        help="repeats of the -c 2, io and memory cells (1)",
    )  # fmt: skip
    p.add_argument("--peers", type=_csv(PEERS), default=list(PEERS),
                   help=f"comma-separated ({','.join(PEERS)})")  # fmt: skip
    p.add_argument("--brokers", type=_csv(ALL_BROKERS), default=list(ALL_BROKERS),
                   help="comma-separated (redis,amqp,sqlite)")  # fmt: skip
    p.add_argument("--scenarios", type=_csv(SCENARIOS), default=list(SCENARIOS),
                   help=f"comma-separated ({','.join(SCENARIOS)})")  # fmt: skip
    p.add_argument("--only", action="append", choices=SCENARIOS, help=argparse.SUPPRESS)
    p.add_argument("--impl", action="append", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--no-prefork", action="store_true", help="skip the prefork cells")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    amqp_url = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    p.add_argument("--redis-url", default=redis_url, help="Redis (broker, results, sentinels)")
    p.add_argument("--amqp-url", default=amqp_url, help="RabbitMQ (guest/guest on localhost)")
    p.add_argument("--json", type=Path, help="where to write the raw results")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    args = p.parse_args(argv)
    if args.only:  # the first version's options
        args.scenarios = args.only
    if args.impl:
        args.peers = args.impl
    if min(args.n, args.io_n, args.mem_n, args.io_c, args.repeats) < 1 or args.calls < 10:
        p.error("need -n, --io-n, --mem-n, --io-c, --repeats >= 1 and --calls >= 10")
    if args.extra_repeats < 0:
        p.error("need --extra-repeats >= 0 (0: no -c 2, io and memory cells)")
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
    peers, skipped = available_peers(python, args.peers)
    for peer, why in skipped.items():
        print(f"note: skipping {peer}: {why}")
    brokers = list(args.brokers)
    if "amqp" in brokers and (problem := amqp_up(args.amqp_url)):
        print(f"note: skipping RabbitMQ: {problem}")
        skipped["amqp"] = problem
        brokers.remove("amqp")
    if not peers:
        print("nothing to measure", file=sys.stderr)
        return 2

    facts = machine_facts(r, python)
    v = facts["versions"]
    print(
        f"{facts['cpu_count']} cores ({facts['cpu_model']}), Python {facts['python']}, "
        f"Redis {facts['redis_server']}, RabbitMQ {facts['rabbitmq_server']}, "
        f"SQLite {facts['sqlite']}\n" + ", ".join(f"{p} {v[DISTRIBUTIONS[p]]}" for p in peers)
    )
    jobs = plan(args, peers, brokers)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="celeriac-bench-") as tmp:
        bench = Bench(python=python, args=args, r=r, tmp=Path(tmp))
        for i, job in enumerate(jobs, 1):
            elapsed = time.time() - started
            bar = _bar(i - 1, len(jobs))
            print(f"{bar} {i:>3}/{len(jobs)} {elapsed / 60:4.1f} min  ", end="", flush=True)
            rec = bench.measure(job)
            cell = f"{job.broker:<6} {job.scenario:<9} {job.shape:<14} {job.peer:<9}"
            print(f"{cell} {_brief(rec)}", flush=True)
    rows = summarize(bench.results)
    print_table(rows, bench.results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.json or RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {
        "started": started,
        "duration_seconds": time.time() - started,
        "command": " ".join(["python -m benches", *(argv if argv is not None else sys.argv[1:])]),
        "params": params,
        "peers": peers,
        "brokers": brokers,
        "skipped": skipped,
        "machine": facts,
        "summary": rows,
        "runs": bench.results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nraw results: {out}")
    if not args.no_chart:
        png = out.with_suffix(".png")
        problem = write_chart(rows, png, facts)
        print(f"chart: {png}" if problem is None else f"no chart: {problem}")
    print(f"took {(time.time() - started) / 60:.1f} min")
    failed = [rec for rec in bench.results if not rec["ok"]]
    if failed:
        print(f"{len(failed)} measurement(s) failed", file=sys.stderr)
        return 1
    return 0


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


if __name__ == "__main__":
    raise SystemExit(main())
