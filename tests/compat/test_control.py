"""Remote control (pidbox) between celeriac and real Celery 5.7, on Redis and RabbitMQ.

A real ``celery.Celery(...).control`` and the real ``celery`` command line reach a
celeriac worker (solo and prefork: every command, bad input), and celeriac's client and
command line reach a real Celery worker. On RabbitMQ both sides declare the pidbox
exchanges and queues, so a flag that differs would fail here with PRECONDITION_FAILED.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from celeriac import _core, control
from celery import Celery

from compat.conftest import celeriac_cli, celery_cli, node_name

if TYPE_CHECKING:
    from compat.conftest import CompatDir

TIMEOUT = 3.0


def _client(broker: str) -> Any:
    return Celery("control-client", broker=broker, set_as_current=False)


def test_celery_client_controls_celeriac_worker(compat: CompatDir, start_worker: Any) -> None:
    node = node_name()
    worker = start_worker("celeriac", "-n", node)
    client = _client(compat.env["CELERIAC_TEST_BROKER"])
    try:
        assert client.control.ping(destination=[node], timeout=TIMEOUT) == [{node: {"ok": "pong"}}]
        inspect = client.control.inspect(destination=[node], timeout=TIMEOUT)
        registered = inspect.registered()
        assert registered is not None
        assert "compat.add" in registered[node]
        assert not any(name.startswith("celery.") for name in registered[node])
        assert inspect.active() == {node: []}
        assert inspect.reserved() == {node: []}
        assert inspect.scheduled() == {node: []}

        sender = compat.celery_app().app
        add = sender.send_task("compat.add", (2, 3), queue=compat.queue)
        assert add.get(timeout=10) == 5
        stats = inspect.stats()
        assert stats is not None
        assert stats[node]["total"] == {"compat.add": 1}
        assert {"pid", "clock", "uptime", "pool", "broker", "prefetch_count", "rusage"} <= set(
            stats[node]
        )
        broker = stats[node]["broker"]
        assert broker["transport"] in ("redis", "amqp")
        assert "password" not in broker
        queues = inspect.active_queues()
        assert queues is not None
        assert [q["name"] for q in queues[node]] == [compat.queue]
        conf = inspect.conf()
        assert conf is not None
        assert conf[node]["task_default_queue"] == compat.queue

        # An ETA task is "scheduled"; query_task finds it by id.
        later = sender.send_task("compat.add", (1, 1), queue=compat.queue, countdown=30)
        worker.wait_for(rf"Task compat.add\[{later.id}\] received")
        scheduled = inspect.scheduled()
        assert scheduled is not None
        assert [entry["request"]["id"] for entry in scheduled[node]] == [later.id]
        assert scheduled[node][0]["eta"]
        queried = inspect.query_task(later.id)
        assert queried is not None
        assert queried[node][later.id][0] == "scheduled"
        assert inspect.query_task("no-such-id") == {node: {}}

        reply = client.control.rate_limit(
            "compat.add", "10/m", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert reply == [{node: {"ok": "new rate limit set successfully"}}]
        registered = inspect.registered()
        assert registered is not None
        assert "compat.add [rate_limit=10/m]" in registered[node]
        reply = client.control.time_limit(
            "compat.sleep", soft=5, hard=10, destination=[node], reply=True, timeout=TIMEOUT
        )
        assert reply == [{node: {"ok": "time limits set successfully"}}]
        reply = client.control.enable_events(destination=[node], reply=True, timeout=TIMEOUT)
        assert reply == [{node: {"ok": "task events enabled"}}]
        reply = client.control.enable_events(destination=[node], reply=True, timeout=TIMEOUT)
        assert reply == [{node: {"ok": "task events already enabled"}}]
        reply = client.control.disable_events(destination=[node], reply=True, timeout=TIMEOUT)
        assert reply == [{node: {"ok": "task events disabled"}}]
        reply = client.control.broadcast(
            "heartbeat", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert reply == [{node: None}]
        # The solo pool cannot grow: the same error as Celery's solo pool.
        grow = client.control.pool_grow(1, destination=[node], reply=True, timeout=TIMEOUT)
        assert "has no attribute 'grow'" in grow[0][node]["error"]

        # Bad input: Celery's error replies, and the worker goes on.
        bad = client.control.rate_limit(
            "compat.add", "ten", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert bad[0][node]["error"].startswith("Invalid rate limit string: ValueError(")
        unknown = client.control.rate_limit(
            "no.such.task", "1/s", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert unknown == [{node: {"error": "unknown task"}}]
        unknown = client.control.time_limit(
            "no.such.task", soft=1, destination=[node], reply=True, timeout=TIMEOUT
        )
        assert unknown == [{node: {"error": "unknown task"}}]
        nope = client.control.broadcast(
            "no_such_command", destination=[node], reply=True, timeout=TIMEOUT
        )
        assert nope == [{node: {"error": "KeyError('no_such_command')"}}]
        odd = client.control.broadcast(
            "time_limit",
            arguments={"task_name": "compat.add", "soft": "soon"},
            destination=[node],
            reply=True,
            timeout=TIMEOUT,
        )
        assert odd[0][node]["error"].startswith("ValueError(")
        assert client.control.ping(destination=[node], timeout=TIMEOUT) == [{node: {"ok": "pong"}}]

        # shutdown: no reply (as Celery), and the worker stops warm.
        assert client.control.broadcast("shutdown", destination=[node], reply=False) is None
    finally:
        client.close()
    assert worker.wait(20) == 0
    assert "no such control command" in worker.log
    assert "Got shutdown from remote" in worker.log


def test_celery_cli_reaches_celeriac_worker(compat: CompatDir, start_worker: Any) -> None:
    node = node_name()
    start_worker("celeriac", "-n", node)
    ping = celery_cli(compat, "inspect", "ping", "-d", node, "-t", "3")
    assert ping.returncode == 0, ping.stderr
    assert f"->  {node}: OK\n        pong" in ping.stdout
    assert "1 node online." in ping.stdout
    done = celery_cli(compat, "control", "rate_limit", "compat.add", "10/m", "-d", node, "-t", "3")
    assert done.returncode == 0, done.stderr
    assert f"->  {node}: OK\n        new rate limit set successfully" in done.stdout
    registered = celery_cli(compat, "inspect", "registered", "-d", node, "-t", "3")
    assert "* compat.add [rate_limit=10/m]" in registered.stdout
    # celeriac's command line prints the same text for the same replies.
    ours = celeriac_cli(compat, "inspect", "registered", "-d", node, "-t", "3")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == registered.stdout


def test_prefork_worker_answers_once_and_children_apply(
    compat: CompatDir, start_worker: Any
) -> None:
    node = node_name()
    worker = start_worker("celeriac", "-n", node, "-c", "2", pool="prefork")
    client = _client(compat.env["CELERIAC_TEST_BROKER"])
    try:
        # One reply for the node, not one per child.
        assert client.control.ping(timeout=TIMEOUT, destination=[node], limit=None) == [
            {node: {"ok": "pong"}}
        ]
        inspect = client.control.inspect(destination=[node], timeout=TIMEOUT)
        stats = inspect.stats()
        assert stats is not None
        assert len(stats[node]["pool"]["processes"]) == 2
        assert stats[node]["pool"]["max-concurrency"] == 2

        # A task running in a child is listed once, with that child's pid.
        sender = compat.celery_app().app
        sent_at = time.time()
        running = sender.send_task("compat.sleep", (3,), queue=compat.queue)
        worker.wait_for(rf"Task compat.sleep\[{running.id}\] received")
        active: list[Any] = []
        deadline = time.monotonic() + 10
        while not (active and active[0]["time_start"]) and time.monotonic() < deadline:
            got = inspect.active() or {}
            active = got.get(node, [])
        assert [entry["id"] for entry in active] == [running.id]
        assert active[0]["worker_pid"] in stats[node]["pool"]["processes"]
        # When the body started, as Celery gives it: UNIX time (Flower shows it).
        assert sent_at <= active[0]["time_start"] <= time.time()
        assert running.get(timeout=10) == 3

        # A changed time limit reaches the children that run the tasks.
        reply = client.control.time_limit(
            "compat.sleep", soft=0.5, hard=30, destination=[node], reply=True, timeout=TIMEOUT
        )
        assert reply == [{node: {"ok": "time limits set successfully"}}]
        assert len(worker.wait_for("New time limits for tasks of type compat.sleep", count=3)) == 3
        slow = sender.send_task("compat.sleep", (20,), queue=compat.queue)
        with pytest.raises(Exception) as failed:
            slow.get(timeout=20)
        assert type(failed.value).__name__ == "SoftTimeLimitExceeded"

        # The pool grows and shrinks; new children inherit what was changed before.
        grown = client.control.pool_grow(1, destination=[node], reply=True, timeout=TIMEOUT)
        assert grown == [{node: {"ok": "pool will grow"}}]
        processes: list[int] = []
        deadline = time.monotonic() + 15
        while len(processes) != 3 and time.monotonic() < deadline:
            stats = inspect.stats() or {}
            processes = stats.get(node, {}).get("pool", {}).get("processes", [])
        assert len(processes) == 3
        late = sender.send_task("compat.sleep", (20,), queue=compat.queue)
        with pytest.raises(Exception) as failed:
            late.get(timeout=20)
        assert type(failed.value).__name__ == "SoftTimeLimitExceeded"
        shrunk = client.control.pool_shrink(2, destination=[node], reply=True, timeout=TIMEOUT)
        assert shrunk == [{node: {"ok": "pool will shrink"}}]
        deadline = time.monotonic() + 15
        while len(processes) != 1 and time.monotonic() < deadline:
            stats = inspect.stats() or {}
            processes = stats.get(node, {}).get("pool", {}).get("processes", [])
        assert len(processes) == 1
        # shutdown: the whole node stops warm (no reply, as Celery)
        assert client.control.broadcast("shutdown", destination=[node], reply=False) is None
        assert worker.wait(20) == 0
        assert "Got shutdown from remote" in worker.log
    finally:
        client.close()


def test_malformed_pidbox_messages_are_logged(compat: CompatDir, start_worker: Any) -> None:
    node = node_name()
    worker = start_worker("celeriac", "-n", node)
    broker = compat.env["CELERIAC_TEST_BROKER"]
    if broker.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker)
        try:
            client.publish("/0.celery.pidbox", b"not an envelope")
            client.publish(
                "/0.celery.pidbox",
                b'{"body": "bm90IGpzb24=", "properties": '
                b'{"body_encoding": "base64", "delivery_tag": "x"}}',
            )
        finally:
            client.close()
        worker.wait_for("dropped a malformed message")
    else:
        from kombu import Connection, Exchange, Producer

        exchange = Exchange("celery.pidbox", type="fanout", durable=False)
        with Connection(broker) as conn:
            producer = Producer(conn.default_channel, exchange=exchange)
            producer.publish(b"not json", content_type="application/json", routing_key="")
            producer.publish([1, 2], serializer="json", routing_key="")
        worker.wait_for("without a method")
    worker.wait_for("not JSON")
    replies = control.broadcast(compat.celeriac_app().app, "ping", destination=[node], timeout=3)
    assert replies == [{node: {"ok": "pong"}}]


def test_celeriac_client_reaches_celery_worker(compat: CompatDir, start_worker: Any) -> None:
    start_worker("celery")
    app = compat.celeriac_app().app
    deadline = time.monotonic() + 10
    replies: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not any(
        name.startswith("celery-") for r in replies for name in r
    ):
        replies = control.broadcast(app, "ping", timeout=1.0)
    ours = [r for r in replies if next(iter(r)).startswith("celery-")]
    assert ours and all(next(iter(r.values())) == {"ok": "pong"} for r in ours)
    node = next(iter(ours[0]))
    cli = celeriac_cli(compat, "control", "rate_limit", "compat.add", "5/s", "-d", node, "-t", "3")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == f"->  {node}: OK\n        new rate limit set successfully\n"
    stats = celeriac_cli(compat, "inspect", "stats", "-d", node, "-t", "3")
    assert "celery.concurrency.solo:TaskPool" in stats.stdout
    status = celeriac_cli(compat, "status", "-d", node, "-t", "3")
    assert status.stdout == f"->  {node}: OK\n\n1 node online.\n"


def test_mailbox_refuses_a_bad_url() -> None:
    with pytest.raises(ValueError):
        _core.Mailbox("bogus://nowhere")


def test_events_dump_shows_celery_and_celeriac_workers(
    compat: CompatDir, start_worker: Any
) -> None:
    """``celeriac events --dump`` prints what Celery's dumper prints, for a Celery
    worker and a celeriac worker alike."""
    from conftest import WorkerProcess

    dump = WorkerProcess(
        [sys.executable, "-m", "celeriac", "-A", "compat_tasks", "events", "--dump"],
        compat.path,
        compat.env,
    )
    try:
        dump.wait_for("-> evdump: starting capture...", timeout=15)
        node = node_name()
        start_worker("celeriac", "-n", node, "-E")
        start_worker("celery", "-E")
        sender = compat.celery_app().app
        result = sender.send_task("compat.add", (20, 22), queue=compat.queue)
        assert result.get(timeout=10) == 42
        dump.wait_for(rf"^{node} \[.*\] started: ", timeout=15)
        # The Celery worker runs --without-heartbeat: ask it for one (remote control).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "] heartbeat: " not in "\n".join(
            line for line in dump.lines if line.startswith("celery-")
        ):
            control.broadcast(compat.celeriac_app().app, "heartbeat", reply=False)
            time.sleep(0.5)
        dump.wait_for(r"^celery-\w+@\S+ \[.*\] heartbeat: .*sw_ident=py-celery", timeout=1)
        dump.wait_for(
            rf"\] task received: compat.add\({result.id}\) args=\(20, 22\) kwargs=\{{\}}",
            timeout=15,
        )
        dump.wait_for(rf"\] task succeeded: compat.add\({result.id}\) .*result=42", timeout=15)
    finally:
        dump.signal(2)  # Ctrl-C: a clean stop
        assert dump.wait(15) == 0
    assert "Traceback" not in dump.log


def test_purge_on_both_brokers(compat: CompatDir) -> None:
    sender = compat.celery_app().app
    for x in range(2):
        sender.send_task("compat.add", (x, 1), queue=compat.queue)
    purged = celeriac_cli(compat, "purge", "-f", "-Q", compat.queue)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == "Purged 2 messages from 1 known task queue.\n"
    empty = celeriac_cli(compat, "purge", "-f", "-Q", compat.queue)
    assert empty.stdout == "No messages purged from 1 queue.\n"
    missing = celeriac_cli(compat, "purge", "-f", "-Q", f"{compat.queue}-missing")
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout == "No messages purged from 1 queue.\n"


def test_amqp_pidbox_queues_match_celery(compat: CompatDir, start_worker: Any) -> None:
    """A celeriac node's pidbox queue has the flags and arguments of a Celery node's
    (exclusive, auto-delete, x-expires, x-message-ttl): a mixed fleet agrees."""
    import shutil

    if not compat.env["CELERIAC_TEST_BROKER"].startswith("amqp"):
        pytest.skip("AMQP declarations")
    rabbitmqctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    node = node_name()
    start_worker("celeriac", "-n", node)
    start_worker("celery")
    listed = subprocess.run(
        [
            rabbitmqctl,
            "-q",
            "list_queues",
            "name",
            "durable",
            "auto_delete",
            "exclusive",
            "arguments",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if listed.returncode != 0:
        pytest.skip(f"rabbitmqctl cannot list queues here: {listed.stderr.strip()}")
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    ours = [row[1:] for row in rows if row[0] == f"{node}.celery.pidbox"]
    theirs = [
        row[1:]
        for row in rows
        if row[0].startswith("celery-") and row[0].endswith(".celery.pidbox")
    ]
    assert ours, listed.stdout
    assert theirs, listed.stdout
    assert ours[0] == theirs[0]
    assert ours[0][:3] == ["false", "true", "true"]
    # rabbitmqctl itself fails now and then on a loaded machine (its Erlang node cannot
    # reach the broker's in time): ask again rather than read an empty list as the answer
    for _ in range(3):
        listed = subprocess.run(
            [rabbitmqctl, "-q", "list_exchanges", "name", "type", "durable", "auto_delete"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if listed.returncode == 0:
            break
    assert listed.returncode == 0, listed.stderr
    exchanges = listed.stdout.splitlines()
    assert "celery.pidbox\tfanout\tfalse\tfalse" in exchanges
    assert "reply.celery.pidbox\tdirect\tfalse\tfalse" in exchanges


def test_celery_worker_mingles_with_celeriac_worker(compat: CompatDir, start_worker: Any) -> None:
    """A Celery worker starting with mingle (its default) asks the celeriac worker for
    its revoked ids (``hello``) and keeps them."""
    from conftest import READY_TIMEOUT, WorkerProcess

    from compat.conftest import celery_argv

    node = node_name()
    start_worker("celeriac", "-n", node)
    app = compat.celeriac_app().app
    revoked_id = str(uuid.uuid4())
    replies = control.broadcast(
        app, "revoke", {"task_id": revoked_id}, destination=[node], timeout=TIMEOUT
    )
    assert replies == [{node: {"ok": f"tasks {{'{revoked_id}'}} flagged as revoked"}}]
    argv = [arg for arg in celery_argv("celery_tasks", compat.queue) if arg != "--without-mingle"]
    celery = WorkerProcess(argv, compat.path, compat.env)
    try:
        celery.wait_for(r" ready\.", timeout=READY_TIMEOUT)
        assert "mingle: sync with" in celery.log
        assert "mingle: sync complete" in celery.log
        assert "sync with" in celery.log and "failed" not in celery.log
        celery_node = argv[argv.index("-n") + 1].replace("%h", socket.gethostname())
        # Celery's worker subscribes to its pidbox a moment after "ready." on Redis.
        replies: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not replies and time.monotonic() < deadline:
            replies = control.broadcast(app, "revoked", destination=[celery_node], timeout=1)
        assert replies, celery.log
        assert revoked_id in replies[0][celery_node], (replies, celery.log)
    finally:
        assert celery.stop() == 0


def test_amqp_client_keeps_one_connection(compat: CompatDir) -> None:
    """Repeated broadcasts from one process share one AMQP connection (as kombu's
    producer pool); nothing is left open per call."""
    import os
    import shutil

    if not compat.env["CELERIAC_TEST_BROKER"].startswith("amqp"):
        pytest.skip("AMQP connections")
    rabbitmqctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"

    def ours() -> list[str]:
        listed = subprocess.run(
            [rabbitmqctl, "-q", "list_connections", "client_properties"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if listed.returncode != 0:
            pytest.skip(f"rabbitmqctl cannot list connections here: {listed.stderr.strip()}")
        mine = f"pid {os.getpid()})"
        return [line for line in listed.stdout.splitlines() if mine in line and "pidbox" in line]

    before = ours()
    app = compat.celeriac_app().app
    for _ in range(5):
        assert control.broadcast(app, "ping", destination=["nobody@nowhere"], timeout=0.2) == []
    after = ours()
    assert len(after) - len(before) <= 1, (before, after)
