"""``celeriac._core.Backend`` against the real Redis, and against Celery's own Redis
result backend (results written by either side are read by the other)."""

from __future__ import annotations

import _thread
import datetime
import decimal
import gc
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import celery  # type: ignore[import-untyped]
import celery.result  # type: ignore[import-untyped]
import pytest
import redis
from celeriac import _core
from conftest import success_meta, wait_until

if TYPE_CHECKING:
    from conftest import ResultKeys

pytestmark = pytest.mark.redis

URL = "redis://127.0.0.1:6379/0"


def new_id(result_keys: ResultKeys) -> str:
    return result_keys.add(f"celeriac-test-{uuid.uuid4()}")


def later(delay: float, action: Any, *args: Any) -> threading.Thread:
    """Run ``action(*args)`` in a thread after ``delay`` seconds."""

    def run() -> None:
        time.sleep(delay)
        action(*args)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def backend(redis_client: redis.Redis) -> Iterator[_core.Backend]:
    store = _core.Backend(URL)
    yield store
    store.close()


@pytest.fixture
def celery_app(redis_client: redis.Redis) -> Iterator[celery.Celery]:
    app = celery.Celery("celeriac-interop", backend=URL, set_as_current=False)
    yield app
    app.close()
    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        consumer.drain_events_until = None
        consumer.stop()
    backend.client.connection_pool.disconnect()


def test_store_get_wait_forget(
    backend: _core.Backend, redis_client: redis.Redis, result_keys: ResultKeys
) -> None:
    task_id = new_id(result_keys)
    assert backend.get_meta(task_id) is None
    meta = success_meta(task_id, [1, "two", {"three": 3.5}])
    backend.store(task_id, meta)
    backend.flush()
    assert backend.get_meta(task_id) == meta
    assert backend.wait(task_id, timeout=5) == meta
    ttl = redis_client.ttl(f"celery-task-meta-{task_id}")
    assert 86000 <= ttl <= 86400
    backend.forget(task_id)
    assert backend.get_meta(task_id) is None
    assert redis_client.exists(f"celery-task-meta-{task_id}") == 0


def test_wait_returns_a_later_ready_state_and_skips_progress(
    backend: _core.Backend, result_keys: ResultKeys
) -> None:
    task_id = new_id(result_keys)
    writer = _core.Backend(URL)
    try:
        backend.store(task_id, {"status": "STARTED", "result": {"pid": 1}, "task_id": task_id})
        backend.flush()

        def progress() -> None:
            writer.store(task_id, {"status": "RETRY", "result": None, "task_id": task_id})
            writer.flush()
            time.sleep(0.2)
            writer.store(task_id, success_meta(task_id, 42))
            writer.flush()

        thread = later(0.2, progress)
        meta = backend.wait(task_id, timeout=10)
        # Not STARTED (there before the wait) nor RETRY (written during it): those
        # would be returned, not skipped, by a wait that stopped at any state.
        assert meta["status"] == "SUCCESS"
        assert meta["result"] == 42
        thread.join(5)
    finally:
        writer.close()


