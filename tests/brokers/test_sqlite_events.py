"""Events on the embedded SQLite broker: a real ``celeriac worker -E`` on a temporary
file, read back by celeriac's own ``EventReceiver`` (Celery's receiver cannot open
that transport), with the fields Celery's monitors read."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import celeriac
import pytest
from celeriac import _core
from celeriac.events import EventReceiver
from conftest import EVENT_WAIT, EventLog, worker_env

if TYPE_CHECKING:
    from conftest import StartWorker, TasksDir

#: Celery's fields of every event, and of the worker events.
COMMON = {"type", "hostname", "timestamp", "utcoffset", "pid", "clock", "local_received"}
WORKER = COMMON | {"freq", "active", "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys"}


class Capture(EventLog):
    """An ``EventReceiver`` draining in a thread."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.receiver = EventReceiver(app, handlers={"*": self._on_event})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.receiver.capture(limit=None, timeout=0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def sqlite_tasks(tasks_dir: TasksDir, tmp_path: Path) -> TasksDir:
    url = f"sqlite://{tmp_path / 'celeriac.sqlite3'}"
    tasks_dir.env = worker_env(tasks_dir.queue, url, url)
    return tasks_dir


@pytest.fixture
def capture(sqlite_tasks: TasksDir) -> Iterator[Capture]:
    tasks = sqlite_tasks.import_module()
    # Subscribe before the worker starts: it sees worker-online.
    found = Capture(tasks.app)
    yield found
    found.stop()


def _of(type_: str, task_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        return event["type"] == type_ and (task_id is None or event.get("uuid") == task_id)

    return match


def test_worker_dash_e_sends_worker_and_task_events(
    sqlite_tasks: TasksDir, capture: Capture, worker: StartWorker
) -> None:
    process = worker("-E", "-n", "ev1@%h")
    online = capture.wait_for(_of("worker-online"), "worker-online")[0]
    assert set(online) >= WORKER
    assert online["hostname"].startswith("ev1@")
    assert (online["sw_ident"], online["sw_ver"]) == ("celeriac", celeriac.__version__)
    beat = capture.wait_for(_of("worker-heartbeat"), "worker-heartbeat")[0]
    assert set(beat) >= WORKER
    assert beat["clock"] > online["clock"]

    tasks = sqlite_tasks.import_module()
    result = tasks.add.delay(2, 3)
    assert result.get(timeout=10) == 5
    succeeded = capture.wait_for(_of("task-succeeded", result.id), "task-succeeded")[0]
    assert set(succeeded) >= COMMON
    assert "runtime" in succeeded
    received = capture.wait_for(_of("task-received", result.id), "task-received")[0]
    assert received["name"] == "tasks.add"
    assert received["args"] == "(2, 3)"
    capture.wait_for(_of("task-started", result.id), "task-started")

    process.stop()
    offline = capture.wait_for(_of("worker-offline"), "worker-offline")[0]
    assert offline["hostname"] == online["hostname"]
    assert "Events are off" not in process.log


#: Runs in a child process: write one broadcast row straight into the file (a
#: corrupt one, then a valid one) with Python's own sqlite3.
CORRUPT = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], timeout=10)
    for payload in sys.argv[2:]:
        with conn:
            conn.execute(
                "INSERT INTO broadcast (exchange, routing_key, created, payload) "
                "VALUES ('celeryev', 'worker.heartbeat', ?, ?)",
                (time.time(), payload),
            )
    """
)


def _envelope(body: Any) -> str:
    import base64

    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": "x@y"},
            "properties": {"body_encoding": "base64", "delivery_tag": "t1"},
        }
    )


def test_a_corrupt_broadcast_row_is_logged_and_skipped(
    sqlite_tasks: TasksDir, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = sqlite_tasks.import_module()
    receiver = EventReceiver(tasks.app)
    good = {"type": "worker-heartbeat", "hostname": "x@y", "clock": 7}
    subprocess.run(
        [
            sys.executable,
            "-c",
            CORRUPT,
            str(tmp_path / "celeriac.sqlite3"),
            "not an envelope {",
            _envelope("not an event"),
            _envelope(good),
        ],
        check=True,
        timeout=30,
    )
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + EVENT_WAIT
    with caplog.at_level("WARNING", logger="celeriac.events"):
        while not events and time.monotonic() < deadline:
            events = receiver.next_events(0.5)
    assert [e["clock"] for e in events] == [7]
    assert "unreadable event message" in caplog.text
    assert "without a type" in caplog.text


def test_an_event_whose_headers_hold_a_bad_kombu_marker_is_logged_and_skipped(
    sqlite_tasks: TasksDir, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver raised DecodeError for such a message, which ended ``capture``."""
    tasks = sqlite_tasks.import_module()
    receiver = EventReceiver(tasks.app)
    publisher = _core.EventPublisher(tasks.app.broker_url)
    bad_marker = {"__type__": "uuid", "__value__": {"hex": "zz"}}
    publisher.publish(
        "celeryev",
        "worker.heartbeat",
        {"type": "worker-heartbeat", "n": 1},
        headers={"hostname": bad_marker},
    )
    publisher.publish("celeryev", "worker.heartbeat", {"type": "worker-heartbeat", "n": 2})
    publisher.flush(10)
    publisher.close()
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + EVENT_WAIT
    with caplog.at_level("WARNING", logger="celeriac.events"):
        while not events and time.monotonic() < deadline:
            events = receiver.next_events(0.5)
    assert [e["n"] for e in events] == [2]
    assert "unreadable headers" in caplog.text


def test_the_receiver_only_sees_what_was_sent_after_it_subscribed(
    sqlite_tasks: TasksDir,
) -> None:
    tasks = sqlite_tasks.import_module()
    url = tasks.app.broker_url
    publisher = _core.EventPublisher(url)
    publisher.publish("celeryev", "worker.heartbeat", {"type": "worker-heartbeat", "n": 1})
    publisher.flush(10)
    receiver = EventReceiver(tasks.app)
    publisher.publish("celeryev", "worker.heartbeat", {"type": "worker-heartbeat", "n": 2})
    publisher.publish("other", "x", {"type": "worker-heartbeat", "n": 3})
    publisher.flush(10)
    publisher.close()
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + EVENT_WAIT
    while not events and time.monotonic() < deadline:
        events = receiver.next_events(0.5)
    assert [e["n"] for e in events] == [2]
    assert receiver.next_events(0.3) == []


def test_the_receiver_refuses_other_brokers(tasks_dir: TasksDir) -> None:
    tasks = tasks_dir.import_module()
    with pytest.raises(ValueError, match="SQLite"):
        EventReceiver(tasks.app)
