"""Bad serializer and compression input, on Redis and RabbitMQ, sent by kombu itself.

The worker logs why and rejects each bad message, runs nothing from one it refused (a
pickle it does not accept is never unpickled), keeps serving, and loses none of the good
messages around them. A sender's bad setting fails at its call site.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import AMQP_URL, REDIS_URL, app_module, delete_amqp, queue_length, wait_until

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

FMT_TASKS = app_module(
    "fmt_tasks",
    """
app.conf.accept_content = ["json", "msgpack"]
app.conf.result_accept_content = ["json", "msgpack"]


@app.task(name="fmt.add")
def add(x, y):
    return x + y
""",
)

#: Importing this instead of the real package fails, as if msgpack were not installed.
HIDDEN_MSGPACK = "raise ImportError(\"No module named 'msgpack' (hidden by the test)\")\n"


class Pwn:
    """Unpickling this creates the file: proof that a refused pickle never ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(params=["redis", "amqp"])
def fmt_dir(request: pytest.FixtureRequest, tasks_dir: TasksDir) -> Iterator[TasksDir]:
    """The test's queue on Redis or RabbitMQ; on RabbitMQ a policy dead-letters what is
    rejected from it to ``<queue>.dead`` (declared here), where a test can count it."""
    tasks_dir.write("fmt_tasks.py", FMT_TASKS)
    queue = tasks_dir.queue
    if request.param == "amqp":
        from kombu import Connection

        tasks_dir.env["CELERIAC_TEST_BROKER"] = AMQP_URL
        with Connection(AMQP_URL, connect_timeout=5) as conn:
            conn.default_channel.queue_declare(f"{queue}.dead", durable=False, auto_delete=False)
        policy = json.dumps(
            {"dead-letter-exchange": "", "dead-letter-routing-key": f"{queue}.dead"}
        )
        rabbitmqctl("set_policy", queue, f"^{re.escape(queue)}$", policy, "--apply-to", "queues")
    try:
        yield tasks_dir
    finally:
        module = sys.modules.pop("fmt_tasks", None)
        if module is not None:
            module.app.close()
        if request.param == "amqp":
            rabbitmqctl("clear_policy", queue)
            delete_amqp(AMQP_URL, queue, f"{queue}.dead")


