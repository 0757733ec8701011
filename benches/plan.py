"""The plan of a run: which cells, in which order, at which settings.

The headline cells run every library at its defaults, as users run them (celeriac and
Celery: a prefetch window of 4 per slot). The tuned cells (``--prefetch``, 64 by default:
Celery's "Optimizing" guide advises a high multiplier for many short tasks) come below them,
labelled ``tuned``, on every broker, for the peers that have such a window.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from benches import soak
from benches.peers import BROKERS, worker_spec

SCENARIOS = (
    "enqueue", "drain", "io", "cpu", "roundtrip", "memory", "ceiling", "mixed", "serializer",
    "soak",
)  # fmt: skip
#: scenarios run only when named: the soak takes minutes
NOT_BY_DEFAULT = ("soak",)
#: the serializer scenario's shapes: celeriac's enqueue and drain (1 process) with each
SERIALIZER_SHAPES = tuple(
    f"{step}, {name}" for step in ("enqueue", "drain") for name in ("json", "msgpack")
)
ALL_BROKERS = ("redis", "amqp", "sqlite")
#: the prefetch window per slot of celeriac and Celery by default (worker_prefetch_multiplier)
DEFAULT_WINDOW = 4
#: peers with a prefetch window to tune: celeriac's and Celery's --prefetch-multiplier,
#: Dramatiq's dramatiq_queue_prefetch, taskiq's --max-prefetch (RQ and Huey have none)
TUNABLE_PEERS = ("celeriac", "celery", "dramatiq", "taskiq")
#: a tuned row's shape ends with this (the report puts those rows below the defaults)
TUNED = ", tuned"
#: the mixed scenario's shapes (a Celery client; a celeriac or a Celery worker)
MIXED_DRAIN, MIXED_ROUNDTRIP = "Celery client, drain 1 process", "Celery client, round trip"
#: drain shapes: label -> (worker mode, concurrency)
DRAIN_SHAPES = {
    "1 process": ("solo", 1),
    "prefork -c 1": ("prefork", 1),
    "prefork -c 2": ("prefork", 2),
    "threads -c 2": ("threads", 2),
}
#: CPU-bound shapes: label -> (worker mode, concurrency)
CPU_SHAPES = {"1 process": ("solo", 1), "prefork -c 2": ("prefork", 2)}
#: peers with a batch enqueue API measured in the "batch API" enqueue cell
BATCH_PEERS = ("celeriac", "rq")
#: the ceiling's bare clients, per broker: each drains a queue filled by celeriac's client
#: with the headline drain's window and one ack per message, and none of celeriac's code
#: (``benches/ceiling.rs``: redis-rs, lapin; ``benches/bare_pika.py``: pika)
CEILING_CLIENTS = {
    "redis": ("redis-rs + Lua script",),
    "amqp": ("lapin", "pika"),
}
#: beside the Redis ceiling, not a bound of the same work: redis-benchmark, one connection
REDIS_BENCHMARK = "redis-benchmark"
#: the peer name of every ceiling job (its shape names the client)
BARE = "bare"
#: peers of the memory scenario by default: 100,000 tasks take Celery's worker 1-3 min on
#: 2 cores, Dramatiq's and taskiq's 1-2 min each and RQ's 6: the default run keeps Huey,
#: the fastest pure-Python one (``--mem-peers`` names others)
MEM_PEERS = ("celeriac", "celery", "huey")


@dataclass(frozen=True)
class Job:
    broker: str
    scenario: str
    shape: str  # "" or a label of DRAIN_SHAPES, or the io / memory shape
    peer: str
    repeat: int
    mode: str = "solo"
    c: int = 1
    prefetch: int = 0  # the worker's prefetch window per slot; 0: the peer's default
    client_peer: str = ""  # the client's library when not the worker's (mixed, ceiling)


def ceiling_jobs(args: argparse.Namespace, broker: str, on: list[str], rep: int) -> list[Job]:
    """The ceiling's bare clients on ``broker`` (every repeat, as the drain they bound), and
    redis-benchmark on Redis. Their queue is filled by celeriac's client: none without it."""
    if "celeriac" not in on or broker not in CEILING_CLIENTS:
        return []
    jobs = [Job(broker, "ceiling", shape, BARE, rep, client_peer="celeriac")
            for shape in CEILING_CLIENTS[broker]]  # fmt: skip
    if broker == "redis":
        jobs.append(Job(broker, "ceiling", REDIS_BENCHMARK, BARE, rep))
    return jobs


