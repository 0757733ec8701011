"""Bad input, against the real Redis: the worker logs why, drops or rejects, and keeps
serving; a bad argument fails at the call site; a bad or dead broker fails clearly."""

from __future__ import annotations

import base64
import json
import re
import signal
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import REDIS_HOST, REDIS_PORT, queue_length, wait_until

if TYPE_CHECKING:
    from conftest import ResultKeys, RunCli, StartWorker, TasksDir, WorkerProcess

    StartCli = Any

pytestmark = pytest.mark.redis


def unacked_for(client: redis.Redis, tags: list[str]) -> list[str]:
    if not tags:
        return []
    values = client.hmget("unacked", tags)
    return [tag for tag, value in zip(tags, values, strict=True) if value is not None]


def envelope(queue: str, *, body: str, headers: dict[str, Any] | None, **props: Any) -> bytes:
    tag = str(uuid.uuid4())
    message: dict[str, Any] = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": props.pop("content_type", "application/json"),
    }
    if headers is not None:
        message["headers"] = headers
    message["properties"] = {
        "correlation_id": (headers or {}).get("id", tag),
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": tag,
        **props,
    }
    return json.dumps(message).encode()


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def dropped_and_still_serving(
    worker: StartWorker,
    tasks_dir: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    garbage: list[bytes],
) -> tuple[WorkerProcess, list[str]]:
    """Queue ``garbage``, start a worker, see a task sent after it run, and return the
    reason logged for each message dropped."""
    # RPUSH: consumed in this order, before anything sent later
    redis_client.rpush(tasks_dir.queue, *garbage)
    process = worker()
    tasks = tasks_dir.import_module()
    result = tasks.add.delay(20, 22)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 42
    lines = process.wait_for(
        r"ERROR/MainProcess\] Received invalid task message: .+\. The message has been dropped",
        count=len(garbage),
    )
    return process, [line.split("Received invalid task message: ", 1)[1] for line in lines]


def test_unknown_task_name(
    worker: StartWorker,
    tasks_dir: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
) -> None:
    process = worker()
    tasks = tasks_dir.import_module()
    result = tasks.app.send_task("nope", args=(1, 2))
    result_keys.add(result.id)
    with pytest.raises(KeyError) as raised:  # NotRegistered is a KeyError, as in Celery
        result.get(timeout=10)
    assert type(raised.value).__name__ == "NotRegistered"
    assert result.state == "FAILURE"
    stored = json.loads(redis_client.get(f"celery-task-meta-{result.id}") or b"{}")
    assert stored["result"] == {
        "exc_type": "NotRegistered",
        "exc_message": ["nope"],
        "exc_module": "celery.exceptions",
    }
    process.wait_for(r"ERROR/MainProcess\] Received unregistered task of type 'nope'\.")
    follow = tasks.add.delay(1, 2)
    result_keys.add(follow.id)
    assert follow.get(timeout=10) == 3
    assert queue_length(redis_client, tasks_dir.queue) == 0


def test_garbage_messages_are_logged_and_dropped(
    worker: StartWorker,
    tasks_dir: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
) -> None:
    queue = tasks_dir.queue
    task_id = str(uuid.uuid4())
    good_headers = {"lang": "py", "task": "tasks.add", "id": task_id, "root_id": task_id}
    garbage = {
        "not json": b"\x00this is not json",
        "json list": b"[1, 2, 3]",
        "no properties": json.dumps({"body": b64([[1, 2], {}, {}]), "headers": {}}).encode(),
        "bad base64": envelope(queue, body="!!!not base64!!!", headers=good_headers),
        "no headers": envelope(queue, body=b64([[1, 2], {}, {}]), headers=None),
        "no task header": envelope(queue, body=b64([[1, 2], {}, {}]), headers={"id": "x"}),
        "body wrong shape": envelope(queue, body=b64({"args": "no"}), headers=good_headers),
        "bad eta": envelope(
            queue,
            body=b64([[1, 2], {}, {}]),
            headers={**good_headers, "eta": "next tuesday"},
        ),
        "pickle": envelope(
            queue,
            body=b64([[1, 2], {}, {}]),
            headers=good_headers,
            content_type="application/x-python-serialize",
        ),
    }
    tags = [
        json.loads(raw)["properties"]["delivery_tag"]
        for raw in garbage.values()
        if raw.startswith(b"{") and b"delivery_tag" in raw
    ]
    _, reasons = dropped_and_still_serving(
        worker, tasks_dir, result_keys, redis_client, list(garbage.values())
    )
    for reason in reasons:
        assert len(reason.split(". The message")[0]) > 5, reason
    assert queue_length(redis_client, queue) == 0
    assert wait_until(lambda: not unacked_for(redis_client, tags)), unacked_for(redis_client, tags)
    assert redis_client.get(f"celery-task-meta-{task_id}") is None


