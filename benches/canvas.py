"""Canvas: time from the call to the body's result, celeriac against Celery in one run.

    python -m benches.canvas [--header 1000] [--chain 100] [--repeats 3] [--brokers redis,amqp]

For each broker (Redis; RabbitMQ with the Redis result backend, which chords need) and
each library, one worker at its defaults (``worker -Q <queue>``: prefork pool, one child
per CPU) and the client in this process:

- chord: ``chord(noop.s(i) for i in range(--header))(tsum.s())`` until ``get()`` returns;
- chain: ``chain(noop.s(0), noop.s() x (--chain - 1))`` until ``get()`` returns.

Each scenario is run ``--repeats`` times after one warm-up; the median is reported with
the ratio Celery / celeriac (above 1: celeriac is faster). The libraries alternate within
each repeat, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
BROKERS = {"redis": REDIS_URL, "amqp": AMQP_URL}
LIBRARIES = ("celeriac", "celery")

APP_PY = """\
import os
from {impl} import Celery

app = Celery("{module}", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.task_default_queue = os.environ["BENCH_QUEUE"]
app.conf.broker_connection_retry_on_startup = True


@app.task(name="canvasbench.noop")
def noop(x=0):
    return x


@app.task(name="canvasbench.tsum")
def tsum(numbers):
    return sum(numbers)
"""


def _env(broker: str, queue: str) -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_BROKER": broker,
        "BENCH_BACKEND": REDIS_URL,
        "BENCH_QUEUE": queue,
        "PYTHONUNBUFFERED": "1",
    }


@contextlib.contextmanager
def _worker(library: str, module: str, tmp: Path, env: dict[str, str]) -> Iterator[None]:
    """A worker at its defaults, on the bench queue; waits until it answers a task."""
    argv = [sys.executable, "-m", library, "-A", module, "worker", "-l", "warning",
            "-Q", env["BENCH_QUEUE"], "-n", f"canvasbench-{uuid.uuid4().hex[:8]}@%h"]  # fmt: skip
    if library == "celery":
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    log = open(tmp / f"{module}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _client(module: str, tmp: Path, env: dict[str, str]) -> ModuleType:
    for key in ("BENCH_BROKER", "BENCH_BACKEND", "BENCH_QUEUE"):
        os.environ[key] = env[key]
    sys.path.insert(0, str(tmp))
    try:
        sys.modules.pop(module, None)
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(tmp))


def _canvas(library: str) -> Any:
    return importlib.import_module(library)


def time_chord(tasks: ModuleType, library: str, size: int) -> float:
    canvas = _canvas(library)
    started = time.perf_counter()
    result = canvas.chord(tasks.noop.s(i) for i in range(size))(tasks.tsum.s())
    value = result.get(timeout=600)
    elapsed = time.perf_counter() - started
    if value != sum(range(size)):
        raise RuntimeError(f"{library}: chord gave {value!r}")
    return elapsed


def time_chain(tasks: ModuleType, library: str, length: int) -> float:
    canvas = _canvas(library)
    started = time.perf_counter()
    flow = canvas.chain(tasks.noop.s(7), *(tasks.noop.s() for _ in range(length - 1)))
    value = flow.apply_async().get(timeout=600)
    elapsed = time.perf_counter() - started
    if value != 7:
        raise RuntimeError(f"{library}: chain gave {value!r}")
    return elapsed


def _purge(broker: str, queue: str, tasks: ModuleType) -> None:
    with contextlib.suppress(Exception):
        tasks.app.control.purge()
    if broker.startswith("redis"):
        import redis

        redis.Redis.from_url(broker).delete(queue)


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """``{broker: {scenario: {library: median seconds}}}``."""
    medians: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for library in LIBRARIES:
            module = f"canvasbench_{library}"
            (tmp / f"{module}.py").write_text(APP_PY.format(impl=library, module=module))
        for broker_name in args.brokers:
            broker = BROKERS[broker_name]
            times: dict[str, dict[str, list[float]]] = {"chord": {}, "chain": {}}
            for library in LIBRARIES:
                module = f"canvasbench_{library}"
                queue = f"canvasbench-{library}-{uuid.uuid4().hex[:8]}"
                env = _env(broker, queue)
                with _worker(library, module, tmp, env):
                    tasks = _client(module, tmp, env)
                    try:
                        tasks.noop.delay(0).get(timeout=120)  # the worker is up
                        time_chord(tasks, library, min(args.header, 50))  # warm-up
                        for _ in range(args.repeats):
                            times["chord"].setdefault(library, []).append(
                                time_chord(tasks, library, args.header)
                            )
                            times["chain"].setdefault(library, []).append(
                                time_chain(tasks, library, args.chain)
                            )
                    finally:
                        _purge(broker, queue, tasks)
                        with contextlib.suppress(Exception):
                            tasks.app.close()
            medians[broker_name] = {
                scenario: {lib: statistics.median(values) for lib, values in by_lib.items()}
                for scenario, by_lib in times.items()
            }
    return medians


def report(medians: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        f"canvas: chord of {args.header} no-op header tasks, chain of {args.chain} "
        f"(median of {args.repeats}; seconds from the call to the result)",
        f"{'broker':8} {'scenario':8} {'celeriac':>10} {'celery':>10} {'celery/celeriac':>16}",
    ]
    for broker, scenarios in medians.items():
        for scenario, by_lib in scenarios.items():
            ours, theirs = by_lib["celeriac"], by_lib["celery"]
            lines.append(
                f"{broker:8} {scenario:8} {ours:10.3f} {theirs:10.3f} {theirs / ours:15.1f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.canvas", description=__doc__)
    parser.add_argument("--header", type=int, default=1000, help="chord header size (1000)")
    parser.add_argument("--chain", type=int, default=100, help="chain length (100)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--brokers", default="redis,amqp", help="redis,amqp")
    args = parser.parse_args(argv)
    args.brokers = [b for b in args.brokers.split(",") if b]
    print(report(run(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
