"""Redis Sentinel: ``sentinel://`` broker and result backend URL lists, a failover.

The ``sentinels`` fixture starts, on loopback and in a temporary directory, a Redis
master (16420), its replica (16421) and three sentinels (16422-16424) that monitor the
master as ``mymaster`` (quorum 2, down after 1 s). The servers ask for a password (the
master's, given in the URLs), the sentinels for another one (``sentinel_kwargs``). All
are stopped by pid afterwards. Which task ran is recorded in the shared Redis on 6379,
which no test stops.

What is checked when the master is SIGKILLed during a drain of acks_late tasks: the
sentinels promote the replica; the worker's consumer, the client's producer and both
result stores find it on their next reconnect, without a restart; every task runs at
least once, and the results come back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import REDIS_URL, worker_env
from sentinel_servers import (
    Cluster,
    Servers,
    drain_through_failover,
    interop,
    tasks_module,
    write_tasks,
)

if TYPE_CHECKING:
    from conftest import Scratch, StartWorker, TasksDir

CLUSTER = Cluster(16420, 16421, (16422, 16423, 16424), "masterpw-7f3a", "sentinelpw-91c2")
SENTINEL_PORTS = CLUSTER.sentinels
#: Nothing listens there (a sentinel that is down).
DEAD_PORT = 16425
MASTER_PASSWORD, SENTINEL_PASSWORD = CLUSTER.master_password, CLUSTER.sentinel_password
START_TIMEOUT = 20.0

SENTINEL_URL = CLUSTER.url()
MASKED_URL = CLUSTER.masked()

SETTINGS = f"""
options = {{
    "master_name": "mymaster",
    "sentinel_kwargs": {{"password": {SENTINEL_PASSWORD!r}}},
    "visibility_timeout": 10,
}}
app.conf.broker_transport_options = options
app.conf.result_backend_transport_options = options
app.conf.task_acks_late = True
app.conf.broker_connection_timeout = 2.0
"""
SENTINEL_TASKS = tasks_module(SETTINGS)


def connect(port: int, password: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)


def server(port: int) -> redis.Redis:
    return connect(port, MASTER_PASSWORD)


def sentinel(port: int) -> redis.Redis:
    return connect(port, SENTINEL_PASSWORD)


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = Servers(tmp_path_factory.mktemp("sentinel"))
    try:
        servers.start_cluster(CLUSTER, connect, START_TIMEOUT)
        yield servers
    finally:
        servers.stop_all()


def master_port() -> int:
    """The port the sentinels name as the master now."""
    _, port = sentinel(SENTINEL_PORTS[0]).sentinel_get_master_addr_by_name("mymaster")
    return int(port)


def test_tasks_and_results_go_through_the_master_the_sentinels_name(
    sentinels: Servers,
    worker: StartWorker,
    tasks_dir: TasksDir,
    redis_client: redis.Redis,
    scratch: Scratch,
) -> None:
    tasks_dir.env = worker_env(tasks_dir.queue, SENTINEL_URL, SENTINEL_URL)
    tasks_dir.write("tasks.py", SENTINEL_TASKS)
    process = worker()
    tasks = tasks_dir.import_module()
    try:
        assert tasks.record.delay(scratch("one"), 7, 0).get(timeout=10) == 7
        # The queue and the result live on the master, not on the shared Redis.
        second = tasks.record.delay(scratch("one"), 8, 0)
        assert second.get(timeout=10) == 8
        assert server(master_port()).exists(f"celery-task-meta-{second.id}")
        assert not redis_client.exists(f"celery-task-meta-{second.id}")
        # Remote control goes over the master too (the fanout connections).
        replies = tasks.app.control.broadcast("stats", reply=True, timeout=5, limit=1)
        assert replies, process.log
        broker = next(iter(replies[0].values()))["broker"]
        assert broker["alternates"] == MASKED_URL.split(";"), broker
    finally:
        process.stop()
    CLUSTER.check_masked(process.log)


@pytest.mark.parametrize("client", ["celery", "celeriac"])
def test_celery_and_celeriac_share_the_sentinels_either_way(
    sentinels: Servers, worker: StartWorker, tasks_dir: TasksDir, scratch: Scratch, client: str
) -> None:
    """The real Celery's client to a celeriac worker, and celeriac's client to a Celery
    worker, both on the sentinel:// list with kombu's settings."""
    tasks_dir.env = worker_env(tasks_dir.queue, SENTINEL_URL, SENTINEL_URL)
    write_tasks(tasks_dir, SETTINGS)
    assert interop(tasks_dir, worker, client, scratch(client)) == [1, 2]


def test_the_master_killed_during_a_drain_worker_and_client_go_on_on_the_new_one(
    sentinels: Servers,
    worker: StartWorker,
    tasks_dir: TasksDir,
    redis_client: redis.Redis,
    scratch: Scratch,
) -> None:
    tasks_dir.env = worker_env(tasks_dir.queue, SENTINEL_URL, SENTINEL_URL)
    tasks_dir.write("tasks.py", SENTINEL_TASKS)
    process = worker()
    tasks = tasks_dir.import_module()
    before, after = 200, 50
    drain = drain_through_failover(
        sentinels, master_port, tasks, process, (before, after), scratch("ran"), redis_client
    )
    killed_at, switched_at, runs = drain.killed_at, drain.switched_at, drain.runs
    everything = set(range(before + after))

    # The tasks of the worker's window ran at once after the kill; then nothing ran
    # until the worker fetched from the new master: the first run after that gap.
    after_kill = [killed_at, *sorted(at for _, at in runs if at >= killed_at)]
    gap = max(range(1, len(after_kill)), key=lambda i: after_kill[i] - after_kill[i - 1])
    resumed_at = after_kill[gap]
    done_before = len({n for n, at in runs if at < killed_at})
    print(
        f"\nsentinel failover: the sentinels named the new master "
        f"{switched_at - killed_at:.2f}s after the SIGKILL; the first task run from it "
        f"{resumed_at - killed_at:.2f}s after it; {done_before}/{before} ran before it, "
        f"{gap - 1} in between; {len(runs) - len(everything)} ran twice"
    )
    assert done_before < before, "the kill came during the drain"
    results: list[Any] = [result.get(timeout=20) for result in drain.sent]
    assert results == list(range(before + after))
    process.stop()