def test_unserializable_argument_fails_at_the_call_site(
    tasks_dir: TasksDir, redis_client: redis.Redis
) -> None:
    tasks = tasks_dir.import_module()
    with pytest.raises(TypeError, match="object"):
        tasks.add.delay(object(), 1)
    with pytest.raises(TypeError):
        tasks.add.apply_async((1,), {"y": {1, 2}})
    # a valid message still goes out, and it is the only one in the queue
    tasks.add.delay(1, 1)
    tasks.app.producer.flush()
    assert queue_length(redis_client, tasks_dir.queue) == 1


def test_bad_broker_url(run_cli: RunCli) -> None:
    result = run_cli("-A", "tasks", "-b", "redis://:secret@localhost:notaport/0", "worker")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "secret" not in output
    assert "**@localhost" in output
    assert "Cannot connect to" in result.stderr
    assert "ready." not in output


def test_broker_down_at_start_retries_then_stops(start_cli: StartCli) -> None:
    process: WorkerProcess = start_cli(
        "-A", "tasks", "-b", "redis://127.0.0.1:1/0", "worker", "-l", "info"
    )
    lines = process.wait_for(
        r"ERROR/MainProcess\] consumer: Cannot connect to redis://127\.0\.0\.1:1/0: "
        r".+ Trying again in \d+\.\d\d seconds\.\.\.",
        timeout=20,
        count=2,
    )
    assert "Trying again in 1.00 seconds... (1/100)" in lines[0]
    assert "Trying again in 2.00 seconds... (2/100)" in lines[1]
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert "ready." not in process.log


def test_broker_down_gives_up_after_max_retries(tasks_dir: TasksDir, run_cli: RunCli) -> None:
    tasks_dir.write(
        "giveup.py",
        """
        from celeriac import Celery

        app = Celery("giveup", broker="redis://127.0.0.1:1/0")
        app.conf.broker_connection_max_retries = 2
        """,
    )
    result = run_cli("-A", "giveup", "worker", "-l", "info", timeout=60)
    assert result.returncode == 1, result.stderr
    attempts = re.findall(r"Trying again in", result.stderr)
    assert len(attempts) == 2
    assert "Giving up after 2 retries" in result.stderr


def raw_envelope(queue: str, *, body: bytes, headers: str) -> bytes:
    """An envelope whose headers are JSON text as given (it may hold what Python's
    json.dumps would not write) and whose body is base64 of the given bytes."""
    text = envelope(queue, body=base64.b64encode(body).decode(), headers={"@": "@"})
    return text.replace(b'{"@": "@"}', headers.encode())