def publish_raw(url: str, queue: str, messages: list[dict[str, Any]]) -> None:
    """Publish each ``{"body", "content_type", "content_encoding", "headers"}`` as is."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        producer = conn.Producer()
        for message in messages:
            producer.publish(
                message["body"],
                routing_key=queue,
                exchange="",
                content_type=message["content_type"],
                content_encoding=message.get("content_encoding", "binary"),
                headers=message["headers"],
            )


def task_headers(task_id: str, **extra: Any) -> dict[str, Any]:
    return {"lang": "py", "task": "fmt.add", "id": task_id, "root_id": task_id, **extra}


def remaining(url: str, queue: str, redis_client: redis.Redis) -> int:
    if url == REDIS_URL:
        return queue_length(redis_client, queue)
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def test_bad_messages_are_logged_rejected_and_the_worker_keeps_serving(
    worker: StartWorker,
    fmt_dir: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    import msgpack

    url = fmt_dir.env["CELERIAC_TEST_BROKER"]
    process = worker(app="fmt_tasks")
    tasks = fmt_dir.import_module("fmt_tasks")
    before = tasks.add.delay(1, 1)
    result_keys.add(before.id)
    pwned = tmp_path / "pwned"
    body = msgpack.packb([[2, 2], {}, {}], use_bin_type=True)
    bad = {
        "a pickle, not accepted": {
            "body": pickle.dumps(([Pwn(str(pwned))], {}, {}), protocol=4),
            "content_type": "application/x-python-serialize",
            "reason": r'refusing content type "application/x-python-serialize": it is not in '
            r'accept_content \["json", "msgpack"\]',
        },
        "yaml, not accepted": {
            "body": b"- [2, 2]\n- {}\n- {}\n",
            "content_type": "application/x-yaml",
            "content_encoding": "utf-8",
            "reason": 'refusing content type "application/x-yaml"',
        },
        "an unknown content type": {
            "body": b"<xml/>",
            "content_type": "application/xml",
            "reason": 'refusing content type "application/xml"',
        },
        "msgpack that is not": {
            "body": b"\xc1\xc1\xc1",
            "content_type": "application/x-msgpack",
            "reason": "the body is not valid msgpack",
        },
        "JSON that is not": {
            "body": b"[[2, 2], {",
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "reason": "the body is not valid JSON",
        },
        "an unknown compression": {
            "body": body,
            "content_type": "application/x-msgpack",
            "compression": "application/x-brotli",
            "reason": r'unknown compression "application/x-brotli" \(celeriac decompresses gzip',
        },
        "a body that is not what its compression says": {
            "body": body,
            "content_type": "application/x-msgpack",
            "compression": "application/x-gzip",
            "reason": "the body is not application/x-gzip data",
        },
    }
    ids = {}
    messages = []
    for name, message in bad.items():
        task_id = result_keys.add(f"bad-{len(ids)}-{fmt_dir.queue}")
        ids[name] = task_id
        headers = task_headers(task_id)
        if "compression" in message:
            headers["compression"] = message["compression"]
        messages.append({**message, "headers": headers})
    publish_raw(url, fmt_dir.queue, messages)
    after = tasks.add.delay(20, 22)
    result_keys.add(after.id)
    assert before.get(timeout=20) == 2
    assert after.get(timeout=20) == 42
    lines = process.wait_for(r"Received invalid task message: ", count=len(bad))
    log = "\n".join(lines)
    for name, message in bad.items():
        assert re.search(message["reason"], log), (name, log)
    assert not pwned.exists()
    assert remaining(url, fmt_dir.queue, redis_client) == 0
    if url == AMQP_URL:
        # Rejected, so dead-lettered: each bad message is kept, none ran.
        assert wait_until(lambda: remaining(url, f"{fmt_dir.queue}.dead", redis_client) == len(bad))
    for task_id in ids.values():
        assert redis_client.get(f"celery-task-meta-{task_id}") is None
    process.wait_for(r"Task fmt\.add\[.+\] succeeded", count=2)


def test_accepted_serializer_whose_package_is_missing(
    worker: StartWorker,
    fmt_dir: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
) -> None:
    import msgpack

    url = fmt_dir.env["CELERIAC_TEST_BROKER"]
    fmt_dir.write("msgpack.py", HIDDEN_MSGPACK)
    process = worker(app="fmt_tasks")
    task_id = result_keys.add(f"nomsgpack-{fmt_dir.queue}")
    publish_raw(
        url,
        fmt_dir.queue,
        [
            {
                "body": msgpack.packb([[2, 2], {}, {}], use_bin_type=True),
                "content_type": "application/x-msgpack",
                "headers": task_headers(task_id),
            }
        ],
    )
    process.wait_for(
        r"Received invalid task message: the body is not valid msgpack: .*the 'msgpack' "
        r"serializer needs the 'msgpack' package: pip install 'celeriac\[msgpack\]'"
    )
    (fmt_dir.path / "msgpack.py").unlink()
    tasks = fmt_dir.import_module("fmt_tasks")
    follow = tasks.add.delay(3, 4)
    result_keys.add(follow.id)
    assert follow.get(timeout=20) == 7
    assert remaining(url, fmt_dir.queue, redis_client) == 0


@pytest.mark.parametrize(
    ("accept", "environ", "message"),
    [
        ('["json", "xml"]', {}, r"accept_content: 'xml' is not a serializer"),
        (
            '["pickle"]',
            {"C_FORCE_ROOT": ""},
            r"refusing to run as root with pickle in accept_content: .*C_FORCE_ROOT=1",
        ),
    ],
)
def test_worker_refuses_to_start_with_a_bad_accept_content(
    worker: StartWorker, tasks_dir: TasksDir, accept: str, environ: dict[str, str], message: str
) -> None:
    if accept == '["pickle"]' and os.geteuid() != 0:
        pytest.skip("the pickle refusal is for a worker running as root")
    tasks_dir.write("fmt_tasks.py", FMT_TASKS.replace('["json", "msgpack"]', accept, 1))
    tasks_dir.env.update(environ)
    process = worker(app="fmt_tasks", ready=False, check_exit=False)
    process.wait_for(message)
    assert process.wait(20) != 0


BOTH_SIDES = app_module(
    "both_tasks",
    """
app.conf.task_serializer = "msgpack"
app.conf.task_compression = "zstd"
app.conf.result_serializer = "yaml"
app.conf.result_compression = "lzma"
app.conf.accept_content = ["msgpack"]
app.conf.result_accept_content = ["yaml"]


@app.task(name="both.echo")
def echo(*args, **kwargs):
    return [list(args), kwargs]


@app.task(name="both.an_object")
def an_object():
    return object()
""",
)


@pytest.mark.parametrize("broker", ["sqlite", "amqp"])
def test_celeriac_on_both_sides_with_prefork(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, broker: str
) -> None:
    """msgpack + zstd messages and yaml + lzma results, client and prefork worker
    celeriac's, on the SQLite broker and store and on RabbitMQ with rpc:// results."""
    tasks_dir.write("both_tasks.py", BOTH_SIDES)
    if broker == "sqlite":
        url = f"sqlite://{tasks_dir.path / 'broker.sqlite3'}"
        tasks_dir.env.update(CELERIAC_TEST_BROKER=url, CELERIAC_TEST_BACKEND=url)
    else:
        tasks_dir.env.update(CELERIAC_TEST_BROKER=AMQP_URL, CELERIAC_TEST_BACKEND="rpc://")
    try:
        worker("-c", "2", app="both_tasks", pool="prefork")
        tasks = tasks_dir.import_module("both_tasks")
        results = [tasks.echo.delay(i, b"\x00\xff", k={"n": [i]}) for i in range(20)]
        for i, result in enumerate(results):
            assert result.get(timeout=20) == [[i, b"\x00\xff"], {"k": {"n": [i]}}]
        # A return value yaml cannot carry is the task's failure, stored in yaml.
        with pytest.raises(TypeError, match="cannot encode as yaml: RepresenterError"):
            tasks.an_object.delay().get(timeout=20)
        # An argument msgpack cannot carry fails at the call site.
        with pytest.raises(TypeError, match="cannot encode as msgpack: TypeError"):
            tasks.echo.delay({1, 2})
    finally:
        module = sys.modules.pop("both_tasks", None)
        if module is not None:
            module.app.close()
        if broker == "amqp":
            delete_amqp(AMQP_URL, tasks_dir.queue)
