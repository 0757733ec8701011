"""The peers: one adapter module per queue library, and how to start each one's worker.

Nothing here imports a queue library; ``benches/client.py`` and the workers import the
adapter modules (``celery_like``, ``dramatiq_peer``, ...) in their own fresh processes.

Worker modes (the same shape for every peer, each at its documented settings):

- ``solo``: one process runs one task at a time (the "1 process" drain);
- ``prefork``: ``c`` child processes; ``threads``: ``c`` threads in one process;
- ``async``: one process running up to ``c`` ``async def`` tasks at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: brokers each peer is measured on
BROKERS = {
    "celeriac": ("redis", "amqp", "sqlite"),
    "celery": ("redis", "amqp", "sqlite"),
    "dramatiq": ("redis", "amqp"),
    "rq": ("redis",),
    "huey": ("redis", "sqlite"),
    "taskiq": ("redis",),
}
#: the pip distribution of each peer (its version goes to the results)
DISTRIBUTIONS = {
    "celeriac": "celeriac",
    "celery": "celery",
    "dramatiq": "dramatiq",
    "rq": "rq",
    "huey": "huey",
    "taskiq": "taskiq",
}
PEERS = tuple(BROKERS)


#: the prefetch window per process slot for short tasks: Celery's "Optimizing" guide
#: advises a large ``worker_prefetch_multiplier`` ("say 64, or 128") for many short tasks
BEST_PREFETCH = 64


@dataclass(frozen=True)
class WorkerSpec:
    argv: list[str]
    settings: str  # how it was run, for the table's notes
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables


def worker_spec(
    peer: str, python: str, queue: str, mode: str, c: int, broker: str, prefetch: int = 0
) -> WorkerSpec | None:
    """The worker's command line for ``mode`` with concurrency ``c``, or None if the peer
    has no such mode. ``prefetch``: the prefetch window per slot (celeriac's and Celery's
    ``--prefetch-multiplier``, Dramatiq's ``dramatiq_queue_prefetch``, taskiq's
    ``--max-prefetch``); 0 keeps each peer's default."""
    if peer == "celeriac":
        pool = "solo" if mode in ("solo", "async") else mode
        if pool not in ("solo", "prefork", "threads"):
            return None
        argv = [python, "-m", "celeriac", "-A", "benches.app", "worker", "-P", pool,
                "-c", str(1 if mode == "async" else c), "-Q", queue, "-l", "warning"]  # fmt: skip
        env = {}
        settings = f"celeriac worker -P {pool} -c {1 if mode == 'async' else c}"
        if mode == "async":  # async def tasks, c at once on the process's event loop
            env["BENCH_ASYNC_CONCURRENCY"] = str(c)
            settings += f", worker_async_concurrency={c} (async def tasks)"
        if prefetch:
            argv += ["--prefetch-multiplier", str(prefetch)]
            settings += f" --prefetch-multiplier {prefetch}"
        return WorkerSpec(argv, settings, env)
    if peer == "celery":
        pool = "solo" if mode == "solo" else mode
        if pool not in ("solo", "prefork", "threads"):
            return None
        # Solo: no -c, as `celery worker -P solo` is run. Celery sizes the prefetch window
        # by its concurrency (default: the CPU count) even though solo runs one task at a
        # time; `-c 1` shrank the window to 4 and its RabbitMQ drain ~10x (issue 18 point 5).
        concurrency = [] if pool == "solo" else ["-c", str(c)]
        # Cluster features celeriac lacks are off: they cost start-up time, not per-task time.
        argv = [python, "-m", "celery", "-A", "benches.app", "worker", "--pool", pool,
                *concurrency, "-Q", queue, "-l", "warning", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-n", f"{queue}@%h"]  # fmt: skip
        transport = {"amqp": "py-amqp", "sqlite": "sqla+sqlite, SQLAlchemy"}.get(broker, broker)
        window = ""
        if prefetch:
            argv += ["--prefetch-multiplier", str(prefetch)]
            window = f" --prefetch-multiplier {prefetch}"
        return WorkerSpec(
            argv,
            f"celery worker --pool {pool}{' ' + ' '.join(concurrency) if concurrency else ''}"
            f"{window} --without-gossip/mingle/heartbeat"
            f" ({transport})",
        )
    if peer == "dramatiq":
        # One thread prefetches 2 messages and drains ~8x slower than dramatiq's default of
        # 8 threads per process: the one-process and prefork shapes keep those 8 threads.
        shape = {"solo": (1, 8), "prefork": (c, 8), "threads": (1, c)}.get(mode)
        if shape is None:
            return None
        argv = [python, "-m", "dramatiq", "benches.peers.dramatiq_peer",
                "--processes", str(shape[0]), "--threads", str(shape[1]), "-Q",
                queue if broker == "amqp" else "default"]  # fmt: skip
        settings = f"dramatiq --processes {shape[0]} --threads {shape[1]}"
        env = {}
        if prefetch:  # default: 2 per thread
            env["dramatiq_queue_prefetch"] = str(prefetch)
            settings += f", dramatiq_queue_prefetch={prefetch}"
        return WorkerSpec(argv, settings, env)
    if peer == "rq":
        if mode != "solo":
            return None
        argv = [python, "-m", "rq.cli", "worker", "--worker-class", "rq.worker.SimpleWorker",
                "--url", "$REDIS_URL", "--quiet", queue]  # fmt: skip
        return WorkerSpec(argv, "rq worker --worker-class rq.worker.SimpleWorker (no fork per job)")
    if peer == "huey":
        kind = {"solo": "thread", "threads": "thread", "prefork": "process"}.get(mode)
        if kind is None:
            return None
        n = 1 if mode == "solo" else c
        argv = [python, "-m", "huey.bin.huey_consumer", "benches.peers.huey_peer.huey",
                "-w", str(n), "-k", kind, "-q"]  # fmt: skip
        return WorkerSpec(argv, f"huey_consumer -w {n} -k {kind}")
    if peer == "taskiq":
        if mode == "solo":
            workers, tasks = 1, 100
        elif mode == "prefork":
            workers, tasks = c, 100
        elif mode == "async":
            workers, tasks = 1, c
        else:
            return None
        argv = [python, "-m", "taskiq", "worker", "benches.peers.taskiq_peer:broker",
                "--workers", str(workers), "--max-async-tasks", str(tasks),
                "--log-level", "WARNING"]  # fmt: skip
        window = ""
        if prefetch:  # default: 0 beyond --max-async-tasks
            argv += ["--max-prefetch", str(prefetch)]
            window = f" --max-prefetch {prefetch}"
        return WorkerSpec(
            argv,
            f"taskiq worker --workers {workers} --max-async-tasks {tasks}{window} (async tasks)",
        )
    raise ValueError(f"unknown peer {peer!r}")