def test_wait_times_out(backend: _core.Backend, result_keys: ResultKeys) -> None:
    task_id = new_id(result_keys)
    backend.store(task_id, {"status": "STARTED", "result": None, "task_id": task_id})
    backend.flush()
    started = time.monotonic()
    with pytest.raises(_core.TimeoutError, match=r"^The operation timed out\.$"):
        backend.wait(task_id, timeout=0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 30
    assert issubclass(_core.TimeoutError, _core.CeleriacError)


def test_wait_releases_the_gil_for_many_threads(
    backend: _core.Backend, result_keys: ResultKeys
) -> None:
    ids = [new_id(result_keys) for _ in range(20)]
    results: dict[str, Any] = {}

    def wait(task_id: str) -> None:
        results[task_id] = backend.wait(task_id, timeout=20)["result"]

    threads = [threading.Thread(target=wait, args=(task_id,)) for task_id in ids]
    for thread in threads:
        thread.start()
    # All 20 wait at once (each result's channel has its subscriber): a wait that held
    # the GIL would keep the other threads from even starting theirs.
    channels = [f"celery-task-meta-{task_id}" for task_id in ids]
    probe = redis.Redis.from_url(URL)
    try:
        assert wait_until(lambda: all(n for _c, n in probe.pubsub_numsub(*channels)), 10)
    finally:
        probe.close()
    for n, task_id in enumerate(ids):
        backend.store(task_id, success_meta(task_id, n))
    for thread in threads:
        thread.join(20)
    assert results == {task_id: n for n, task_id in enumerate(ids)}


def test_ctrl_c_interrupts_a_wait_promptly(backend: _core.Backend, result_keys: ResultKeys) -> None:
    task_id = new_id(result_keys)
    interrupted = threading.Event()

    def on_ctrl_c(signum: int, frame: object) -> None:
        # Python's own behaviour (KeyboardInterrupt), once: a later press is ignored.
        if not interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_ctrl_c)

    def press_ctrl_c() -> None:
        # Pressed again every half second (bounded) until the wait gave way, so a
        # press that lands before the wait began cannot leave the test hanging.
        for _ in range(20):
            time.sleep(0.3)
            if interrupted.is_set():
                return
            _thread.interrupt_main()

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    try:
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            backend.wait(task_id, timeout=None)
    finally:
        interrupted.set()
        presser.join(timeout=10)
        signal.signal(signal.SIGINT, previous)


def test_types_round_trip(backend: _core.Backend, result_keys: ResultKeys) -> None:
    task_id = new_id(result_keys)
    value = {
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, 6789, tzinfo=datetime.timezone.utc),
        "naive": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "day": datetime.date(2024, 1, 2),
        "id": uuid.UUID(int=1),
        "price": decimal.Decimal("1.50"),
        "raw": b"\xff\x00",
    }
    meta = success_meta(task_id, value)
    backend.store(task_id, meta)
    assert backend.wait(task_id, timeout=5) == meta
    assert backend.get_meta(task_id) == meta


def test_unencodable_meta_raises_type_error_and_writes_nothing(
    backend: _core.Backend, redis_client: redis.Redis, result_keys: ResultKeys
) -> None:
    task_id = new_id(result_keys)
    with pytest.raises(TypeError, match="object"):
        backend.store(task_id, success_meta(task_id, object()))
    with pytest.raises(TypeError, match="mapping"):
        backend.store(task_id, ["not", "a", "mapping"])  # type: ignore[arg-type]
    backend.flush()
    assert redis_client.exists(f"celery-task-meta-{task_id}") == 0
    assert backend.get_meta(task_id) is None


def test_expiry_and_key_prefixes(redis_client: redis.Redis) -> None:
    task_id = f"celeriac-test-{uuid.uuid4()}"
    keys = [
        f"celeriac-test_celery-task-meta-{task_id}",
        f"celeriac-test:my-prefix-{task_id}",
    ]
    try:
        store = _core.Backend(
            URL, expires=None, transport_options={"global_keyprefix": "celeriac-test"}
        )
        store.store(task_id, success_meta(task_id, 1))
        store.close()
        assert redis_client.ttl(keys[0]) == -1
        store = _core.Backend(
            URL,
            expires=60,
            key_prefix="my-prefix-",
            transport_options={"global_keyprefix": "celeriac-test:"},
        )
        store.store(task_id, success_meta(task_id, 2))
        store.flush()
        assert 0 < redis_client.ttl(keys[1]) <= 60
        assert store.wait(task_id, timeout=5)["result"] == 2
        store.close()
    finally:
        redis_client.delete(*keys)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="expires"):
        _core.Backend(URL, expires=-1)
    with pytest.raises(ValueError, match="connect_timeout"):
        _core.Backend(URL, connect_timeout=0)
    with pytest.raises(TypeError, match="global_keyprefix"):
        _core.Backend(URL, transport_options={"global_keyprefix": 3})


def test_bad_url_names_the_masked_url() -> None:
    for url in ("redis://:secret@localhost:6379/notadb", "kafka://:secret@localhost"):
        with pytest.raises(ValueError) as info:
            _core.Backend(url)
        text = str(info.value)
        assert ":**@localhost" in text
        assert "secret" not in text


