"""Redis masters, replicas and sentinels on loopback for the Sentinel tests.

Each server is a ``redis-server`` process of ours in a temporary directory, plain or
TLS (``Tls``: the throw-away CA's server certificate), stopped by pid. Shared by
``brokers/test_redis_sentinel.py`` (plain) and ``brokers/test_redis_sentinel_tls.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import redis
from compat.conftest import celery_argv
from conftest import WorkerProcess, app_module, recorded_runs, wait_until

if TYPE_CHECKING:
    from conftest import StartWorker, TasksDir

#: The name the sentinels monitor the master under.
MASTER_NAME = "mymaster"

#: The task of the Sentinel tests, named alike on celeriac and Celery (so either
#: worker runs what either client sends): it records its run in the shared Redis.
RECORD_TASK = """

@app.task(name="sentinel.record")
def record(key, number, pause):
    client().rpush(key, f"{number} {time.time()}")
    time.sleep(pause)
    return number
"""


def tasks_module(settings: str, name: str = "tasks", impl: str = "celeriac") -> str:
    """The tasks module ``name`` on ``impl``: ``settings`` (module code) and
    :data:`RECORD_TASK`."""
    imports = ("import ssl", "import time")
    return app_module(name, settings + RECORD_TASK, imports=imports, impl=impl, redis_client=True)


def write_tasks(tasks_dir: TasksDir, settings: str) -> None:
    """``tasks`` (celeriac) and ``celery_tasks`` (Celery) with ``settings``."""
    tasks_dir.write("tasks.py", tasks_module(settings))
    tasks_dir.write("celery_tasks.py", tasks_module(settings, "celery_tasks", "celery"))


def interop(tasks_dir: TasksDir, worker: StartWorker, client: str, key: str) -> list[Any]:
    """The results of two ``record`` tasks (1 and 2) that a ``client`` (``"celery"``
    or ``"celeriac"``) client sends to a worker of the other kind
    (:func:`write_tasks`)."""
    if client == "celery":
        process = worker()
        module = tasks_dir.import_module("celery_tasks")
        try:
            return [module.record.delay(key, n, 0).get(timeout=15) for n in (1, 2)]
        finally:
            module.app.close()
            sys.modules.pop("celery_tasks", None)
            process.stop()
    argv = celery_argv("celery_tasks", tasks_dir.queue)
    celery = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
    try:
        celery.wait_for(r" ready\.", timeout=30)
        tasks = tasks_dir.import_module()
        return [tasks.record.delay(key, n, 0).get(timeout=15) for n in (1, 2)]
    finally:
        status = celery.stop()
        assert status == 0, celery.log


@dataclass(frozen=True)
class Cluster:
    """Where a test module's master, replica and sentinels listen, and their passwords
    (the master's, given in the URLs; the sentinels', in ``sentinel_kwargs``)."""

    master: int
    replica: int
    sentinels: tuple[int, ...]
    master_password: str
    sentinel_password: str

    def url(self, ports: tuple[int, ...] = (), password: str | None = None) -> str:
        """The ``sentinel://`` list of ``ports`` (the sentinels by default), with the
        master's password (or ``password``: ``"**"`` for the masked list)."""
        password = self.master_password if password is None else password
        return ";".join(
            f"sentinel://:{password}@127.0.0.1:{port}/0" for port in ports or self.sentinels
        )

    def masked(self, ports: tuple[int, ...] = ()) -> str:
        return self.url(ports, "**")

    def check_masked(self, log: str) -> None:
        """``log`` names the sentinels masked, and neither password."""
        assert self.masked() in log, log
        assert self.master_password not in log and self.sentinel_password not in log, log


