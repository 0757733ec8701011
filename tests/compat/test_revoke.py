"""Celery 5.7's own client revokes tasks on a celeriac prefork worker: a waiting task
is discarded, a running one is terminated, and ``inspect().revoked()`` lists both; the
results are what Celery's ``AsyncResult`` expects (REVOKED, ``TaskRevokedError``)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError
from conftest import wait_until

if TYPE_CHECKING:
    from compat.conftest import CompatDir

TIMEOUT = 3.0


def test_celery_client_revokes_on_a_celeriac_worker(
    compat: CompatDir, start_worker: Any, result_keys: Any
) -> None:
    from compat.test_events import Capture, _of

    capture = Capture(compat.env["CELERIAC_TEST_BROKER"])
    node = f"celeriac-{uuid.uuid4().hex[:8]}@test"
    worker = start_worker("celeriac", "-E", "-n", node, "-c", "2", pool="prefork")
    sender = compat.celery_app().app
    client = Celery(
        "revoke-client", broker=compat.env["CELERIAC_TEST_BROKER"], set_as_current=False
    )
    try:
        waiting = sender.send_task("compat.add", (1, 2), queue=compat.queue, countdown=3)
        running = sender.send_task("compat.sleep", (60,), queue=compat.queue)
        for r in (waiting, running):
            result_keys.add(r.id)
        worker.wait_for(rf"compat\.sleep\[{running.id}\] received")
        worker.wait_for(rf"compat\.add\[{waiting.id}\] received")
        # The sleep task runs in its child (remote control's ``active`` says so).
        assert wait_until(lambda: running.id in _active_ids(client, node), 15)
        replies = client.control.revoke(waiting.id, destination=[node], reply=True, timeout=TIMEOUT)
        assert replies == [{node: {"ok": f"tasks {{'{waiting.id}'}} flagged as revoked"}}]
        replies = client.control.revoke(
            running.id, destination=[node], terminate=True, reply=True, timeout=TIMEOUT
        )
        assert replies == [{node: {"ok": f"terminate: {running.id}"}}]
        for result, reason in ((waiting, "revoked"), (running, "terminated")):
            with pytest.raises(TaskRevokedError):
                result.get(timeout=15)
            assert result.state == "REVOKED"
            assert reason in str(result.result)
        worker.wait_for(rf"Discarding revoked task: compat\.add\[{waiting.id}\]", timeout=10)
        # The supervisor reports the child it stopped; the child the discarded message.
        stopped = capture.wait_for(_of("task-revoked", node, running.id), "terminated")[0]
        assert (stopped["terminated"], stopped["signum"]) == (True, "SIGTERM")
        skipped = capture.wait_for(_of("task-revoked", node, waiting.id), "revoked")[0]
        assert skipped["terminated"] is False
        revoked = client.control.inspect(destination=[node], timeout=TIMEOUT).revoked()
        assert revoked is not None
        assert {waiting.id, running.id} <= set(revoked[node])
        # The node goes on serving.
        after = sender.send_task("compat.add", (2, 2), queue=compat.queue)
        result_keys.add(after.id)
        assert after.get(timeout=15) == 4
    finally:
        client.close()
        capture.stop()


def _active_ids(client: Celery, node: str) -> list[str]:
    replies = client.control.inspect(destination=[node], timeout=TIMEOUT).active() or {}
    return [task["id"] for task in replies.get(node, [])]


ASYNC_TASKS = """

import asyncio


@app.task(name="compat.adouble")
async def adouble(x):
    await asyncio.sleep(0.01)
    return x * 2


@app.task(name="compat.afail")
async def afail():
    await asyncio.sleep(0)
    raise ValueError("aboom")


@app.task(name="compat.asleep")
async def asleep(seconds):
    await asyncio.sleep(seconds)
    return seconds
"""


def test_flower_sees_coroutines_and_revokes(
    compat: CompatDir, start_worker: Any, result_keys: Any
) -> None:
    from compat.test_events import Capture, _of

    source = (compat.path / "compat_tasks.py").read_text()
    (compat.path / "compat_tasks.py").write_text(source + ASYNC_TASKS)
    capture = Capture(compat.env["CELERIAC_TEST_BROKER"])
    try:
        node = f"ev-async-{uuid.uuid4().hex[:6]}@test"
        worker = start_worker("celeriac", "-E", "-n", node, "-c", "1", pool="prefork")
        tasks = compat.celeriac_app()
        ok = tasks.adouble.delay(21)
        bad = tasks.afail.delay()
        long = tasks.asleep.delay(60)
        waiting = tasks.adouble.apply_async((1,), countdown=3)
        for r in (ok, bad, long, waiting):
            result_keys.add(r.id)
        assert ok.get(timeout=15) == 42
        worker.wait_for(rf"compat\.asleep\[{long.id}\] received")
        worker.wait_for(rf"compat\.adouble\[{waiting.id}\] received")
        long.revoke(terminate=True)
        waiting.revoke()
        capture.wait_for(_of("task-succeeded", node, ok.id), "task-succeeded")
        capture.wait_for(_of("task-failed", node, bad.id), "task-failed")
        stopped = capture.wait_for(_of("task-revoked", node, long.id), "terminated")[0]
        assert (stopped["terminated"], stopped["signum"], stopped["expired"]) == (
            True,
            "SIGTERM",
            False,
        )
        skipped = capture.wait_for(_of("task-revoked", node, waiting.id), "revoked")[0]
        assert (skipped["terminated"], skipped["expired"]) == (False, False)
        assert capture.task_events(ok.id) == ["task-received", "task-started", "task-succeeded"]
        with capture._cond:
            assert capture.state.tasks[ok.id].state == "SUCCESS"
            assert capture.state.tasks[bad.id].exception == "ValueError('aboom')"
            assert capture.state.tasks[long.id].state == "REVOKED"
    finally:
        capture.stop()
