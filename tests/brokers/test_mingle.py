"""Mingle on a real worker (Redis broker and backend): a worker starting up asks the
running ones for their revoked ids (remote control's ``hello``), so a task revoked
before it started is not run by it either; ``--without-mingle`` skips that.

Worker A is up and hears the revoke of an id no message has yet; worker B starts on
the same queue and syncs with A; A is stopped, so only B can take the task; then a
message with that id is sent. Every wait is bounded; nothing asserts on speed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import app_module, wait_until
from conftest import task_meta as stored

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir, WorkerProcess

pytestmark = pytest.mark.redis

MTASKS_PY = app_module(
    "mtasks",
    """

@app.task
def mark(key):
    client().incr(key)
    client().expire(key, 60)
    return True
""",
    redis_client=True,
)


@pytest.fixture
def mtasks(tasks_dir: TasksDir) -> TasksDir:
    tasks_dir.write("mtasks.py", MTASKS_PY)
    return tasks_dir


def _node(role: str) -> str:
    """A node name of its own: other workers on this Redis must not answer our tests."""
    return f"mingle-{role}-{uuid.uuid4().hex[:8]}@test"


def _revoke_on(tasks: Any, node: str, task_id: str) -> None:
    replies = tasks.app.control.revoke(task_id, [node], reply=True, timeout=3)
    assert replies == [{node: {"ok": f"tasks {{'{task_id}'}} flagged as revoked"}}], replies


def _revoked_on(tasks: Any, node: str) -> list[str]:
    replies = tasks.app.control.broadcast("revoked", destination=[node], reply=True, timeout=3)
    assert replies and node in replies[0], replies
    ids: list[str] = replies[0][node]
    return ids


def _line_index(process: WorkerProcess, text: str) -> int:
    lines = process.log.splitlines()
    return next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_task_revoked_before_the_worker_started_is_not_run(
    worker: StartWorker,
    mtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
    pool: str,
) -> None:
    tasks = mtasks.import_module("mtasks")
    node_a, node_b = _node("a"), _node("b")
    a = worker("-n", node_a, pool="solo", app="mtasks")
    revoked_id = result_keys.add(str(uuid.uuid4()))
    _revoke_on(tasks, node_a, revoked_id)

    concurrency = ("-c", "2") if pool == "prefork" else ()
    b = worker(*concurrency, "-n", node_b, pool=pool, app="mtasks")
    b.wait_for(r"mingle: sync with \d+ nodes", timeout=10)
    b.wait_for(r"mingle: sync complete", timeout=5)
    # Start-up was not held up for the replies: "ready." came first.
    searching = _line_index(b, "mingle: searching for neighbors")
    ready = _line_index(b, f"{node_b} ready.")
    assert searching < ready < _line_index(b, "mingle: sync with"), b.log
    assert "failed" not in b.log
    assert revoked_id in _revoked_on(tasks, node_b)
    assert a.stop() == 0

    key = scratch("ran")
    # Several messages with the id: in prefork they reach both children.
    sends = 4 if pool == "prefork" else 1
    for _ in range(sends):
        tasks.mark.apply_async((key,), task_id=revoked_id)
    b.wait_for(rf"Discarding revoked task: mtasks\.mark\[{revoked_id}\]", count=sends)
    meta = stored(redis_client, revoked_id)
    assert meta["status"] == "REVOKED", meta
    assert meta["result"]["exc_type"] == "TaskRevokedError"
    # B keeps serving, and the revoked one never ran.
    after = tasks.mark.delay(key)
    result_keys.add(after.id)
    assert after.get(timeout=10) is True
    assert int(redis_client.get(key) or 0) == 1
    assert f"mtasks.mark[{revoked_id}] succeeded" not in b.log


def test_without_mingle_the_worker_does_not_know_earlier_revokes(
    worker: StartWorker,
    mtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Any,
) -> None:
    tasks = mtasks.import_module("mtasks")
    node_a, node_b = _node("a"), _node("b")
    a = worker("-n", node_a, pool="solo", app="mtasks")
    revoked_id = result_keys.add(str(uuid.uuid4()))
    _revoke_on(tasks, node_a, revoked_id)
    b = worker("-n", node_b, "--without-mingle", pool="solo", app="mtasks")
    # Mingle starts (and says so) before "ready.": past that line, it never will.
    assert "mingle:" not in b.log
    assert _revoked_on(tasks, node_b) == []
    assert a.stop() == 0
    key = scratch("ran")
    tasks.mark.apply_async((key,), task_id=revoked_id)
    # A stored REVOKED when the revoke came (as Celery 5.7); B runs the task over it.
    b.wait_for(rf"Task mtasks\.mark\[{revoked_id}\] succeeded", timeout=10)
    assert int(redis_client.get(key) or 0) == 1
    assert wait_until(lambda: stored(redis_client, revoked_id).get("status") == "SUCCESS")


def test_a_worker_alone_starts_as_usual(
    worker: StartWorker, mtasks: TasksDir, result_keys: ResultKeys, scratch: Any
) -> None:
    """No other worker answers to its name: it logs that it is alone or synced with
    whatever else runs on this Redis, and serves."""
    node = _node("alone")
    process = worker("-n", node, pool="threads", app="mtasks")
    process.wait_for(r"mingle: (all alone|sync complete)", timeout=10)
    tasks = mtasks.import_module("mtasks")
    result = tasks.mark.delay(scratch("alone"))
    result_keys.add(result.id)
    assert result.get(timeout=10) is True


def test_a_worker_stopped_while_mingling_waits_for_the_mingle_thread(
    worker: StartWorker, mtasks: TasksDir
) -> None:
    """Stopped at once after ``ready.``, the worker lets its mingle thread end (it
    waits for replies inside the extension) before the interpreter exits: a thread
    left there was ended by the exit (pthread_exit) and the Zig-built wheel crashed."""
    process = worker("-n", _node("stopped"), app="mtasks")
    assert process.stop() == 0
    lines = process.log.splitlines()
    ended = [
        i for i, line in enumerate(lines) if re.search(r"mingle: (all alone|sync complete)", line)
    ]
    assert ended, process.log
    assert ended[0] < _line_index(process, "stopped."), process.log


# -- again after a lost connection --------------------------------------------------------


def _tcp_peers_of(pid: int) -> set[str]:
    """``ip:port`` of the local end of every TCP socket process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ends = set()
    with open(f"/proc/{pid}/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[9] in inodes:
                ip_hex, port_hex = fields[1].split(":")
                ip = socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1])
                ends.add(f"{ip}:{int(port_hex, 16)}")
    return ends


