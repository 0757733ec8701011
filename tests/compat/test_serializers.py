"""Serializers and compression against Celery 5.7, both ways, results included.

Both apps set ``task_serializer``/``result_serializer`` and accept only that
serializer (``accept_content``, ``result_accept_content``), and the same
``task_compression``/``result_compression``: a message or result in any other format
would be refused by the reader, so a round trip proves the format on the wire. Pickle,
msgpack and yaml run on Redis (Redis results) and RabbitMQ (rpc:// results, which Celery
never compresses); each compression on Redis and on RabbitMQ with Redis results.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from conftest import AMQP_URL, REDIS_URL, ResultKeys, app_module, delete_amqp, worker_env

from compat.conftest import TASKS_BODY, CompatDir, close_compat

#: Read from the environment by both apps (the same module text for each).
FORMAT_PY = """
app.conf.task_serializer = os.environ.get("CELERIAC_TEST_SERIALIZER", "json")
app.conf.result_serializer = app.conf.task_serializer
app.conf.accept_content = [app.conf.task_serializer]
app.conf.result_accept_content = [app.conf.task_serializer]
app.conf.task_compression = os.environ.get("CELERIAC_TEST_COMPRESSION") or None
app.conf.result_compression = app.conf.task_compression
"""

PAIRS = {
    "redis": (REDIS_URL, REDIS_URL),
    "amqp-rpc": (AMQP_URL, "rpc://"),
    "amqp-redis": (AMQP_URL, REDIS_URL),
}

#: (pair, serializer, compression) cases.
CASES = [
    *((pair, serializer, None) for serializer in ("pickle", "msgpack", "yaml") for pair in
      ("redis", "amqp-rpc")),
    *((pair, "json", method) for method in ("gzip", "bzip2", "lzma", "zstd") for pair in
      ("redis", "amqp-redis")),
    ("redis", "msgpack", "zlib"),
]  # fmt: skip

#: Compression name -> kombu's header value.
HEADERS = {
    "gzip": "application/x-gzip",
    "zlib": "application/x-gzip",
    "bzip2": "application/x-bz2",
    "lzma": "application/x-lzma",
    "zstd": "application/zstd",
}

CONTENT_TYPES = {
    "json": ("application/json", "utf-8"),
    "pickle": ("application/x-python-serialize", "binary"),
    "msgpack": ("application/x-msgpack", "binary"),
    "yaml": ("application/x-yaml", "utf-8"),
}

DIRECTIONS = [("celery", "celeriac"), ("celeriac", "celery")]


def _case_id(case: tuple[str, str, str | None]) -> str:
    pair, serializer, compression = case
    return f"{pair}-{serializer}" + (f"-{compression}" if compression else "")


class FormatDir(CompatDir):
    """``CompatDir`` whose apps also read the serializer and compression settings."""

    def __init__(self, path: Path, queue: str) -> None:
        super().__init__(path, queue)
        for impl, module in (("celeriac", "compat_tasks"), ("celery", "celery_tasks")):
            text = app_module(
                module,
                FORMAT_PY + TASKS_BODY,
                imports=("import time", "import compat_errors"),
                impl=impl,
            )
            self.write(f"{module}.py", text)


@pytest.fixture(params=CASES, ids=_case_id)
def compat(
    request: pytest.FixtureRequest, tmp_path: Path, queue_name: str, result_keys: ResultKeys
) -> Iterator[FormatDir]:
    """Overrides the suite's ``compat`` (so ``start_worker`` uses this directory)."""
    pair, serializer, compression = request.param
    broker, backend = PAIRS[pair]
    directory = FormatDir(tmp_path, queue_name)
    directory.env = worker_env(queue_name, broker, backend)
    directory.env["CELERIAC_TEST_SERIALIZER"] = serializer
    directory.env["CELERIAC_TEST_COMPRESSION"] = compression or ""
    # Celery's worker refuses to accept pickle as root (CI runs as root) without this.
    directory.env["C_FORCE_ROOT"] = "1"
    with pytest.MonkeyPatch.context() as patch:
        # The clients in this process read the same variables.
        patch.setenv("CELERIAC_TEST_SERIALIZER", serializer)
        patch.setenv("CELERIAC_TEST_COMPRESSION", compression or "")
        yield directory
    close_compat(broker, queue_name)


@pytest.fixture(params=DIRECTIONS, ids=lambda d: f"{d[0]}-client-{d[1]}-worker")
def client(request: pytest.FixtureRequest, compat: FormatDir, start_worker: Any) -> ModuleType:
    client_kind, worker_kind = request.param
    start_worker(worker_kind)
    return compat.celery_app() if client_kind == "celery" else compat.celeriac_app()


def _values(serializer: str) -> tuple[list[Any], dict[str, Any]]:
    """Arguments that survive ``serializer``, some only it carries."""
    args: list[Any] = [1, "naïve ☃", 2.5, None, True, [1, [2, "x"]], {"k": "v"}, 2**40]
    kwargs: dict[str, Any] = {"nested": {"a": [1, {"b": "c"}]}, "text": "x" * 2000}
    if serializer in ("pickle", "msgpack", "yaml"):
        args.append(b"\xff\x00 bytes")
    if serializer in ("pickle", "yaml"):
        args.append(datetime.date(2024, 1, 2))
    if serializer == "pickle":
        # JSON, msgpack and yaml (safe) cannot carry these.
        args.extend([{1, 2, 3}, decimal.Decimal("3.14"), (1, 2)])
    return args, kwargs


