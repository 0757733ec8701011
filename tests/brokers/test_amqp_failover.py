"""RabbitMQ failover: a `;`-separated broker URL list, a node stopped during a drain.

A RabbitMQ node of this test's own is started by the ``node`` fixture on 127.0.0.1:5680
(distribution port 25680), in a temporary directory, and stopped by pid; the list names it
first and the shared node on 5672 second (not a cluster: each has its own queues). The
shared node is never stopped. Results and the record of which task ran go to the real
Redis.

What is guaranteed, and checked here, when the node a worker and a client are connected
to stops (acks_late tasks, publisher confirms):
- the client and the worker move to the next node of the list and go on there: every
  task sent after the stop runs, once;
- a task confirmed by the stopped node stays on its disk (durable queue, persistent
  message): it is not lost, but runs only when that node is back; the only ones run
  twice are those in the worker's prefetch window at the stop (run, ack not yet sent).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from conftest import (
    AMQP_URL,
    REDIS_URL,
    app_module,
    delete_amqp,
    recorded_runs,
    wait_until,
    worker_env,
)
from kombu import Connection

if TYPE_CHECKING:
    from conftest import Scratch, StartWorker, TasksDir

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
#: Bounds: a node's start on a loaded 2-core machine, its graceful stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
#: The worker's prefetch window (solo pool: worker_prefetch_multiplier 4 x 1).
PREFETCH = 4
#: The stream's numbers stay below this; the batch sent after the stop starts there.
STREAM_MAX = 1_000_000

FAILOVER_TASKS = app_module(
    "tasks",
    """
app.conf.task_acks_late = True
app.conf.task_ignore_result = True
app.conf.broker_connection_timeout = 2.0


@app.task
def record(key, number, pause):
    client().rpush(key, f"{number} {time.time()}")
    time.sleep(pause)
