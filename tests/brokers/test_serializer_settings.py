"""The sender's and reader's side of the serializer and compression settings, against
the real Redis (and the SQLite result store): a bad or unusable setting fails at the call
site and sends nothing; results are written in ``result_serializer`` (compressed with
``result_compression``) and read only when ``result_accept_content`` allows it."""

from __future__ import annotations

import pickle
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celeriac import Celeriac, serialization
from celeriac.exceptions import DecodeError, ImproperlyConfigured
from celeriac.serialization import ContentDisallowed, SerializerNotInstalled
from conftest import REDIS_URL, queue_length

if TYPE_CHECKING:
    from conftest import ResultKeys

pytestmark = pytest.mark.redis


@pytest.fixture
def make_app(queue_name: str) -> Iterator[Any]:
    """``make_app(backend=REDIS_URL, **settings)``: apps closed at teardown."""
    apps: list[Celeriac] = []

    def make(backend: str = REDIS_URL, **settings: Any) -> Celeriac:
        app = Celeriac(
            f"fmt{len(apps)}",
            broker=REDIS_URL,
            backend=backend,
            task_default_queue=queue_name,
            **settings,
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def without(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``without("msgpack")``: importing that package fails, as if not installed."""

    def hide(module: str) -> None:
        monkeypatch.setitem(sys.modules, module, None)
        # Forget the codecs made by earlier tests of this process.
        monkeypatch.setattr(serialization, "_CODECS", {})

    return hide


@pytest.mark.parametrize("module", ["msgpack", "yaml"])
def test_missing_package_fails_at_the_call_site_and_sends_nothing(
    make_app: Any, without: Any, module: str, queue_name: str, redis_client: redis.Redis
) -> None:
    without(module)
    hint = rf"pip install 'celeriac\[{module}\]'"
    app = make_app(task_serializer=module)

    @app.task(name="fmt.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(SerializerNotInstalled, match=f"task_serializer: .*{hint}"):
        add.delay(1, 2)
    with pytest.raises(ImproperlyConfigured, match=hint):
        _ = app.producer
    plain = make_app()

    @plain.task(name="fmt.add")
    def add2(x: int, y: int) -> int:
        return x + y

    with pytest.raises(SerializerNotInstalled, match=f"serializer: .*{hint}"):
        add2.apply_async((1, 2), serializer=module)
    with pytest.raises(SerializerNotInstalled, match=f"serializer: .*{hint}"):

        @plain.task(name="fmt.other", serializer=module)
        def other() -> None:
            return None

    assert queue_length(redis_client, queue_name) == 0
    results = make_app(result_serializer=module)
    with pytest.raises(ImproperlyConfigured, match=f"result_serializer: .*{hint}"):
        _ = results.backend


def test_unknown_names_fail_at_the_call_site(
    make_app: Any, queue_name: str, redis_client: redis.Redis
) -> None:
    app = make_app(task_compression="brotli")
    with pytest.raises(ValueError, match='task_compression: unknown compression "brotli"'):
        app.send_task("fmt.add", args=[1, 2])
    with pytest.raises(ImproperlyConfigured, match="unknown compression"):
        _ = app.producer
    plain = make_app()
    with pytest.raises(ValueError, match="serializer 'xml' is not a serializer"):
        plain.send_task("fmt.add", args=[1, 2], serializer="xml")
    with pytest.raises(ValueError, match='unknown compression "rar"'):
        plain.send_task("fmt.add", args=[1, 2], compression="rar")
    assert queue_length(redis_client, queue_name) == 0
    with pytest.raises(ImproperlyConfigured, match='result_compression: unknown compression "7z"'):
        _ = make_app(result_compression="7z").backend
    with pytest.raises(ImproperlyConfigured, match="result_accept_content: 'xml'"):
        _ = make_app(result_accept_content=["xml"]).backend


def _store(app: Celeriac, task_id: str, status: str, result: Any) -> None:
    app.backend.store(task_id, {"status": status, "result": result, "task_id": task_id})
    app.backend.flush(10.0)


def test_results_outside_result_accept_content_are_refused(
    make_app: Any, result_keys: ResultKeys, redis_client: redis.Redis, tmp_path: Path
) -> None:
    task_id = result_keys.add(f"fmt-{uuid.uuid4()}")
    writer = make_app(result_serializer="msgpack", result_accept_content=["msgpack"])
    _store(writer, task_id, "SUCCESS", [1, b"\x00"])
    stored = redis_client.get(f"celery-task-meta-{task_id}")
    import msgpack

    assert msgpack.unpackb(stored, raw=False)["result"] == [1, b"\x00"]
    assert writer.AsyncResult(task_id).get(timeout=5) == [1, b"\x00"]
    # accept_content is ["json"] and result_accept_content unset: msgpack is refused.
    reader = make_app(result_serializer="msgpack")
    with pytest.raises(ContentDisallowed, match=r"refusing to decode results in \"msgpack\""):
        reader.AsyncResult(task_id).get(timeout=5)
    with pytest.raises(ContentDisallowed):
        _ = reader.AsyncResult(task_id).state
    by_type = make_app(result_serializer="msgpack", accept_content=["application/x-msgpack"])
    assert by_type.AsyncResult(task_id).result == [1, b"\x00"]

    # A pickled result is never unpickled unless pickle is accepted.
    pwned = tmp_path / "pwned"
    evil = result_keys.add(f"fmt-{uuid.uuid4()}")
    redis_client.set(f"celery-task-meta-{evil}", pickle.dumps(_Pwn(str(pwned)), protocol=4))
    refusing = make_app(result_serializer="pickle")
    with pytest.raises(ContentDisallowed, match="pickle"):
        refusing.AsyncResult(evil).get(timeout=5)
    assert not pwned.exists()


class _Pwn:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("serializer", ["yaml", "json"])
@pytest.mark.parametrize("store", ["redis", "sqlite"])
def test_compressed_results_and_progress(
    make_app: Any,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    tmp_path: Path,
    store: str,
    serializer: str,
) -> None:
    backend = REDIS_URL if store == "redis" else f"sqlite:///{tmp_path / 'results.db'}"
    settings = {"result_serializer": serializer, "result_accept_content": [serializer]}
    writer = make_app(backend, result_compression="bzip2", **settings)
    task_id = result_keys.add(f"fmt-{uuid.uuid4()}")
    _store(writer, task_id, "PROGRESS", {"done": 1})
    if store == "redis":
        raw = redis_client.get(f"celery-task-meta-{task_id}")
        assert raw is not None
        assert raw.startswith(b"\x00celery-compressed\x00application/x-bz2\x00")
    # A reader without result_compression reads it (the payload names its method) and
    # waits past the unready state (read by the store through the compression for JSON,
    # by the reader for yaml).
    reader = make_app(backend, **settings)
    result = reader.AsyncResult(task_id)
    assert result.state == "PROGRESS"
    assert result.result == {"done": 1}
    finisher = threading.Timer(0.3, _store, (writer, task_id, "SUCCESS", "done"))
    finisher.start()
    try:
        assert result.get(timeout=10) == "done"
    finally:
        finisher.join()


def test_a_stored_result_that_does_not_decode(
    make_app: Any, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    task_id = result_keys.add(f"fmt-{uuid.uuid4()}")
    redis_client.set(f"celery-task-meta-{task_id}", b"\xc1\xc1 not msgpack")
    reader = make_app(result_serializer="msgpack", result_accept_content=["msgpack"])
    with pytest.raises(
        DecodeError, match=f'the stored result of task "{task_id}" is not valid msgpack: [A-Z]\\w+'
    ):
        reader.AsyncResult(task_id).get(timeout=5)
    broken = result_keys.add(f"fmt-{uuid.uuid4()}")
    redis_client.set(
        f"celery-task-meta-{broken}", b"\x00celery-compressed\x00application/x-gzip\x00junk"
    )
    with pytest.raises(DecodeError, match="not application/x-gzip data"):
        reader.AsyncResult(broken).get(timeout=5)


def test_eager_tasks_round_trip_through_the_serializer(make_app: Any) -> None:
    app = make_app(task_always_eager=True, task_serializer="pickle")

    @app.task(name="fmt.kinds")
    def kinds(*args: Any) -> list[str]:
        return [type(arg).__name__ for arg in args]

    assert kinds.delay({1, 2}, (3,)).get() == ["set", "tuple"]