def test_malformed_messages_from_the_fuzz_corpus_are_logged_and_dropped(
    worker: StartWorker,
    tasks_dir: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
) -> None:
    """Hand-picked mutations of the decoders' fuzz inputs (fuzz/, src/protocol/mutate.rs):
    each one is logged with its reason and dropped, and the worker goes on serving."""
    queue = tasks_dir.queue
    task_id = str(uuid.uuid4())
    headers = json.dumps({"lang": "py", "task": "tasks.add", "id": task_id, "root_id": task_id})
    good = envelope(queue, body=b64([[1, 2], {}, {}]), headers=json.loads(headers))

    def body(text: str) -> bytes:
        return raw_envelope(queue, body=text.encode(), headers=headers)

    garbage = {
        "truncated envelope": good[: len(good) // 2],
        "properties not an object": good.replace(b'"properties": {', b'"properties": [{', 1) + b"]",
        "unknown body encoding": envelope(
            queue, body=b64([[1, 2], {}, {}]), headers=None, body_encoding="rot13"
        ),
        "headers not an object": raw_envelope(queue, body=b"[[1, 2], {}, {}]", headers="[1, 2]"),
        "args not a list": body('["1, 2", {}, {}]'),
        "kwargs a list": body("[[1], [2], {}]"),
        "embed a number": body("[[1, 2], {}, 3]"),
        "body truncated": body("[[1, 2], {}, {"),
        "nested too deep": body("[" * 600 + "]" * 600),
        "integer of 5000 digits": body("[[1" + "0" * 5000 + ", 2], {}, {}]"),
        "bad uuid marker": body('[[{"__type__": "uuid", "__value__": {"hex": "zz"}}, 2], {}, {}]'),
        "unknown marker": body('[[{"__type__": "pickle", "__value__": "gASV"}, 2], {}, {}]'),
        "marker without a string type": body('[[{"__type__": 7, "__value__": 7}, 2], {}, {}]'),
        "bad datetime marker": body(
            '[[1, 2], {"y": {"__type__": "datetime", "__value__": "next tuesday"}}, {}]'
        ),
        "bad marker in the headers": raw_envelope(
            queue,
            body=b"[[1, 2], {}, {}]",
            headers=headers[:-1] + ', "expires": {"__type__": "decimal", "__value__": "soon"}}',
        ),
    }
    process, reasons = dropped_and_still_serving(
        worker, tasks_dir, result_keys, redis_client, list(garbage.values())
    )
    for expected in ("uuid", "pickle", "datetime", "decimal", "nesting too deep", "body_encoding"):
        assert any(expected in reason for reason in reasons), (expected, reasons)
    assert queue_length(redis_client, queue) == 0
    assert redis_client.get(f"celery-task-meta-{task_id}") is None
    assert "Traceback" not in process.log


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("retries", "three"),
        ("timelimit", "x"),
        ("expires", []),
        ("eta", 5),
        ("group_index", {}),
        ("parent_id", [1]),
        ("stamps", "x"),
    ],
)
def test_headers_of_the_wrong_type_do_not_stop_the_worker(
    worker: StartWorker,
    tasks_dir: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    header: str,
    value: Any,
) -> None:
    queue = tasks_dir.queue
    task_id = str(uuid.uuid4())
    result_keys.add(task_id)
    headers = {"lang": "py", "task": "tasks.add", "id": task_id, "root_id": task_id}
    redis_client.rpush(
        queue, envelope(queue, body=b64([[1, 2], {}, {}]), headers={**headers, header: value})
    )
    process = worker()
    tasks = tasks_dir.import_module()
    follow = tasks.add.delay(20, 22)
    result_keys.add(follow.id)
    assert follow.get(timeout=10) == 42
    assert queue_length(redis_client, queue) == 0
    assert "Traceback" not in process.log, process.log


def test_remote_control_survives_broadcasts_it_cannot_read(
    worker: StartWorker, tasks_dir: TasksDir
) -> None:
    """A broadcast whose headers hold a bad kombu marker used to make ``receive`` raise,
    which ended the worker's remote control: it answered no ``ping`` after it. A
    database of its own, so that other workers on the shared Redis never see them."""
    from celeriac import _core, control

    broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/13"
    tasks_dir.env["CELERIAC_TEST_BROKER"] = broker
    node = f"bad-{tasks_dir.queue}@test"
    process = worker("-n", node)
    tasks = tasks_dir.import_module()
    assert control.broadcast(tasks.app, "ping", destination=[node], timeout=5) == [
        {node: {"ok": "pong"}}
    ]
    mailbox = _core.Mailbox(broker)
    try:
        for headers in (
            {"clock": {"__type__": "uuid", "__value__": {"hex": "zz"}}},
            {"clock": {"__type__": "pickle", "__value__": "gASV"}},
            {"expires": {"__type__": "datetime", "__value__": "never"}},
        ):
            reached = mailbox.publish(
                control.PIDBOX,
                "",
                {"method": "ping", "destination": [node], "arguments": {}},
                headers=headers,
                exchange_type="fanout",
            )
            assert reached >= 1
        process.wait_for(r"pidbox: dropped a malformed message: unreadable headers", count=3)
        assert control.broadcast(tasks.app, "ping", destination=[node], timeout=5) == [
            {node: {"ok": "pong"}}
        ]
    finally:
        mailbox.close()
        client = redis.Redis.from_url(broker)
        keys = list(client.scan_iter(f"*{tasks_dir.queue}*"))
        if keys:
            client.delete(*keys)
