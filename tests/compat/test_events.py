"""celeriac workers seen through Celery's own event receiver, as Flower sees them.

A real ``celery.events.EventReceiver`` (with ``celery.events.state.State``, Flower's
model) listens on the broker while a celeriac worker runs with ``-E``: it must see the
worker come online, beat, and go offline, and every task move through its states.
"""

from __future__ import annotations

import datetime
import platform
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import celeriac
import pytest
from celery import Celery
from celery.events.state import State
from conftest import EVENT_WAIT, EventLog

if TYPE_CHECKING:
    from conftest import ResultKeys

    from compat.conftest import CompatDir


class Capture(EventLog):
    """Celery's EventReceiver in a thread, feeding Flower's ``State``."""

    def __init__(self, broker: str) -> None:
        super().__init__()
        self.app = Celery("monitor", broker=broker, set_as_current=False)
        self.state = State()
        self._ready = threading.Event()
        self._receiver: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(EVENT_WAIT):
            raise AssertionError(f"the event receiver did not start: {self._error!r}")
        self._wait_subscribed()

    def _wait_subscribed(self) -> None:
        """Send probe events until one comes back.

        kombu calls ``on_consume_ready`` before its Redis channel has sent PSUBSCRIBE, and
        pub/sub keeps nothing for late subscribers: an event published in that gap is lost.
        """
        probe = f"probe-{uuid.uuid4().hex}"
        deadline = time.monotonic() + EVENT_WAIT
        with self.app.connection_for_write() as conn:
            dispatcher = self.app.events.Dispatcher(conn, hostname=probe)
            try:
                while time.monotonic() < deadline:
                    dispatcher.send("probe-ready")
                    with self._cond:
                        seen = self._cond.wait_for(
                            lambda: any(e.get("hostname") == probe for e in self.events), 0.2
                        )
                    if seen:
                        return
            finally:
                dispatcher.close()
        raise AssertionError(f"the event receiver saw no probe within {EVENT_WAIT}s")

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.state.event(event)
            super()._on_event(event)

    def _run(self) -> None:
        capture = self

        try:
            with self.app.connection_for_read() as conn:
                base = self.app.events.Receiver

                class Receiver(base):  # type: ignore[misc,valid-type]
                    def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
                        capture._ready.set()

                receiver = Receiver(conn, handlers={"*": self._on_event})
                self._receiver = receiver
                receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def task_events(self, task_id: str) -> list[str]:
        with self._cond:
            return [e["type"] for e in self.events if e.get("uuid") == task_id]

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)
        self.app.close()


@pytest.fixture
def capture(compat: CompatDir) -> Iterator[Capture]:
    watcher = Capture(compat.env["CELERIAC_TEST_BROKER"])
    yield watcher
    watcher.stop()