""",
    imports=("import time",),
    redis_client=True,
)


class Node:
    """A RabbitMQ node of this test's own, in ``base``, on ``port`` (AMQP)."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.name = f"celeriac-failover-{os.getpid()}-{port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{port}//"
        self.proc: subprocess.Popen[bytes] | None = None
        base.mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[].\n")

    def env(self) -> dict[str, str]:
        base = str(self.base)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=base,  # its own Erlang cookie
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.port + 20000),
            RABBITMQ_CONFIG_FILE=f"{base}/rabbitmq.conf",
            RABBITMQ_CONF_ENV_FILE=f"{base}/rabbitmq-env.conf",
            RABBITMQ_ENABLED_PLUGINS_FILE=f"{base}/enabled_plugins",
            RABBITMQ_MNESIA_BASE=f"{base}/mnesia",
            RABBITMQ_LOG_BASE=f"{base}/log",
            RABBITMQ_PID_FILE=f"{base}/pid",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
            # The script then execs the VM: our pid is the node's.
            RUNNING_UNDER_SYSTEMD="1",
        )
        return env

    def start(self) -> None:
        if self.accepts():
            pytest.fail(f"port {self.port} is taken: another test run's node?", pytrace=False)
        with open(self.base / "out.log", "ab") as out:
            self.proc = subprocess.Popen(
                [RABBITMQ_SERVER],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            if self.accepts():
                with contextlib.suppress(Exception), Connection(self.url, connect_timeout=2) as c:
                    c.connect()
                    return
            time.sleep(0.1)
        log = (self.base / "out.log").read_text(errors="replace")[-3000:]
        self.kill()
        pytest.fail(f"RabbitMQ node {self.name} did not start:\n{log}", pytrace=False)

    def accepts(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        """A graceful stop (SIGTERM, what `rabbitmqctl stop` does), bounded; then
        SIGKILL."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def terminate(self) -> None:
        """SIGTERM, not waiting: the node stops in a second or so."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.proc = None

    def ready_count(self, queue: str) -> int:
        with Connection(self.url, connect_timeout=5) as conn:
            _, ready, _ = conn.default_channel.queue_declare(queue, passive=True)
        return int(ready)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    own = Node(tmp_path_factory.mktemp("rabbit"), 5680)
    try:
        own.start()
        own.wait_up()
        yield own
    finally:
        own.stop()


def test_a_node_stopped_during_a_drain_the_worker_and_client_go_on_on_the_next(
    node: Node,
    worker: StartWorker,
    tasks_dir: TasksDir,
    redis_client: redis.Redis,
    scratch: Scratch,
) -> None:
    first = node
    tasks_dir.env = worker_env(tasks_dir.queue, f"{first.url};{AMQP_URL}", REDIS_URL)
    try:
        _stop_the_first_during_a_drain(first, worker, tasks_dir, redis_client, scratch)
    finally:
        # The first node's queue is removed with the node's directory.
        delete_amqp(AMQP_URL, tasks_dir.queue)


def _stop_the_first_during_a_drain(
    first: Node,
    worker: StartWorker,
    tasks_dir: TasksDir,
    redis_client: redis.Redis,
    scratch: Scratch,
) -> None:
    tasks_dir.write("tasks.py", FAILOVER_TASKS)
    key = scratch("ran")
    process = worker()
    tasks = tasks_dir.import_module()
    before, after = 200, 50
    for number in range(before):
        tasks.record.delay(key, number, 0.02)
    tasks.app.producer.flush(10.0)  # every one confirmed by the first node
    assert wait_until(lambda: redis_client.llen(key) >= 20, timeout=15), process.log

    stopped_at = time.time()
    first.stop()  # during the drain
    gone_at = time.time()
    for number in range(before, before + after):
        tasks.record.delay(key, number, 0.0)
    tasks.app.producer.flush(15.0)  # confirmed by the shared node
    assert wait_until(
        lambda: (
            {n for n, _ in recorded_runs(redis_client, key)} >= set(range(before, before + after))
        ),
        timeout=20,
    ), process.log
    runs = recorded_runs(redis_client, key)
    resumed_at = min(at for n, at in runs if n >= before)
    old = [n for n, _ in runs if n < before]
    new = [n for n, _ in runs if n >= before]
    print(
        f"\nfailover: graceful stop took {gone_at - stopped_at:.2f}s; the first task sent "
        f"after it ran {resumed_at - gone_at:.2f}s later ({resumed_at - stopped_at:.2f}s "
        f"after SIGTERM); {len(set(old))}/{before} drained before the stop"
    )
    assert sorted(new) == list(range(before, before + after)), "each once"
    assert len(set(old)) < before, "the stop came during the drain"

    # The first node back: what it had confirmed and the worker had not acked is there.
    first.start()
    first.wait_up()
    waiting = first.ready_count(tasks_dir.queue)
    done = len(set(old))
    assert waiting + done >= before, f"lost: {before - waiting - done} tasks"
    assert waiting + done - before <= PREFETCH, "only the prefetch window is run again"
    assert len(old) == done, "no task of the stopped node ran twice while it was down"
    process.stop()


def test_a_list_whose_first_host_is_down_gets_ready_on_the_next_and_masks_every_password(
    worker: StartWorker, tasks_dir: TasksDir
) -> None:
    # Port 1 refuses connections; the second entry is the shared node.
    broker = f"amqp://guest:firstsecret@127.0.0.1:1//;{AMQP_URL}"
    tasks_dir.env = worker_env(tasks_dir.queue, broker, REDIS_URL)
    try:
        process = worker()
        tasks = tasks_dir.import_module()
        assert tasks.add.delay(2, 3).get(timeout=10) == 5
        process.wait_for(
            r"amqp://guest:\*\*@127\.0\.0\.1:1//;amqp://guest:\*\*@127\.0\.0\.1:5672//"
        )
        process.stop()
        assert "firstsecret" not in process.log
        assert ":guest@" not in process.log
    finally:
        delete_amqp(AMQP_URL, tasks_dir.queue)


def test_retry_lines_mask_every_password_of_the_list(
    worker: StartWorker, tasks_dir: TasksDir
) -> None:
    # Ports 1 and 2 refuse connections: the worker retries, then gives up.
    broker = "amqp://guest:firstsecret@127.0.0.1:1//;amqp://other:secondsecret@127.0.0.1:2/v"
    tasks_dir.env = worker_env(tasks_dir.queue, broker, REDIS_URL)
    tasks_dir.write(
        "tasks.py", app_module("tasks", "\napp.conf.broker_connection_max_retries = 1\n")
    )
    process = worker(ready=False, check_exit=False)
    process.wait_for("Trying again", timeout=15)
    process.wait_for("Giving up", timeout=15)
    process.wait(15)
    assert "amqp://other:**@127.0.0.1:2/v" in process.log, process.log
    assert "secret" not in process.log, process.log


@pytest.fixture
def first(node: Node, tasks_dir: TasksDir) -> Iterator[Node]:
    """The test's own node, up (an earlier test may have failed with it stopped) before
    and after; this test's queues are removed from the shared node afterwards."""
    try:
        if node.proc is None:
            node.start()
            node.wait_up()
        yield node
    finally:
        if node.proc is None:
            node.start()
            node.wait_up()
        added = f"{tasks_dir.queue}.added"
        delete_amqp(AMQP_URL, tasks_dir.queue, added, f"{added}.2")


def test_the_outbox_is_sent_again_on_the_next_node_none_of_the_delayed_tasks_is_lost(
    scratch: Scratch,
    first: Node,
    tasks_dir: TasksDir,
    worker: StartWorker,
    redis_client: redis.Redis,
) -> None:
    """A client with the list streams tasks; the first node is stopped mid-stream and a
    batch is sent at once while it stops, before the client can have noticed it. A
    worker on the second node only runs what reaches that node; once the first node is
    back, a worker on it runs what it had confirmed. Every task ``delay`` returned for
    runs: what the first node had not confirmed was written again on the second."""
    tasks_dir.write("tasks.py", FAILOVER_TASKS)
    key = scratch("ran")
    tasks_dir.env = worker_env(tasks_dir.queue, AMQP_URL, REDIS_URL)
    on_second = worker()
    tasks_dir.env = worker_env(tasks_dir.queue, f"{first.url};{AMQP_URL}", REDIS_URL)
    tasks = tasks_dir.import_module()
    tasks.record.delay(key, 0, 0.0)  # connected to the first node
    returned: list[int] = [0]
    refused: list[str] = []
    stopping = threading.Event()

    def stream() -> None:
        number = 1
        while not stopping.is_set() and number < STREAM_MAX:
            try:
                tasks.record.delay(key, number, 0.0)
                returned.append(number)
            except Exception as exc:  # refused, not lost: delay did not return
                refused.append(f"{number}: {exc}")
            number += 1
            time.sleep(0.002)

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    assert wait_until(lambda: len(returned) >= 500, timeout=30), refused[-3:]
    first.terminate()  # mid-stream
    batch = list(range(STREAM_MAX, STREAM_MAX + 200))
    for number in batch:  # at once, to the node that is stopping
        tasks.record.delay(key, number, 0.0)
    returned.extend(batch)
    first.stop()
    time.sleep(2.0)  # the stream goes on, on the second node
    stopping.set()
    streamer.join(30)
    tasks.app.producer.flush(30.0)
    sent = set(returned)

    # The first node back: a worker there runs what it had confirmed before the stop.
    first.start()
    first.wait_up()
    tasks_dir.env = worker_env(tasks_dir.queue, first.url, REDIS_URL)
    on_first = worker()
    assert wait_until(
        lambda: {n for n, _ in recorded_runs(redis_client, key)} >= sent, timeout=60
    ), f"lost: {sorted(sent - {n for n, _ in recorded_runs(redis_client, key)})[:20]}"
    on_first.stop()
    on_second.stop()
    runs = [n for n, _ in recorded_runs(redis_client, key)]
    twice = len(runs) - len(set(runs))
    print(
        f"\noutbox at failover: {len(sent)} tasks delay() returned for ({len(batch)} right "
        f"as the stop began), {len(refused)} refused; all ran, {twice} twice "
        f"(written again on the second node after the first had them)"
    )
    assert set(runs) == sent, "nothing ran that was not sent"


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_queue_added_at_run_time_is_consumed_on_the_next_node_after_a_failover(
    first: Node,
    worker: StartWorker,
    tasks_dir: TasksDir,
    redis_client: redis.Redis,
    scratch: Scratch,
    pool: str,
) -> None:
    added = f"{tasks_dir.queue}.added"
    tasks_dir.write("tasks.py", FAILOVER_TASKS)
    tasks_dir.env = worker_env(tasks_dir.queue, f"{first.url};{AMQP_URL}", REDIS_URL)
    key = scratch("ran")
    node = f"{tasks_dir.queue}@localhost"
    process = worker("-n", node, *(("-c", "2") if pool == "prefork" else ()), pool=pool)
    tasks = tasks_dir.import_module()

    def add_consumer(queue: str) -> None:
        replies = tasks.app.control.broadcast(
            "add_consumer", {"queue": queue}, destination=[node], reply=True, timeout=5
        )
        assert replies == [{node: {"ok": f"add consumer {queue}"}}], process.log

    add_consumer(added)
    tasks.record.apply_async((key, 1, 0.0), queue=added)
    assert wait_until(lambda: redis_client.llen(key) >= 1, timeout=15), process.log

    first.stop()
    # The client fails over too; the worker consumes the added queue there.
    tasks.record.apply_async((key, 2, 0.0), queue=added)
    tasks.record.delay(key, 3, 0.0)
    tasks.app.producer.flush(15.0)
    assert wait_until(
        lambda: {n for n, _ in recorded_runs(redis_client, key)} >= {1, 2, 3}, timeout=30
    ), process.log
    # Remote control reached on the next node: a queue added there is consumed.
    add_consumer(f"{added}.2")
    tasks.record.apply_async((key, 4, 0.0), queue=f"{added}.2")
    assert wait_until(
        lambda: {n for n, _ in recorded_runs(redis_client, key)} >= {1, 2, 3, 4}, timeout=30
    ), process.log
    process.stop()
