"""celeriac against Celery and the pure-Python queues, on Redis, RabbitMQ and SQLite.

    python -m benches [-n 20000] [--repeats 3] [--brokers redis,amqp] [--peers celery,rq]
                      [--scenarios enqueue,drain] [--json out.json]

Every measurement runs in fresh processes on a fresh queue (or SQLite file) whose name is
unique to it; its keys, queues and files are deleted before and after. Scenarios:

- ``enqueue``: one process sends n no-op tasks, one call per task; the clock stops when
  the broker holds all n (an asynchronous producer is charged for its writes); and the
  same through a batch API where there is one (celeriac's ``delay_many``, RQ's
  ``enqueue_many``);
- ``drain``: n no-ops queued (not timed) between two sentinel tasks that push the time they
  ran to a Redis list; one worker starts; the clock runs from its start to the second
  sentinel, and the no-ops' own count must then be n. Shapes: one process (solo), prefork
  -c 1, prefork -c 2, threads -c 2, every peer at its defaults (the headline); then the one
  process at the tuned window (``--prefetch``, 64: Celery's docs advise a high
  ``worker_prefetch_multiplier`` for many short tasks) for the peers that have one, on
  every broker, labelled ``tuned``;
- ``io``: 1,000 tasks of ``time.sleep(0.1)`` (threads, prefork) or ``await
  asyncio.sleep(0.1)`` (async: celeriac's ``async def`` tasks, taskiq) with a concurrency
  of 50, sent to a worker that is up and idle (every prefork child started); each counts
  itself done (one ``INCR``), the last pushes the time;
- ``cpu``: 500 tasks of about 2 ms of hashing each (SHA-256 rounds, calibrated once
  per run in this process), one process and ``-c 2`` processes; counted as ``io`` is;
- ``roundtrip``: sequential ``delay(i).get()``, p50/p90/p99 (nearest-rank percentiles of
  every call, as HdrHistogram reports them; celeriac and Celery);
- ``memory``: PSS and RSS of the worker's processes (``/proc/PID/smaps_rollup``) once it
  is idle and ready, and after it ran 100,000 tasks;
- ``serializer``: celeriac's ``enqueue`` and ``drain`` (1 process) with
  ``task_serializer = "msgpack"`` beside JSON, the same no-ops, in the same run;
- ``mixed``: the migration on Redis: a Celery client sends, a celeriac worker runs (drain
  and round trip through Celery's ``AsyncResult``), against a Celery worker, same client;
- ``soak`` (not in the default run): 1,000,000 no-ops through one celeriac worker on Redis,
  its PSS sampled all along; it must stay flat within 5 % after the warm-up (``soak.py``);
- ``ceiling``: the pure-Rust ceiling (``benches/ceiling.rs``, built once with cargo's
  ``ci`` profile): the crate's own producer and consumer doing the broker work of n
  no-ops with no Python; and ``redis-benchmark -t lpush,rpop`` where it is installed.

Prints a table with ratios to Celery and to the best pure-Python peer, writes the raw
numbers and the machine's facts to ``benches/results/bench-*.json`` and a bar chart next
to it (``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
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

from benches import soak  # noqa: E402
from benches.machine import BUSY_THRESHOLD, QUIET_WAIT, wait_quiet  # noqa: E402
from benches.peers import BEST_PREFETCH, PEERS, worker_spec  # noqa: E402
from benches.peers.common import CPU_SECONDS, IO_SLEEP, calibrate, tally  # noqa: E402
from benches.plan import (  # noqa: E402
    ALL_BROKERS,
    DEFAULT_WINDOW,
    MEM_PEERS,
    MIXED_DRAIN,
    NOT_BY_DEFAULT,
    SCENARIOS,
    UNBOUNDED_CEILING,
    Job,
    plan,
)
from benches.report import (  # noqa: E402
    FORMAT,
    MIN_DRAIN_N,
    MIN_REPEATS,
    ReportError,
    ceiling_summary,
    load,
    machine_lines,
    method_notes,
    render,
    summarize,
    table_block,
    write_chart,
)

RESULTS_DIR = ROOT / "benches" / "results"


class BenchError(Exception):
    """A measurement that could not be taken, or failed its check (``figures``: what it
    measured, kept in the JSON); the run goes on with the others."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