def _loads(serializer: str, data: bytes) -> Any:
    """``data`` decoded as kombu would, told the serializer."""
    from kombu.serialization import loads

    content_type, encoding = CONTENT_TYPES[serializer]
    return loads(data, content_type, encoding, accept={content_type})


def test_round_trip_with_results(
    client: ModuleType, compat: FormatDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    serializer = compat.env["CELERIAC_TEST_SERIALIZER"]
    compression = compat.env["CELERIAC_TEST_COMPRESSION"]
    args, kwargs = _values(serializer)
    result = client.echo.apply_async(args, kwargs)
    result_keys.add(result.id)
    got = result.get(timeout=20)
    assert got["args"] == args
    assert got["kwargs"] == kwargs
    if serializer == "pickle":
        assert got["arg_types"][-3:] == ["set", "Decimal", "tuple"]
    assert client.add.delay(2, 3).get(timeout=20) == 5
    failed = client.fail.delay("value", "bad value")
    result_keys.add(failed.id)
    with pytest.raises(ValueError, match="bad value"):
        failed.get(timeout=20)
    if compat.env["CELERIAC_TEST_BACKEND"] == REDIS_URL:
        stored = redis_client.get(f"celery-task-meta-{result.id}")
        assert stored is not None
        if compression:
            magic = b"\x00celery-compressed\x00" + HEADERS[compression].encode() + b"\x00"
            assert stored.startswith(magic)
        else:
            assert _loads(serializer, stored)["status"] == "SUCCESS"


@pytest.mark.parametrize("transport", ["redis", "amqp"])
@pytest.mark.parametrize(
    ("serializer", "compression"),
    [
        ("json", None),
        ("pickle", None),
        ("msgpack", None),
        ("yaml", None),
        ("json", "gzip"),
        ("json", "bzip2"),
        ("json", "lzma"),
        ("json", "zstd"),
        ("msgpack", "zstd"),
    ],
)
def test_kombu_reads_what_celeriac_sends(
    transport: str,
    serializer: str,
    compression: str | None,
    tmp_path: Path,
    queue_name: str,
    redis_client: redis.Redis,
) -> None:
    """The raw message, taken by kombu: content type, encoding, compression header,
    and a body kombu decodes to Celery's ``(args, kwargs, embed)``."""
    from celeriac import Celeriac
    from kombu import Connection

    url = REDIS_URL if transport == "redis" else AMQP_URL
    app = Celeriac("fmt", broker=url, task_default_queue=queue_name)
    app.conf.task_serializer = serializer
    app.conf.task_compression = compression
    link = {"task": "compat.add", "args": [1], "kwargs": {}, "options": {}, "subtask_type": None}
    try:
        sent = app.send_task("compat.echo", args=[1, "two"], kwargs={"k": [3]}, link=link)
        app.producer.flush(10.0)
    finally:
        app.close()
    try:
        with Connection(url, connect_timeout=5) as conn:
            channel = conn.default_channel
            raw = None
            for _ in range(50):
                raw = channel.basic_get(queue_name, no_ack=True)
                if raw is not None:
                    break
                time.sleep(0.1)
            assert raw is not None, "the message did not arrive"
            message = channel.message_to_python(raw)
            assert (message.content_type, message.content_encoding) == CONTENT_TYPES[serializer]
            assert message.headers["id"] == sent.id
            assert message.headers.get("compression") == (
                HEADERS[compression] if compression else None
            )
            message.accept = {CONTENT_TYPES[serializer][0]}
            args, kwargs, embed = message.decode()
    finally:
        if transport == "amqp":
            delete_amqp(url, queue_name)
    assert list(args) == [1, "two"]
    assert kwargs == {"k": [3]}
    assert embed["callbacks"] == [link]
    assert embed["chain"] is None


def test_redis_envelope_body_is_base64_of_the_compressed_bytes(
    queue_name: str, redis_client: redis.Redis
) -> None:
    from celeriac import Celeriac, _core

    app = Celeriac("fmt", broker=REDIS_URL, task_default_queue=queue_name)
    try:
        app.send_task("compat.add", args=[2, 2], compression="zlib", serializer="msgpack")
        app.producer.flush(10.0)
    finally:
        app.close()
    raw = redis_client.lindex(queue_name, 0)
    assert raw is not None
    envelope = json.loads(raw)
    assert envelope["properties"]["body_encoding"] == "base64"
    assert envelope["content-type"] == "application/x-msgpack"
    assert envelope["headers"]["compression"] == "application/x-gzip"
    import msgpack

    body = _core.decompress(base64.b64decode(envelope["body"]), "zlib")
    args, kwargs, _embed = msgpack.unpackb(body, raw=False)
    assert (args, kwargs) == ([2, 2], {})
    assert uuid.UUID(envelope["headers"]["id"])
