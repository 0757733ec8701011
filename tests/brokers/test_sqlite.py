"""The embedded SQLite broker and result store (``sqlite://``) through
``celeriac._core``: real files in temporary directories, real processes sharing them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac import _core
from conftest import wait_until

#: Runs in a child process: consume ``queue`` from the database at ``url`` and write
#: each task id it ran (one per line, flushed) to ``out``. Exits after ``idle`` seconds
#: without a message (once it has had one) or at ``deadline``. ``mode``: ``early`` acks
#: before the work, ``late`` after it, ``results`` acks early and stores each result.
#: ``poll``: the longest pause between two looks at an idle queue.
CONSUMER = textwrap.dedent(
    """
    import sys, time
    from celeriac import _core

    url, queue, out, mode, idle, deadline, work, poll = sys.argv[1:9]
    idle, deadline, work = float(idle), time.monotonic() + float(deadline), float(work)
    options = {"visibility_timeout": 1.0, "polling_interval": float(poll)}
    consumer = _core.Consumer(url, [queue], prefetch_count=32, transport_options=options)
    backend = _core.Backend(url) if mode == "results" else None
    print("ready", flush=True)
    last = None
    with open(out, "a") as sink:
        while time.monotonic() < deadline:
            batch = consumer.fetch(64, 0.2)
            if not batch:
                if last is not None and time.monotonic() - last > idle:
                    break
                continue
            last = time.monotonic()
            tags = [d.delivery_tag for d in batch]
            if mode != "late":
                consumer.ack(tags)  # early ack: before the work
            for delivery in batch:
                if work:
                    time.sleep(work)
                if backend is not None:
                    backend.store(delivery.id, {"status": "SUCCESS", "result": sum(delivery.args)})
                sink.write(delivery.id + "\\n")
                sink.flush()
                if mode == "late":
                    consumer.ack([delivery.delivery_tag])
    consumer.close()
    if backend is not None:
        backend.close()
    """
)

#: Runs in a child process: publish ``count`` tasks named ``<prefix>-<n>``.
CLIENT = textwrap.dedent(
    """
    import sys
    from celeriac import _core

    url, queue, prefix, count = sys.argv[1:5]
    producer = _core.Producer(url, origin="client")
    for n in range(int(count)):
        producer.send("tasks.add", f"{prefix}-{n}", [n, 1], {}, queue)
    producer.flush(30.0)
    """
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "celeriac.sqlite3"


@pytest.fixture
def url(db: Path) -> str:
    return f"sqlite://{db}"


@pytest.fixture
def backend(url: str) -> Iterator[_core.Backend]:
    store = _core.Backend(url)
    yield store
    store.close()


#: Reads the database in a child process. Never open the file with Python's own
#: ``sqlite3`` in a process that has a ``_core`` connection to it: that is a second
#: SQLite library in one process, and closing its connection drops the POSIX locks of
#: ours (and may delete the WAL under it).
READER = textwrap.dedent(
    """
    import json, sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], timeout=10)
    print(json.dumps([list(row) for row in conn.execute(sys.argv[2], json.loads(sys.argv[3]))]))
    """
)


def rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    done = subprocess.run(
        [sys.executable, "-c", READER, str(db), sql, json.dumps(params)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [tuple(row) for row in json.loads(done.stdout)]


def set_user_version(db: Path, version: int) -> None:
    rows(db, f"PRAGMA user_version = {version}")


def spawn(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "ready", (line, process.stderr and process.stderr.read())


def finish(process: subprocess.Popen[str], timeout: float = 60.0) -> None:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)
        pytest.fail(f"{process.args!r} did not finish within {timeout}s")
    assert process.returncode == 0, err


def ran(out: Path) -> list[str]:
    return out.read_text().split() if out.exists() else []


def success(result: Any) -> dict[str, Any]:
    return {"status": "SUCCESS", "result": result, "traceback": None, "children": []}


# -- the broker -----------------------------------------------------------------------


def test_send_fetch_ack(url: str, db: Path) -> None:
    producer = _core.Producer(url, origin="gen1@test")
    ids = [str(uuid.uuid4()) for _ in range(50)]
    for n, task_id in enumerate(ids):
        producer.send("tasks.add", task_id, [n, n], {"z": 1}, "q", {"priority": n % 3})
    producer.flush(10.0)
    assert rows(db, "SELECT count(*) FROM messages WHERE queue = 'q'") == [(50,)]
    consumer = _core.Consumer(url, ["q"], prefetch_count=0)
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < 50 and time.monotonic() < deadline:
        got.extend(consumer.fetch(100, 1.0))
    assert len(got) == 50
    assert [d.priority for d in got] == sorted(n % 3 for n in range(50))
    by_id = {d.id: d for d in got}
    assert set(by_id) == set(ids)
    first = by_id[ids[1]]
    assert (first.task, first.args, first.kwargs) == ("tasks.add", [1, 1], {"z": 1})
    assert first.headers["origin"] == "gen1@test"
    assert first.routing_key == "q" and first.error is None and not first.redelivered
    consumer.ack([d.delivery_tag for d in got])
    deadline = time.monotonic() + 10
    while rows(db, "SELECT count(*) FROM messages") != [(0,)]:
        assert time.monotonic() < deadline, "acks were not written"
        time.sleep(0.02)
    consumer.close()
    producer.close()


def test_restore_unacked_and_redelivery(url: str) -> None:
    producer = _core.Producer(url, origin="test")
    for n in range(3):
        producer.send("tasks.add", f"t{n}", [n, 0], {}, "q")
    producer.flush(10.0)
    consumer = _core.Consumer(url, ["q"], prefetch_count=10)
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        got += consumer.fetch(10, 1.0)
    assert len(got) == 3
    consumer.ack([got[0].delivery_tag])
    assert consumer.restore_unacked() == 2
    again = _core.Consumer(url, ["q"], prefetch_count=10)
    back: list[Any] = []
    deadline = time.monotonic() + 10
    # fetch() returns as soon as one message is there; the second may come next call.
    while len(back) < 2 and time.monotonic() < deadline:
        back += again.fetch(10, 1.0)
    assert sorted(str(d.id) for d in back) == ["t1", "t2"]
    assert all(d.redelivered for d in back)
    again.ack([d.delivery_tag for d in back])
    again.close()


def test_an_idle_consumer_uses_almost_no_cpu(url: str) -> None:
    consumer = _core.Consumer(url, ["idle"], prefetch_count=4)
    consumer.fetch(1, 0.3)  # settle into the longest pause
    wall, cpu = time.monotonic(), time.process_time()
    assert consumer.fetch(1, 2.0) == []
    used = time.process_time() - cpu
    elapsed = time.monotonic() - wall
    assert elapsed >= 2.0
    assert used / elapsed < 0.02, f"{used:.3f}s of CPU in {elapsed:.1f}s idle"
    consumer.close()


def test_bad_urls_and_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a file"):
        _core.Producer("sqlite://", origin="x")
    missing = tmp_path / "nope" / "x.db"
    with pytest.raises(_core.OperationalError, match="does not exist") as info:
        _core.Consumer(f"sqlite://{missing}", ["q"], prefetch_count=1)
    assert str(missing) in str(info.value)
    assert not missing.parent.exists()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x00not sqlite" * 500)
    with pytest.raises(_core.OperationalError, match="not a SQLite database") as info:
        _core.Backend(f"sqlite://{junk}")
    assert str(junk) in str(info.value)
    assert junk.read_bytes() == b"\x00not sqlite" * 500
    newer = tmp_path / "newer.db"
    _core.Backend(f"sqlite://{newer}").close()
    set_user_version(newer, 99)
    with pytest.raises(_core.OperationalError, match="newer celeriac") as info:
        _core.Producer(f"sqlite://{newer}", origin="x")
    assert str(newer) in str(info.value)


def test_a_relative_url_is_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = _core.Backend("sqlite://celeriac.sqlite3")
    assert repr(store) == "<Backend sqlite://celeriac.sqlite3>"
    store.store("t", success(1))
    store.flush()
    store.close()
    assert (tmp_path / "celeriac.sqlite3").exists()


# -- the result store -----------------------------------------------------------------


def test_store_wait_get_meta_forget(backend: _core.Backend) -> None:
    assert backend.get_meta("t") is None
    backend.store("t", {"status": "STARTED", "result": None})
    backend.flush()
    assert backend.get_meta("t") == {"status": "STARTED", "result": None}
    with pytest.raises(_core.TimeoutError):
        backend.wait("t", 0.2)
    backend.store("t", success([1, "two", {"3": 4.5}]))
    assert backend.wait("t", 5.0)["result"] == [1, "two", {"3": 4.5}]
    backend.forget("t")
    assert backend.get_meta("t") is None
    with pytest.raises(TypeError):
        backend.store("t", [1, 2])  # type: ignore[arg-type]


def test_results_expire(url: str) -> None:
    store = _core.Backend(url, expires=0.3)
    store.store("t", success(1))
    store.flush()
    assert store.get_meta("t") is not None
    assert wait_until(lambda: store.get_meta("t") is None, 5)
    store.close()
    with pytest.raises(_core.OperationalError):
        store.get_meta("t")


def test_a_result_from_another_process_wakes_the_waiter(url: str, tmp_path: Path) -> None:
    out = tmp_path / "ran.txt"
    worker = spawn(CONSUMER, url, "rt", out, "results", 30, 60, 0, 5.0)
    try:
        wait_ready(worker)
        producer = _core.Producer(url, origin="test")
        # Both sides poll every 5 s at most: only wake-ups (UDP across processes) can
        # make a round trip prompt.
        store = _core.Backend(url, transport_options={"polling_interval": 5.0})
        time.sleep(0.5)  # the worker is idle, in a long pause
        latencies = []
        for n in range(5):
            started = time.monotonic()
            producer.send("tasks.add", f"rt-{n}", [n, 2], {}, "rt")
            assert store.wait(f"rt-{n}", 10.0)["result"] == n + 2
            latencies.append(time.monotonic() - started)
            time.sleep(0.2)
        assert max(latencies) < 1.0, latencies
        store.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=10)


# -- several processes on one file ------------------------------------------------------


def test_two_workers_and_two_clients_run_5000_tasks_once_each_early_ack(
    url: str, db: Path, tmp_path: Path
) -> None:
    outs = [tmp_path / f"worker{n}.txt" for n in range(2)]
    workers = [spawn(CONSUMER, url, "shared", out, "early", 3, 90, 0, 0.05) for out in outs]
    for worker in workers:
        wait_ready(worker)
    clients = [spawn(CLIENT, url, "shared", f"c{n}", 2500) for n in range(2)]
    for process in clients + workers:
        finish(process, timeout=90)
    per_worker = [ran(out) for out in outs]
    everything = [task_id for ids in per_worker for task_id in ids]
    expected = {f"c{c}-{n}" for c in range(2) for n in range(2500)}
    assert len(everything) == 5000, [len(ids) for ids in per_worker]
    assert set(everything) == expected
    assert all(per_worker), "both workers took a share"
    assert rows(db, "SELECT count(*) FROM messages") == [(0,)]


def test_late_ack_survives_a_worker_killed_mid_run(url: str, db: Path, tmp_path: Path) -> None:
    total = 400
    producer = _core.Producer(url, origin="test")
    for n in range(total):
        producer.send("tasks.add", f"k-{n}", [n, 0], {}, "kill")
    producer.flush(10.0)
    doomed_out, survivor_out = tmp_path / "doomed.txt", tmp_path / "survivor.txt"
    doomed = spawn(CONSUMER, url, "kill", doomed_out, "late", 30, 60, 0.01, 0.05)
    wait_ready(doomed)
    deadline = time.monotonic() + 20
    while len(ran(doomed_out)) < 20:
        assert time.monotonic() < deadline and doomed.poll() is None
        time.sleep(0.01)
    doomed.kill()  # SIGKILL, holding claimed and unacked messages
    doomed.communicate(timeout=10)
    claimed = rows(db, "SELECT count(*) FROM messages WHERE claimed_at IS NOT NULL")[0][0]
    assert claimed > 0, "the killed worker held messages"
    survivor = spawn(CONSUMER, url, "kill", survivor_out, "late", 3, 60, 0, 0.05)
    wait_ready(survivor)
    finish(survivor, timeout=60)
    done = set(ran(doomed_out)) | set(ran(survivor_out))
    assert done == {f"k-{n}" for n in range(total)}, "every task ran at least once"
    assert rows(db, "SELECT count(*) FROM messages") == [(0,)]


def test_the_file_is_shared_by_broker_and_backend(url: str, db: Path) -> None:
    producer = _core.Producer(url, origin="test")
    producer.send("tasks.add", "x", [1, 1], {}, "q")
    producer.flush()
    store = _core.Backend(url)
    store.store("x", success(2))
    store.flush()
    tables = {name for (name,) in rows(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "results", "peers"} <= tables
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    meta = json.loads(rows(db, "SELECT meta FROM results")[0][0])  # stored as text
    assert meta["result"] == 2
    store.close()