@dataclass
class Bench:
    python: str
    args: argparse.Namespace
    r: redis.Redis
    tmp: Path
    cpu_rounds: int = 0
    ceiling_exe: str | None = None
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
            BENCH_CPU_ROUNDS=str(self.cpu_rounds),
        )
        if job.peer in ("celeriac", "celery"):
            env["BENCH_IMPL"] = job.peer
        if job.scenario == "serializer":
            env["BENCH_SERIALIZER"] = job.shape.split(", ")[1]
        if job.mode == "async" and job.scenario == "io":
            env["BENCH_IO_ASYNC"] = "1"  # celeriac: the async def task
        env["BENCH_COUNTER_DIR"] = str(self.counter_dir(queue))
        return env

    def counter_dir(self, queue: str) -> Path:
        """Where the no-ops of the measurement on ``queue`` count themselves."""
        return self.tmp / "counts" / queue

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
        cmd = [self.python, "-m", "benches.client", job.client_peer or job.peer, *args]
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
        spec = worker_spec(job.peer, self.python, queue, job.mode, job.c, job.broker, job.prefetch)
        if spec is None:
            raise BenchError(f"{job.peer} has no {job.mode} mode")
        argv = [self.args.redis_url if a == "$REDIS_URL" else a for a in spec.argv]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env={**self.env(job, queue), **spec.env},
                stdin=subprocess.DEVNULL,
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
        batch = ["--batch"] if job.shape == "batch API" else []
        return self.client(job, queue, "enqueue", "-n", str(n), *batch, timeout=60 + n / 100)

    def drain(self, job: Job, queue: str, kind: str = "noop") -> dict[str, Any]:
        n = {"io": self.args.io_n, "cpu": self.args.cpu_n}.get(kind, self.args.n)
        marks = f"{queue}:marks"
        counts = self.counter_dir(queue)
        counts.mkdir(parents=True, exist_ok=True)
        # The client returns once the broker holds exactly n + 2 (it fails otherwise).
        self.client(job, queue, "fill", "-n", str(n), "--marks", marks, "--kind", kind,
                    timeout=60 + n / 100)  # fmt: skip
        t_start = time.time()
        with self.worker(job, queue) as (proc, settings):
            # sorted: a worker with several threads (Dramatiq's 8) may run the end
            # sentinel before the first one; the count below then holds the clock
            first, last = sorted(self.wait_marks(proc, marks, 2, 60 + n / 50))
            if kind == "noop":
                at_end, t_counted = wait_count(counts, n, COUNT_GRACE)
                last = max(last, t_counted)  # a slot still running no-ops after the sentinel
                figures = {"n": n, "counted_at_end": at_end, "counted": tally(counts)}
                if figures["counted"] != n:
                    raise BenchError(
                        f"{figures['counted']:,} no-ops ran, not {n:,} (counted after the end "
                        f"sentinel and {COUNT_GRACE:.0f} s of grace)",
                        figures,
                    )
        out = {
            "n": n, "settings": settings, "seconds": last - t_start,
            "startup_seconds": first - t_start, "run_seconds": last - first,
            "rate": n / (last - first),
        }  # fmt: skip
        if kind == "noop":
            out.update(figures)
        if kind in ("io", "cpu"):
            task_seconds = IO_SLEEP if kind == "io" else CPU_SECONDS
            out["ideal_seconds"] = n * task_seconds / job.c
            out["efficiency"] = out["ideal_seconds"] / out["run_seconds"]
        if kind == "cpu":
            out["cpu_rounds"] = self.cpu_rounds
        return out

    def serializer(self, job: Job, queue: str) -> dict[str, Any]:
        """``enqueue`` or ``drain`` with the shape's serializer (see ``env``)."""
        if job.shape.startswith("enqueue"):
            return self.enqueue(job, queue)
        return self.drain(job, queue)

    def io(self, job: Job, queue: str) -> dict[str, Any]:
        """The I/O-bound tasks, sent to a worker that is up and idle: it runs one sentinel,
        then its processes' CPU time must stop growing (every prefork child started); the
        clock runs from the client's first send to the n-th task done."""
        n = self.args.io_n
        marks = f"{queue}:marks"
        t_start = time.time()
        with self.worker(job, queue) as (proc, settings):
            self.client(job, queue, "mark", "--marks", marks, timeout=60)
            self.wait_marks(proc, marks, 1, 60)
            _wait_idle(proc.pid, timeout=60)
            t_ready = time.time()
            self.client(job, queue, "fill", "-n", str(n), "--marks", marks, "--kind", "io",
                        "--no-wait", "--clock", timeout=60 + n / 100)  # fmt: skip
            first, last = self.wait_marks(proc, marks, 2, 60 + n / 50)
        out = {
            "n": n, "settings": settings, "startup_seconds": t_ready - t_start,
            "run_seconds": last - first, "seconds": t_ready - t_start + last - first,
            "rate": n / (last - first), "ideal_seconds": n * IO_SLEEP / job.c,
        }  # fmt: skip
        out["efficiency"] = out["ideal_seconds"] / out["run_seconds"]
        return out

    def mixed(self, job: Job, queue: str) -> dict[str, Any]:
        """The migration: a Celery client sends, a celeriac (or a Celery) worker runs."""
        if job.shape == MIXED_DRAIN:
            return self.drain(job, queue)
        return self.roundtrip(job, queue)

    def cpu(self, job: Job, queue: str) -> dict[str, Any]:
        return self.drain(job, queue, kind="cpu")

    def ceiling(self, job: Job, queue: str) -> dict[str, Any]:
        """The pure-Rust program (job.shape "pure Rust"), or redis-benchmark."""
        if job.shape == "redis-benchmark":
            return _redis_benchmark(self.args.redis_url, self.r)
        if self.ceiling_exe is None:
            raise BenchError("the ceiling program is not built (see the note above)")
        url = self.args.redis_url if job.broker == "redis" else self.args.amqp_url
        n = self.args.n
        # The headline drain's window at -c 1 (the default multiplier), or none at all.
        prefetch = 0 if job.shape == UNBOUNDED_CEILING else DEFAULT_WINDOW
        cmd = [self.ceiling_exe, "--url", url, "-n", str(n), "--queue", queue,
               "--prefetch", str(prefetch)]  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=60 + n / 100, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"the ceiling program timed out after {exc.timeout:.0f}s") from exc
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise BenchError(f"ceiling exited {proc.returncode}:\n{_tail(proc.stderr)}")
        out: dict[str, Any] = json.loads(lines[-1])
        window = f"prefetch {prefetch}" if prefetch else "no prefetch limit"
        out["settings"] = f"benches/ceiling.rs (cargo profile ci), {window}"
        return out

    def roundtrip(self, job: Job, queue: str) -> dict[str, Any]:
        # The mixed scenario's round trips: half as many (the run's time budget).
        calls = self.args.calls if job.scenario != "mixed" else max(10, self.args.calls // 2)
        with self.worker(job, queue) as (proc, settings):
            out = self.client(job, queue, "roundtrip", "-n", str(calls), timeout=120 + calls)
            if proc.poll() is not None:
                raise BenchError(f"worker exited with code {proc.returncode}")
        lat = sorted(out.pop("latencies_ms"))
        out.update(
            settings=settings,
            p50_ms=percentile(lat, 50), p90_ms=percentile(lat, 90),
            p99_ms=percentile(lat, 99), p999_ms=percentile(lat, 99.9),
            mean_ms=statistics.fmean(lat), min_ms=lat[0], max_ms=lat[-1],
            distribution_ms={str(p): percentile(lat, p) for p in PERCENTILES},
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

    def soak(self, job: Job, queue: str) -> dict[str, Any]:
        return soak.soak(self, job, queue)

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
            record.update(getattr(exc, "figures", {}), ok=False, error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                self.purge(job, queue)
        record["wall_seconds"] = time.monotonic() - t0
        self.results.append(record)
        return record


# -- helpers ---------------------------------------------------------------------------------

#: how long the drain waits after its end sentinel for the count to reach n (a worker with
#: several slots may run the sentinel while another slot still runs no-ops)
COUNT_GRACE = 10.0


def wait_count(directory: Path, n: int, grace: float) -> tuple[int, float]:
    """(the count right after the end sentinel, 0.0 if that was n already, else the time
    it was first seen at n or the time the grace ran out); the caller checks the count."""
    at_end = tally(directory)
    if at_end >= n:
        return at_end, 0.0
    count, deadline = at_end, time.monotonic() + grace
    while count < n and time.monotonic() < deadline:
        time.sleep(0.002)
        count = tally(directory)
    return at_end, time.time()


#: the percentiles kept in the JSON for every round-trip run
PERCENTILES = (0, 25, 50, 75, 90, 95, 99, 99.9, 100)


def percentile(ordered: list[float], p: float) -> float:
    """The value at percentile ``p`` of the sorted ``ordered``, as HdrHistogram's
    ``getValueAtPercentile`` defines it (with no bucketing): the smallest recorded value
    that at least ``p`` % of all values are less than or equal to (nearest rank)."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _redis_benchmark(url: str, r: redis.Redis) -> dict[str, Any]:
    """``redis-benchmark -t lpush,rpop``: with one client (one command at a time, the
    bound of a consumer that waits for each reply) and with its default 50 clients."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise BenchError("redis-benchmark is not installed (it ships with redis-server)")
    kw = r.connection_pool.connection_kwargs
    host, port, db = str(kw.get("host", "127.0.0.1")), str(kw.get("port", 6379)), kw.get("db", 0)
    if r.exists("mylist"):
        raise BenchError("Redis already has a key 'mylist' (redis-benchmark's); not touching it")
    out: dict[str, Any] = {"settings": "redis-benchmark -t lpush,rpop -n 50000 -q --csv"}
    try:
        for clients in (1, 50):
            cmd = [exe, "-h", host, "-p", port, "--dbnum", str(db), "-t", "lpush,rpop",
                   "-n", "50000", "-c", str(clients), "-q", "--csv"]  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                      check=False)  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise BenchError("redis-benchmark timed out") from exc
            if proc.returncode != 0:
                raise BenchError(f"redis-benchmark exited {proc.returncode}: {proc.stderr}")
            for line in proc.stdout.splitlines():
                cells = [c.strip('"') for c in line.split(",")]
                if len(cells) >= 2 and cells[0] in ("LPUSH", "RPOP"):
                    with contextlib.suppress(ValueError):
                        out[f"{cells[0].lower()}_c{clients}_rate"] = float(cells[1])
    finally:
        r.delete("mylist")
    if not any(k.endswith("_rate") for k in out):
        raise BenchError("redis-benchmark printed no LPUSH/RPOP figures")
    return out


def build_ceiling() -> tuple[str | None, str | None]:
    """Build ``benches/ceiling.rs`` with cargo's ``ci`` profile: (executable, None) or
    (None, why not). Cargo skips the work when nothing changed."""
    cargo = shutil.which("cargo")
    if cargo is None:
        return None, "cargo is not installed"
    cmd = [cargo, "build", "--profile", "ci", "--bench", "ceiling", "--message-format=json"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                              check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"cargo build failed: {exc}"
    exe = None
    for line in proc.stdout.splitlines():
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "ceiling":
                exe = msg.get("executable") or exe
    if proc.returncode != 0 or exe is None:
        return None, f"cargo build --bench ceiling exited {proc.returncode}:\n{_tail(proc.stderr)}"
    return exe, None


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


def _group_cpu(pgid: int) -> tuple[int, float]:
    """(processes, CPU seconds used so far) of the process group ``pgid``."""
    count, ticks = 0, 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5: pgrp; 14, 15: utime, stime
            count += 1
            ticks += int(fields[11]) + int(fields[12])
    return count, ticks / os.sysconf("SC_CLK_TCK")


def _wait_idle(pgid: int, timeout: float, window: float = 0.5, busy: float = 0.1) -> None:
    """Wait until the worker's processes use under ``busy`` of a core over ``window``
    seconds with their number unchanged: every child forked and done starting."""
    deadline = time.monotonic() + timeout
    before = _group_cpu(pgid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = _group_cpu(pgid)
        if now[0] == before[0] and now[1] - before[1] < busy * window:
            return
        before = now
    raise BenchError(f"the worker was still busy starting after {timeout:.0f}s")


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
            if key in ("Pss", "Rss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Private_Dirty"):
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
    if scen == "enqueue" or (scen == "serializer" and "startup_seconds" not in rec):
        return f"{rec['rate']:>10,.0f} tasks/s"
    if scen == "serializer":
        scen = "drain"
    if scen in ("drain", "io") or (scen == "mixed" and "rate" in rec):
        extra = f", {rec['efficiency']:.0%} of ideal" if scen == "io" else ""
        return (
            f"{rec['rate']:>10,.0f} tasks/s after start-up ({rec['startup_seconds']:.2f} s){extra}"
        )
    if scen == "cpu":
        return f"{rec['run_seconds']:>7.2f} s after start-up, {rec['efficiency']:.0%} of ideal"
    if scen == "ceiling":
        if "drain_rate" in rec:
            return (
                f"enqueue {rec['enqueue_rate']:>9,.0f} tasks/s, "
                f"drain {rec['drain_rate']:>9,.0f} tasks/s"
            )
        return ", ".join(f"{k[:-5]} {v:,.0f}/s" for k, v in rec.items() if k.endswith("_rate"))
    if scen == "soak":
        return soak.brief(rec)
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
    p.add_argument("-n", type=int, default=MIN_DRAIN_N,
                   help=f"tasks for enqueue, drain and the ceiling ({MIN_DRAIN_N})")  # fmt: skip
    p.add_argument("--calls", type=int, default=2_000, help="round-trip calls (2000)")
    p.add_argument(
        "--prefetch", type=int, default=BEST_PREFETCH,
        help=f"the tuned rows' prefetch window per slot (the one-process drain, below the "
        f"defaults): celeriac's and Celery's --prefetch-multiplier, Dramatiq's "
        f"dramatiq_queue_prefetch, taskiq's --max-prefetch ({BEST_PREFETCH}, as Celery's "
        f"docs advise for short tasks; 0: no tuned rows)",
    )  # fmt: skip
    p.add_argument("--io-n", type=int, default=1_000, help="I/O-bound tasks (1000)")
    p.add_argument("--io-c", type=int, default=50, help="I/O-bound concurrency (50)")
    p.add_argument("--cpu-n", type=int, default=500, help="CPU-bound tasks (500)")
    p.add_argument("--mem-n", type=int, default=100_000,
                   help="tasks before the second memory reading (100000)")  # fmt: skip
    p.add_argument("--mem-peers", type=_csv(PEERS), default=list(MEM_PEERS),
                   help=f"peers of the memory scenario ({','.join(MEM_PEERS)}: the others "
                   "need minutes to run 100,000 tasks)")  # fmt: skip
    p.add_argument("--mem-prefork", action="store_true",
                   help="memory: also prefork -c 1 (celeriac, Celery)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=MIN_REPEATS,
                   help=f"repeats of the enqueue, drain and round-trip cells ({MIN_REPEATS};"
                   " fewer: the table says it is not a result)")  # fmt: skip
    p.add_argument(
        "--extra-repeats", type=int, default=1,
        help="repeats of the io, cpu, memory, mixed and ceiling cells (1; 0: none of them,"
        " and no multi-slot drain)",
    )  # fmt: skip
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT,
                   help=f"seconds to wait at the start for other processes to leave the CPUs"
                   f" under {BUSY_THRESHOLD * 100:.0f}%% busy ({QUIET_WAIT:.0f}; then it runs"
                   " and says so)")  # fmt: skip
    p.add_argument(
        "--busy-threshold",
        type=float,
        default=BUSY_THRESHOLD,
        help=f"the share of all CPUs that counts as busy ({BUSY_THRESHOLD})",
    )
    p.add_argument("--peers", type=_csv(PEERS), default=list(PEERS),
                   help=f"comma-separated ({','.join(PEERS)})")  # fmt: skip
    p.add_argument("--brokers", type=_csv(ALL_BROKERS), default=list(ALL_BROKERS),
                   help="comma-separated (redis,amqp,sqlite)")  # fmt: skip
    p.add_argument("--scenarios", type=_csv(SCENARIOS),
                   default=[s for s in SCENARIOS if s not in NOT_BY_DEFAULT],
                   help=f"comma-separated ({','.join(SCENARIOS)}; all but "
                   f"{','.join(NOT_BY_DEFAULT)} by default)")  # fmt: skip
    p.add_argument("--soak-n", type=int, default=soak.SOAK_N,
                   help=f"soak: no-op tasks through the worker ({soak.SOAK_N})")  # fmt: skip
    p.add_argument("--soak-shapes", type=_csv(tuple(soak.SOAK_SHAPES)),
                   default=list(soak.SOAK_SHAPES),
                   help=f"soak: worker shapes ({','.join(soak.SOAK_SHAPES)})")  # fmt: skip
    p.add_argument("--only", action="append", choices=SCENARIOS, help=argparse.SUPPRESS)
    p.add_argument("--impl", action="append", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--no-prefork", action="store_true", help="skip the prefork cells")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    amqp_url = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    p.add_argument("--redis-url", default=redis_url, help="Redis (broker, results, sentinels)")
    p.add_argument("--amqp-url", default=amqp_url, help="RabbitMQ (guest/guest on localhost)")
    p.add_argument("--json", type=Path, help="where to write the raw results")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument("--chart", type=Path,
                   help="where to draw the chart (the JSON's path with .png)")  # fmt: skip
    p.add_argument("--note", default="",
                   help="a note kept in the results JSON (why this run, what was odd)")  # fmt: skip
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="measure nothing: print the tables of the results JSON FILE as its "
                   "run printed them, and draw its chart (--chart, --no-chart)")  # fmt: skip
    args = p.parse_args(argv)
    if args.only:  # the first version's options
        args.scenarios = args.only
    if args.impl:
        args.peers = args.impl
    if min(args.n, args.io_n, args.cpu_n, args.mem_n, args.io_c, args.repeats, args.soak_n) < 1:
        p.error("need -n, --io-n, --cpu-n, --mem-n, --io-c, --repeats, --soak-n >= 1")
    if args.prefetch < 0:
        p.error("need --prefetch >= 0")
    if args.calls < 10:
        p.error("need --calls >= 10")
    if args.quiet_wait < 0:
        p.error("need --quiet-wait >= 0 (seconds)")
    if not 0 < args.busy_threshold <= 1:
        p.error("need 0 < --busy-threshold <= 1 (a share of all CPUs)")
    if args.extra_repeats < 0:
        p.error("need --extra-repeats >= 0 (0: no -c 2, io and memory cells)")
    return args


def report(args: argparse.Namespace) -> int:
    """``--report FILE``: the tables (and the chart) of a results file, nothing measured."""
    try:
        doc = load(args.report)
        lines = render(doc, str(args.report))
    except ReportError as exc:
        print(f"python -m benches --report: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if not args.no_chart:
        png = args.chart or args.report.with_suffix(".png")
        rows = summarize(doc["runs"])
        problem = write_chart(rows, png, doc["machine"], ceiling_summary(rows, doc["runs"]))
        print(f"chart: {png}" if problem is None else f"no chart: {problem}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        return report(args)
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
    print("\n".join(machine_lines(facts, peers)))
    jobs = plan(args, peers, brokers)
    quiet = wait_quiet(args.quiet_wait, args.busy_threshold)
    facts.update(quiet_at_start=quiet.quiet, busy_at_start=quiet.busy,
                 waited_for_quiet_seconds=quiet.waited_seconds)  # fmt: skip
    started = time.time()
    cpu_rounds = 0
    if "cpu" in args.scenarios:
        cpu_rounds = calibrate()
        facts["cpu_task_rounds"] = cpu_rounds
        print(f"CPU-bound task: {cpu_rounds:,} SHA-256 rounds = {CPU_SECONDS * 1000:.0f} ms here")
    ceiling_exe = None
    if any(job.shape == "pure Rust" for job in jobs):
        print("building the pure-Rust ceiling (cargo build --profile ci --bench ceiling) ...",
              flush=True)  # fmt: skip
        t_build = time.time()
        ceiling_exe, problem = build_ceiling()
        if problem is not None:
            print(f"note: no pure-Rust ceiling: {problem}")
            skipped["ceiling"] = problem
        facts["ceiling_build_seconds"] = time.time() - t_build
    with tempfile.TemporaryDirectory(prefix="celeriac-bench-") as tmp:
        bench = Bench(python=python, args=args, r=r, tmp=Path(tmp), cpu_rounds=cpu_rounds,
                      ceiling_exe=ceiling_exe)  # fmt: skip
        for i, job in enumerate(jobs, 1):
            elapsed = time.time() - started
            bar = _bar(i - 1, len(jobs))
            print(f"{bar} {i:>3}/{len(jobs)} {elapsed / 60:4.1f} min  ", end="", flush=True)
            rec = bench.measure(job)
            cell = f"{job.broker:<6} {job.scenario:<9} {job.shape:<14} {job.peer:<9}"
            print(f"{cell} {_brief(rec)}", flush=True)
    rows = summarize(bench.results)
    ceilings = ceiling_summary(rows, bench.results)
    print("\n".join(table_block(rows, bench.results, method_notes(vars(args), facts))))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.json or RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {
        "format": FORMAT,
        "started": started,
        "duration_seconds": time.time() - started,
        "command": "python -m benches " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "params": params,
        "peers": peers,
        "brokers": brokers,
        "skipped": skipped,
        "machine": facts,
        "summary": rows,
        "ceiling": ceilings,
        "runs": bench.results,
    }
    if args.note:
        doc["note"] = args.note
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nraw results: {out}")
    if not args.no_chart:
        png = args.chart or out.with_suffix(".png")
        problem = write_chart(rows, png, facts, ceilings)
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
