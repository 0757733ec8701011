"""Beat at 10,000 entries: what a tick costs and what an idle beat burns.

    python -m benches.beat [--entries 10000] [--idle-seconds 10] [--json out.json]

Not part of the default benchmark run (it takes about a minute). For each store
(Redis on 127.0.0.1:6379, the embedded SQLite file), with ``--entries`` entries:

- start: reading the schedule and registering every entry in the store;
- first tick: the next run of every entry computed (once, at start);
- idle tick: one ``Beat.tick()`` when nothing is due (the heap's top is checked);
- due tick: one ``tick()`` when every entry is due (each run claimed and sent), per run;
- idle CPU: a ``celeriac beat`` process with those entries (hourly) left idle for
  ``--idle-seconds``: its CPU time over that wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import redis

REDIS_URL = "redis://127.0.0.1:6379/0"

APP_PY = """\
import os
from celeriac import Celeriac
from celeriac.schedules import crontab

app = Celeriac("beatbench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BROKER"])
app.conf.task_default_queue = os.environ["BENCH_QUEUE"]


@app.task(name="beatbench.noop")
def noop(n):
    return n


app.conf.beat_schedule = {
    f"entry-{n}": {"task": "beatbench.noop", "schedule": crontab(minute=n % 60), "args": (n,)}
    for n in range(int(os.environ["BENCH_ENTRIES"]))
}
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_ticks(broker: str, entries: int, queue: str) -> dict[str, Any]:
    from celeriac import Celeriac
    from celeriac.beat import Beat

    app = Celeriac("beatbench", broker=broker, backend=broker, set_as_current=False)
    app.conf.task_default_queue = queue
    app.task(name="beatbench.noop")(lambda n: n)
    app.conf.beat_schedule = {
        f"entry-{n}": {"task": "beatbench.noop", "schedule": 3600.0, "args": (n,)}
        for n in range(entries)
    }
    beat = Beat(app, schedule_filename=queue)
    started = time.perf_counter()
    beat.setup()
    setup = time.perf_counter() - started
    started = time.perf_counter()
    beat.tick()  # the first: every entry's next run is computed
    first_tick = time.perf_counter() - started
    idle_calls = 1000
    started = time.perf_counter()
    for _ in range(idle_calls):
        beat.tick()
    idle_tick = (time.perf_counter() - started) / idle_calls
    # Every entry last ran two hours ago: all due at once.
    long_ago = int((time.time() - 7200) * 1_000_000)
    for entry in beat.entries.values():
        beat._store.claim(entry.name, entry.last_run, long_ago)
        entry.last_run = long_ago
    beat._heap = []
    for entry in beat.entries.values():
        beat._push(entry, 0.0)
    started = time.perf_counter()
    beat.tick()
    due_tick = time.perf_counter() - started
    beat._store.prune([])
    app.close()
    return {
        "setup_s": round(setup, 3),
        "first_tick_s": round(first_tick, 3),
        "idle_tick_us": round(idle_tick * 1e6, 2),
        "due_tick_s": round(due_tick, 3),
        "per_due_run_us": round(due_tick / entries * 1e6, 1),
    }


def measure_idle_cpu(broker: str, entries: int, queue: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "beatbench.py").write_text(textwrap.dedent(APP_PY))
        env = dict(os.environ, BENCH_BROKER=broker, BENCH_QUEUE=queue,
                   BENCH_ENTRIES=str(entries))  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "celeriac", "-A", "beatbench", "beat", "-s", queue],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(5.0)  # start-up: import, register, first heap
            before = _cpu_seconds(proc.pid)
            time.sleep(seconds)
            used = _cpu_seconds(proc.pid) - before
        finally:
            proc.terminate()
            proc.wait(20)
        from celeriac import _core

        _core.BeatStore(broker, queue).prune([])
    return {"idle_cpu_percent": round(used / seconds * 100, 3), "idle_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.beat", description=__doc__)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for store, broker in (("redis", REDIS_URL), ("sqlite", f"sqlite://{folder}/bench.db")):
            queue = f"bench_beat_{uuid.uuid4().hex[:10]}"
            try:
                record = {"store": store, "entries": args.entries}
                record.update(measure_ticks(broker, args.entries, queue))
                record.update(measure_idle_cpu(broker, args.entries, queue, args.idle_seconds))
            finally:
                if store == "redis":
                    redis.Redis.from_url(REDIS_URL).delete(queue)
            results.append(record)
            print(json.dumps(record), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