def _of(type_: str, hostname: str, task_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        if event.get("type") != type_ or event.get("hostname") != hostname:
            return False
        return task_id is None or event.get("uuid") == task_id

    return match


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_flower_sees_worker_and_tasks(
    compat: CompatDir,
    capture: Capture,
    start_worker: Any,
    result_keys: ResultKeys,
    pool: str,
) -> None:
    node = f"ev-{pool}-{compat.queue[-6:]}@test"
    worker = start_worker("celeriac", "-E", "-n", node, "-c", "2", pool=pool)
    online = capture.wait_for(_of("worker-online", node), "worker-online")[0]
    for field in ("freq", "active", "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys"):
        assert field in online
    for field in ("timestamp", "utcoffset", "pid", "clock"):
        assert field in online
    assert online["freq"] == 2.0
    # celeriac names itself (Celery sends "py-celery" and its version).
    assert (online["sw_ident"], online["sw_ver"]) == ("celeriac", celeriac.__version__)
    assert online["sw_sys"] == platform.system()

    tasks = compat.celeriac_app()
    ok = tasks.add.delay(2, 3)
    bad = tasks.fail.delay("value", "boom")
    retried = tasks.flaky.delay(1)
    expired = tasks.add.apply_async(
        (1, 1), expires=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    )
    for result in (ok, bad, retried, expired):
        result_keys.add(result.id)
    assert ok.get(timeout=10) == 5
    assert retried.get(timeout=10) == 1

    capture.wait_for(_of("task-succeeded", node, ok.id), "task-succeeded")
    capture.wait_for(_of("task-failed", node, bad.id), "task-failed")
    capture.wait_for(_of("task-retried", node, retried.id), "task-retried")
    capture.wait_for(_of("task-succeeded", node, retried.id), "retried task-succeeded")
    # On RabbitMQ a task sent already expired carries `expiration` 0 (as Celery sends it),
    # and RabbitMQ drops such a message unless a consumer can take it at once: while -O fair
    # has paused a prefork node's children, none can, and no worker ever sees it.
    on_redis = not compat.env["CELERIAC_TEST_BROKER"].startswith("amqp")
    if on_redis:
        revoked = capture.wait_for(_of("task-revoked", node, expired.id), "task-revoked")[0]
        assert revoked["expired"] is True
        assert revoked["terminated"] is False
    capture.wait_for(_of("worker-heartbeat", node), "worker-heartbeat")

    assert capture.task_events(ok.id) == ["task-received", "task-started", "task-succeeded"]
    with capture._cond:
        state = capture.state
        assert state.workers[node].alive
        assert state.workers[node].sw_ident == "celeriac"
        seen = state.tasks[ok.id]
        assert seen.state == "SUCCESS"
        assert seen.name == "compat.add"
        assert seen.args == "(2, 3)"
        assert seen.result == "5"
        assert seen.worker.hostname == node
        assert seen.runtime is not None and seen.runtime >= 0
        failed = state.tasks[bad.id]
        assert failed.state == "FAILURE"
        assert failed.exception == "ValueError('boom')"
        assert "ValueError" in failed.traceback
        assert state.tasks[retried.id].state == "SUCCESS"
        if on_redis:
            assert state.tasks[expired.id].state == "REVOKED"

    assert worker.stop() == 0
    capture.wait_for(_of("worker-offline", node), "worker-offline")
    with capture._cond:
        assert not capture.state.workers[node].alive


def test_a_prefork_child_announces_a_long_task_while_it_runs(
    compat: CompatDir, capture: Capture, start_worker: Any, result_keys: ResultKeys
) -> None:
    """task-started reaches a monitor while the task runs (Flower shows it STARTED), not
    in one batch with its task-succeeded once the child's loop is free again."""
    node = f"long-{compat.queue[-6:]}@test"
    start_worker("celeriac", "-E", "-n", node, "-c", "1", pool="prefork")
    capture.wait_for(_of("worker-online", node), "worker-online")
    result = compat.celeriac_app().sleep.delay(5)
    result_keys.add(result.id)
    capture.wait_for(_of("task-started", node, result.id), "task-started")
    assert "task-succeeded" not in capture.task_events(result.id)
    assert not result.ready()
    with capture._cond:
        assert capture.state.tasks[result.id].state == "STARTED"
    assert result.get(timeout=20) == 5


def test_task_events_need_dash_e(
    compat: CompatDir, capture: Capture, start_worker: Any, result_keys: ResultKeys
) -> None:
    # Without -E (and worker_send_task_events) only worker events are sent.
    node = f"quiet-{compat.queue[-6:]}@test"
    worker = start_worker("celeriac", "-n", node)
    capture.wait_for(_of("worker-online", node), "worker-online")
    result = compat.celeriac_app().add.delay(1, 1)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 2
    assert worker.stop() == 0
    capture.wait_for(_of("worker-offline", node), "worker-offline")
    with capture._cond:
        sent = [e["type"] for e in capture.events if e.get("hostname") == node]
    assert all(t.startswith("worker-") for t in sent), sent


def test_setting_turns_task_events_on(
    compat: CompatDir, capture: Capture, start_worker: Any, result_keys: ResultKeys
) -> None:
    compat.write(
        "celeryconfig.py",
        "worker_send_task_events = True\n",
    )
    text = (compat.path / "compat_tasks.py").read_text()
    (compat.path / "compat_tasks.py").write_text(
        text + "\napp.config_from_object('celeryconfig')\n"
    )
    node = f"setting-{compat.queue[-6:]}@test"
    start_worker("celeriac", "-n", node)
    result = compat.celeriac_app().add.delay(3, 4)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 7
    capture.wait_for(_of("task-succeeded", node, result.id), "task-succeeded")


def test_client_sends_task_sent(
    compat: CompatDir, capture: Capture, result_keys: ResultKeys
) -> None:
    tasks = compat.celeriac_app()
    tasks.app.conf.task_send_sent_event = True
    result = tasks.add.apply_async((5, 6), countdown=30)
    result_keys.add(result.id)
    tasks.app.close()  # sends what is pending
    sent = capture.wait_for(
        lambda e: e.get("type") == "task-sent" and e.get("uuid") == result.id, "task-sent"
    )[0]
    assert sent["hostname"].startswith("gen")
    assert sent["name"] == "compat.add"
    assert sent["args"] == "(5, 6)"
    assert sent["queue"] == compat.queue
    assert sent["retries"] == 0
    assert sent["eta"] is not None
    with capture._cond:
        assert capture.state.tasks[result.id].state == "PENDING"
        assert capture.state.tasks[result.id].name == "compat.add"