def plan(args: argparse.Namespace, peers: list[str], brokers: list[str]) -> list[Job]:
    """Every measurement of the run, in order: repeat by repeat, scenario by scenario, the
    peers alternating their order between repeats to spread any drift."""
    jobs: list[Job] = []
    best = args.prefetch  # the tuned window of the short no-op tasks (0: no tuned rows)
    for rep in range(args.repeats):
        order = peers if rep % 2 == 0 else peers[::-1]
        for broker in brokers:
            on = [p for p in order if broker in BROKERS[p]]
            for scenario in args.scenarios:
                if scenario == "enqueue":
                    jobs += [Job(broker, "enqueue", "", p, rep) for p in on]
                    if broker == "redis":
                        jobs += [
                            Job(broker, "enqueue", "batch API", p, rep)
                            for p in on
                            if p in BATCH_PEERS
                        ]
                elif scenario == "drain":
                    jobs += drain_jobs(args, broker, on, rep)
                elif scenario == "serializer" and "celeriac" in on:
                    jobs += [
                        Job(broker, "serializer", shape, "celeriac", rep)
                        for shape in SERIALIZER_SHAPES
                    ]  # fmt: skip
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
                elif scenario == "cpu":
                    if broker != "redis" or rep >= args.extra_repeats:
                        continue
                    for label, (mode, c) in CPU_SHAPES.items():
                        if args.no_prefork and mode == "prefork":
                            continue
                        jobs += [
                            Job(broker, "cpu", label, p, rep, mode, c)
                            for p in on
                            if worker_spec(p, "python", "q", mode, c, broker) is not None
                        ]
                elif scenario == "ceiling" and "drain" not in args.scenarios:
                    jobs += ceiling_jobs(args, broker, on, rep)
                elif scenario == "mixed":
                    # Celery's client sends; a celeriac worker, then a Celery one, runs.
                    if broker != "redis" or rep >= args.extra_repeats or "celery" not in on:
                        continue
                    jobs += [
                        Job(broker, "mixed", shape, p, rep, client_peer="celery")
                        for shape in (MIXED_DRAIN, MIXED_ROUNDTRIP)
                        for p in on
                        if p in ("celeriac", "celery")
                    ]
                elif scenario == "roundtrip":
                    # Not Celery on SQLite: kombu's SQLAlchemy transport polls once a
                    # second, so 2,000 calls would take over half an hour.
                    jobs += [
                        Job(broker, "roundtrip", "", p, rep)
                        for p in on
                        if p in ("celeriac", "celery") and (broker, p) != ("sqlite", "celery")
                    ]
                elif scenario == "soak":
                    if broker != "redis" or rep >= args.extra_repeats or "celeriac" not in on:
                        continue
                    jobs += [
                        Job(broker, "soak", soak.SOAK_SHAPES[mode], "celeriac", rep, mode, 1,
                            prefetch=best)
                        for mode in args.soak_shapes
                    ]  # fmt: skip
                elif scenario == "memory":
                    if broker != "redis" or rep >= args.extra_repeats:
                        continue
                    jobs += [
                        Job(broker, "memory", "1 process", p, rep)
                        for p in on
                        if p in args.mem_peers
                    ]
                    if args.mem_prefork and not args.no_prefork:
                        jobs += [
                            Job(
                                broker,
                                "memory",
                                "prefork -c 1",
                                p,
                                rep,
                                "prefork",
                                1,
                            )
                            for p in on
                            if p in ("celeriac", "celery")
                        ]
    return jobs


def tuned_shape(window: int) -> str:
    """The label of the one-process drain at the tuned window."""
    return f"1 process{TUNED}: window {window}"


def drain_jobs(args: argparse.Namespace, broker: str, on: list[str], rep: int) -> list[Job]:
    """One repeat's drain cells on ``broker``: every shape at the peers' defaults (the
    multi-slot shapes on Redis, unless ``--extra-repeats 0``), then the one-process drain at
    the tuned window for the peers that have one."""
    jobs: list[Job] = []
    for label, (mode, c) in DRAIN_SHAPES.items():
        if label != "1 process" and (broker != "redis" or args.extra_repeats == 0):
            continue
        if args.no_prefork and mode == "prefork":
            continue
        jobs += [
            Job(broker, "drain", label, p, rep, mode, c)
            for p in on
            if worker_spec(p, "python", "q", mode, c, broker) is not None
            and (label != "prefork -c 1" or p in ("celeriac", "celery"))
        ]
        if label == "1 process" and "ceiling" in args.scenarios:
            # Right after the drain it bounds: on a busy machine, cells measured minutes
            # apart differ more than side by side.
            jobs += ceiling_jobs(args, broker, on, rep)
    if args.prefetch:
        jobs += [
            Job(broker, "drain", tuned_shape(args.prefetch), p, rep, prefetch=args.prefetch)
            for p in on
            if p in TUNABLE_PEERS
        ]
    return jobs
