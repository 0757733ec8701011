"""The peers: one adapter module per queue library, and how to start each one's worker.

Nothing here imports a queue library; ``benches/client.py`` and the workers import the
adapter modules (``celery_like``, ``dramatiq_peer``, ...) in their own fresh processes.

Worker modes (the same shape for every peer, each at its documented settings):

- ``solo``: one process runs one task at a time (the "1 process" drain);
- ``prefork``: ``c`` child processes; ``threads``: ``c`` threads in one process;
- ``async``: one process running up to ``c`` ``async def`` tasks at once.
"""

from __future__ import annotations

from dataclasses import dataclass

#: brokers each peer is measured on
BROKERS = {
    "celeriac": ("redis", "amqp", "sqlite"),
    "celery": ("redis", "amqp"),
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


@dataclass(frozen=True)
class WorkerSpec:
    argv: list[str]
    settings: str  # how it was run, for the table's notes


def worker_spec(
    peer: str, python: str, queue: str, mode: str, c: int, broker: str
) -> WorkerSpec | None:
    """The worker's command line for ``mode`` with concurrency ``c``, or None if the peer
    has no such mode."""
    if peer == "celeriac":
        pool = "solo" if mode == "solo" else mode
        if pool not in ("solo", "prefork", "threads"):
            return None
        argv = [python, "-m", "celeriac", "-A", "benches.app", "worker", "-P", pool,
                "-c", str(c), "-Q", queue, "-l", "warning"]  # fmt: skip
        return WorkerSpec(argv, f"celeriac worker -P {pool} -c {c}")
    if peer == "celery":
        pool = "solo" if mode == "solo" else mode
        if pool not in ("solo", "prefork", "threads"):
            return None
        # Cluster features celeriac lacks are off: they cost start-up time, not per-task time.
        argv = [python, "-m", "celery", "-A", "benches.app", "worker", "--pool", pool,
                "-c", str(c), "-Q", queue, "-l", "warning", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-n", f"{queue}@%h"]  # fmt: skip
        transport = "py-amqp" if broker == "amqp" else broker
        return WorkerSpec(
            argv,
            f"celery worker --pool {pool} -c {c} --without-gossip/mingle/heartbeat ({transport})",
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
        return WorkerSpec(argv, f"dramatiq --processes {shape[0]} --threads {shape[1]}")
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
        return WorkerSpec(
            argv, f"taskiq worker --workers {workers} --max-async-tasks {tasks} (async tasks)"
        )
    raise ValueError(f"unknown peer {peer!r}")