def _kill_subscriptions_of(redis_client: redis.Redis, pid: int) -> int:
    """Close, on the Redis server, the worker's subscribed connections only (its
    mailbox); the number closed."""
    ours = _tcp_peers_of(pid)
    killed = 0
    for client in redis_client.client_list():
        if client["addr"] in ours and int(client.get("psub", 0)) > 0:
            killed += int(redis_client.client_kill_filter(_id=client["id"]))
    return killed


def _hello_from(pubsub: Any, node: str, timeout: float = 10.0) -> bool:
    """Whether ``node`` broadcast a hello (read off the pidbox channel, bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message is None or message["type"] != "pmessage":
            continue
        envelope = json.loads(message["data"])
        body = json.loads(base64.b64decode(envelope["body"]))
        if body.get("method") == "hello" and (body.get("arguments") or {}).get("from_node") == node:
            return True
    return False


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_worker_mingles_again_after_its_broker_connection_dropped(
    worker: StartWorker,
    mtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    pool: str,
) -> None:
    """As Celery's consumer restarting after a connection loss: the worker's mailbox
    missed what was broadcast while it was away, so it says hello again. Worker B
    learns a revoke that only A ever heard (sent to A alone after B started): the
    second hello's reply from A is the only way it can."""
    tasks = mtasks.import_module("mtasks")
    node_a, node_b = _node("a"), _node("b")
    pubsub = redis.Redis(host="127.0.0.1", port=6379, db=0).pubsub()
    pubsub.psubscribe("/0.celery.pidbox*")
    try:
        worker("-n", node_a, pool="solo", app="mtasks")
        concurrency = ("-c", "2") if pool == "prefork" else ()
        b = worker(*concurrency, "-n", node_b, pool=pool, app="mtasks")
        assert _hello_from(pubsub, node_b)
        b.wait_for(r"mingle: sync complete", timeout=10)
        revoked_id = result_keys.add(str(uuid.uuid4()))
        _revoke_on(tasks, node_a, revoked_id)  # A alone
        assert revoked_id not in _revoked_on(tasks, node_b)

        assert _kill_subscriptions_of(redis_client, b.proc.pid) == 1
        b.wait_for(r"pidbox: reconnected to redis://", timeout=15)
        assert _hello_from(pubsub, node_b), "no second hello"
        b.wait_for(r"mingle: sync complete", timeout=10, count=2)
        assert revoked_id in _revoked_on(tasks, node_b)
    finally:
        pubsub.close()


def _close_rabbitmq_connection(named: str) -> None:
    """Close, on the RabbitMQ server, the one connection whose client calls itself
    ``named`` (celeriac names each of its connections with its role and pid)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = [
        line.split("\t", 1)[0]
        for line in listed.stdout.splitlines()
        if f'{{"connection_name","{named}"}}' in line
    ]
    assert len(found) == 1, (named, listed.stdout)
    subprocess.run(
        ["rabbitmqctl", "close_connection", found[0], "test: the broker drops the worker"],
        capture_output=True,
        timeout=60,
        check=True,
    )


def test_a_worker_mingles_again_after_rabbitmq_closed_its_connection(
    on_rabbitmq: str, worker: StartWorker, mtasks: TasksDir, result_keys: ResultKeys
) -> None:
    """The same on RabbitMQ: the server closes the worker's remote-control connection."""
    tasks = mtasks.import_module("mtasks")
    node_a, node_b = _node("a"), _node("b")
    worker("-n", node_a, pool="solo", app="mtasks")
    b = worker("-n", node_b, pool="solo", app="mtasks")
    b.wait_for(r"mingle: sync complete", timeout=10)
    revoked_id = result_keys.add(str(uuid.uuid4()))
    _revoke_on(tasks, node_a, revoked_id)  # A alone
    assert revoked_id not in _revoked_on(tasks, node_b)

    _close_rabbitmq_connection(f"celeriac pidbox subscription (pid {b.proc.pid})")
    b.wait_for(r"pidbox: reconnected to amqp://", timeout=15)
    b.wait_for(r"mingle: searching for neighbors", timeout=10, count=2)
    b.wait_for(r"mingle: sync complete", timeout=10, count=2)
    assert revoked_id in _revoked_on(tasks, node_b)