@pytest.mark.parametrize(
    ("broker", "why"),
    [
        (f"sentinel://:{MASTER_PASSWORD}@127.0.0.1:16422;", "an entry is empty"),
        (
            f"sentinel://:{MASTER_PASSWORD}@127.0.0.1:16422;redis://:{MASTER_PASSWORD}@h:1/0",
            "mixes transports; every entry must be a sentinel:// URL",
        ),
        (
            f"redis://:{MASTER_PASSWORD}@h:1/0;sentinel://:{MASTER_PASSWORD}@127.0.0.1:16422",
            "mixes transports; every entry must be a sentinel:// URL",
        ),
    ],
)
def test_a_bad_sentinel_list_is_refused_masked(tasks_dir: TasksDir, broker: str, why: str) -> None:
    from celeriac.exceptions import ImproperlyConfigured

    tasks_dir.env = worker_env(tasks_dir.queue, broker, broker)
    tasks_dir.write("tasks.py", SENTINEL_TASKS)
    tasks = tasks_dir.import_module()
    with pytest.raises((ValueError, ImproperlyConfigured)) as info:
        tasks.record.delay("k", 1, 0)
    assert why in str(info.value)
    assert MASTER_PASSWORD not in str(info.value)


def test_a_list_without_master_name_is_refused_naming_every_masked_url(
    sentinels: Servers, tasks_dir: TasksDir
) -> None:
    tasks_dir.env = worker_env(tasks_dir.queue, SENTINEL_URL, SENTINEL_URL)
    tasks_dir.write("tasks.py", SENTINEL_TASKS.replace('"master_name": "mymaster",', ""))
    tasks = tasks_dir.import_module()
    with pytest.raises(ValueError, match="master_name") as info:
        tasks.record.delay("k", 1, 0)
    assert MASKED_URL in str(info.value)
    assert MASTER_PASSWORD not in str(info.value)


def test_no_sentinel_naming_the_master_is_retried_masked_then_given_up(
    sentinels: Servers, worker: StartWorker, tasks_dir: TasksDir
) -> None:
    # The first is down; the second knows no "othermaster"; the third refuses the
    # sentinel password.
    broker = (
        f"sentinel://:{MASTER_PASSWORD}@127.0.0.1:{DEAD_PORT}/0;"
        f"sentinel://:{MASTER_PASSWORD}@127.0.0.1:{SENTINEL_PORTS[0]}/0"
    )
    tasks_dir.env = worker_env(tasks_dir.queue, broker, REDIS_URL)
    tasks_dir.write(
        "tasks.py",
        SENTINEL_TASKS.replace('"mymaster"', '"othermaster"')
        + "\napp.conf.broker_connection_max_retries = 1\n",
    )
    process = worker(ready=False, check_exit=False)
    process.wait_for("Trying again", timeout=15)
    process.wait_for("Giving up", timeout=15)
    process.wait(15)
    masked = f"sentinel://:**@127.0.0.1:{DEAD_PORT}/0;sentinel://:**@127.0.0.1:16422/0"
    assert masked in process.log, process.log
    assert 'monitors no master named "othermaster"' in process.log, process.log
    assert MASTER_PASSWORD not in process.log and SENTINEL_PASSWORD not in process.log


def test_a_wrong_sentinel_password_is_a_clear_error(
    sentinels: Servers, tasks_dir: TasksDir
) -> None:
    import celeriac

    tasks_dir.env = worker_env(tasks_dir.queue, SENTINEL_URL, SENTINEL_URL)
    tasks_dir.write("tasks.py", SENTINEL_TASKS.replace(SENTINEL_PASSWORD, "wrong-password"))
    tasks = tasks_dir.import_module()
    with pytest.raises(celeriac.exceptions.OperationalError) as info:
        tasks.record.delay("k", 1, 0)
    text = str(info.value)
    assert "no sentinel of" in text and MASKED_URL in text, text
    assert "authentication failed" in text.lower(), text
    assert "wrong-password" not in text and MASTER_PASSWORD not in text


def test_beats_store_on_sentinel_keeps_its_state_on_the_master(sentinels: Servers) -> None:
    from celeriac import _core

    namespace = f"sentinel-{os.getpid()}-{time.monotonic_ns()}"
    options = {"master_name": "mymaster", "sentinel_kwargs": {"password": SENTINEL_PASSWORD}}
    store = _core.BeatStore(SENTINEL_URL, namespace, timeout=2.0, transport_options=options)
    assert store.register(["every-minute"], 1234) == [1234]
    master = server(master_port())
    try:
        assert master.hget(f"celeriac-beat:{namespace}", "every-minute") is not None
    finally:
        master.delete(f"celeriac-beat:{namespace}")
    with pytest.raises(ValueError, match="master_name") as info:
        _core.BeatStore(SENTINEL_URL, namespace, timeout=2.0)
    assert MASKED_URL in str(info.value) and MASTER_PASSWORD not in str(info.value)