def test_unreachable_redis_raises_operational_error_promptly() -> None:
    started = time.monotonic()
    with pytest.raises(_core.OperationalError) as info:
        _core.Backend("redis://:secret@127.0.0.1:1/0", connect_timeout=2)
    assert time.monotonic() - started < 30
    assert "redis://:**@127.0.0.1:1/0" in str(info.value)
    assert "secret" not in str(info.value)


def test_a_closed_backend_raises_operational_error(result_keys: ResultKeys) -> None:
    store = _core.Backend(URL)
    task_id = new_id(result_keys)
    meta = success_meta(task_id, 1)
    store.store(task_id, meta)
    store.close()
    store.close()
    with pytest.raises(_core.OperationalError, match="closed"):
        store.store(task_id, success_meta(task_id, 2))
    with pytest.raises(_core.OperationalError, match="closed"):
        store.wait(task_id, timeout=1)
    assert "127.0.0.1:6379" in repr(store)
    reader = _core.Backend(URL)
    try:
        assert reader.get_meta(task_id) == meta
    finally:
        reader.close()


def test_a_forked_child_builds_its_own_backend(result_keys: ResultKeys) -> None:
    inherited = _core.Backend(URL)
    task_id = new_id(result_keys)
    inherited.store(task_id, success_meta(task_id, "parent"))
    inherited.flush()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        status = 1
        try:
            try:
                inherited.get_meta(task_id)
            except _core.OperationalError as exc:
                if "fork" in str(exc):
                    status = 2
            del inherited
            gc.collect()
            own = _core.Backend(URL)
            if own.get_meta(task_id)["result"] == "parent":  # type: ignore[index]
                own.store(task_id, success_meta(task_id, "child"))
                own.flush()
                if own.wait(task_id, timeout=5)["result"] == "child" and status == 2:
                    status = 0
            own.close()
        finally:
            os._exit(status)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's backend still works.
    assert inherited.get_meta(task_id)["result"] == "child"  # type: ignore[index]
    inherited.close()


# ---------------------------------------------------------------------------------
# Interoperability with Celery 5.7's RedisBackend

#: Celery 5.7 calls redis-py's ``setex``, which redis-py 8 deprecates.
celery_setex = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


@celery_setex
def test_celery_writes_and_celeriac_reads(
    backend: _core.Backend, celery_app: celery.Celery, result_keys: ResultKeys
) -> None:
    task_id = new_id(result_keys)
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    celery_app.backend.store_result(task_id, {"sum": 8, "when": when}, "SUCCESS")
    meta = backend.get_meta(task_id)
    assert meta is not None
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == {"sum": 8, "when": when}
    assert meta["task_id"] == task_id
    assert backend.wait(task_id, timeout=5) == meta

    # Published while we wait; STARTED is skipped, FAILURE is returned.
    failed = new_id(result_keys)

    def celery_writes() -> None:
        celery_app.backend.store_result(failed, {"pid": 1, "hostname": "w"}, "STARTED")
        time.sleep(0.1)
        celery_app.backend.store_result(failed, ValueError("boom", 42), "FAILURE")

    thread = later(0.3, celery_writes)
    meta = backend.wait(failed, timeout=10)
    thread.join(5)
    assert meta["status"] == "FAILURE"
    assert meta["result"] == {
        "exc_type": "ValueError",
        "exc_message": ["boom", 42],
        "exc_module": "builtins",
    }


def test_celeriac_writes_and_celery_reads(
    backend: _core.Backend, celery_app: celery.Celery, result_keys: ResultKeys
) -> None:
    task_id = new_id(result_keys)
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    backend.store(task_id, success_meta(task_id, {"sum": 8, "when": when}))
    backend.flush()
    result = celery.result.AsyncResult(task_id, app=celery_app)
    assert result.get(timeout=5) == {"sum": 8, "when": when}
    assert result.state == "SUCCESS"

    # Stored while Celery waits (its pub/sub path), with a FAILURE it re-raises.
    failed = new_id(result_keys)
    later(
        0.3,
        backend.store,
        failed,
        {
            "status": "FAILURE",
            "result": {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"},
            "traceback": "Traceback (most recent call last): ...",
            "children": [],
            "date_done": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "task_id": failed,
        },
    )
    with pytest.raises(ValueError, match="boom"):
        celery.result.AsyncResult(failed, app=celery_app).get(timeout=10)