@dataclass(frozen=True)
class Tls:
    """The files a TLS server needs; clients need not show a certificate."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self, port: int) -> tuple[str, ...]:
        """redis-server arguments: TLS on ``port`` only, replication over TLS too."""
        return (
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
            "--tls-replication", "yes",
        )  # fmt: skip


def listening(port: int) -> bool:
    """Whether something listens on ``port`` of 127.0.0.1."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Servers:
    """Masters, replicas and sentinels, each a process of ours, plain or all ``tls``."""

    def __init__(self, base: Path, tls: Tls | None = None) -> None:
        self.base = base
        self.tls = tls
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int, *args: str, tls: bool = True) -> None:
        """``redis-server *args`` on ``port`` (TLS when the servers are, unless ``tls``
        is False)."""
        if listening(port):
            pytest.fail(f"port {port} is taken: another test run's server?", pytrace=False)
        work = self.base / str(port)
        work.mkdir()
        listen = self.tls.server_args(port) if self.tls and tls else ("--port", str(port))
        with open(work / "out.log", "ab") as out:
            self.procs[port] = subprocess.Popen(
                [
                    "redis-server",
                    *args,
                    *listen,
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(work),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start_master(self, port: int, password: str) -> None:
        self.start(port, "--requirepass", password, "--masterauth", password)

    def start_replica(self, port: int, master_port: int, password: str) -> None:
        self.start(
            port,
            "--replicaof", "127.0.0.1", str(master_port),
            "--requirepass", password,
            "--masterauth", password,
        )  # fmt: skip

    def start_sentinel(
        self,
        port: int,
        master_port: int,
        master_password: str,
        sentinel_password: str,
        tls: bool = True,
    ) -> None:
        """A sentinel on ``port`` monitoring ``master_port`` as :data:`MASTER_NAME`
        (quorum 2, down after 1 s), asking for ``sentinel_password``."""
        conf = self.base / f"sentinel-{port}.conf"
        conf.write_text(
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 3000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            f"sentinel auth-pass {MASTER_NAME} {master_password}\n"
            f"requirepass {sentinel_password}\n"
            f"sentinel sentinel-pass {sentinel_password}\n"
        )
        self.start(port, str(conf), "--sentinel", tls=tls)

    def start_cluster(
        self, cluster: Cluster, connect: Callable[[int, str], redis.Redis], timeout: float
    ) -> None:
        """The master, its replica and the sentinels of ``cluster``; back when
        :func:`ready` says so (``connect(port, password)`` makes a client), else the
        test fails with the servers' logs."""
        self.start_master(cluster.master, cluster.master_password)
        self.start_replica(cluster.replica, cluster.master, cluster.master_password)
        for port in cluster.sentinels:
            self.start_sentinel(
                port, cluster.master, cluster.master_password, cluster.sentinel_password
            )

        def clients() -> tuple[redis.Redis, list[redis.Redis]]:
            return (
                connect(cluster.replica, cluster.master_password),
                [connect(port, cluster.sentinel_password) for port in cluster.sentinels],
            )

        if not wait_until(lambda: ready(*clients()), timeout=timeout):
            ports = (cluster.replica, *cluster.sentinels)
            logs = "\n".join(self.log(port) for port in ports)
            pytest.fail(f"the sentinels did not get ready:\n{logs}", pytrace=False)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port, None)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def stop_all(self) -> None:
        for port in list(self.procs):
            self.kill(port)

    def log(self, port: int) -> str:
        return (self.base / str(port) / "out.log").read_text(errors="replace")[-2000:]


def ready(replica: redis.Redis, sentinels: list[redis.Redis]) -> bool:
    """The replica in sync, every sentinel sees the master, the replica and the other
    sentinels (a failover needs them to vote)."""
    with contextlib.suppress(redis.RedisError):
        if replica.info("replication").get("master_link_status") != "up":
            return False
        for sentinel in sentinels:
            fields = sentinel.sentinel_master(MASTER_NAME)
            if int(fields["num-other-sentinels"]) < len(sentinels) - 1:
                return False
            if int(fields["num-slaves"]) < 1:
                return False
        return True
    return False


@dataclass
class Drain:
    """What :func:`drain_through_failover` sent and saw."""

    sent: list[Any]
    killed_at: float
    switched_at: float
    #: (number, time) of every run, in order.
    runs: list[tuple[int, float]]


def drain_through_failover(
    servers: Servers,
    master_port: Callable[[], int],
    tasks: ModuleType,
    process: WorkerProcess,
    counts: tuple[int, int],
    key: str,
    shared: redis.Redis,
) -> Drain:
    """Send ``before`` ``record`` tasks (``counts``: before, after) to the worker
    ``process``, SIGKILL the master once it ran a tenth of them, send ``after`` more
    while the sentinels fail over; back when every task ran (recorded in ``key`` of
    the ``shared`` Redis) after the sentinels named a new master."""
    before, after = counts
    old_master = master_port()
    sent = [tasks.record.delay(key, number, 0.02) for number in range(before)]
    tasks.app.producer.flush(10.0)
    assert wait_until(lambda: shared.llen(key) >= before // 10, timeout=15), process.log

    killed_at = time.time()
    servers.kill(old_master)  # SIGKILL, during the drain
    # Sent while the sentinels fail over: the producer finds the new master.
    sent += [tasks.record.delay(key, number, 0.0) for number in range(before, before + after)]
    assert wait_until(lambda: master_port() != old_master, timeout=30), "no failover"
    switched_at = time.time()
    everything = set(range(before + after))

    def numbers_run() -> set[int]:
        return {n for n, _ in recorded_runs(shared, key)}

    assert wait_until(lambda: numbers_run() >= everything, timeout=40), (
        sorted(everything - numbers_run()),
        process.log,
    )
    return Drain(sent, killed_at, switched_at, recorded_runs(shared, key))
