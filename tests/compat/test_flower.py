"""A celeriac worker (``-E``) in the real Flower, through Flower's HTTP API.

- ``celery --broker=URL flower`` (Flower as Celery users run it): the worker with its
  stats and registered tasks (remote control), its tasks with their states, results and
  timestamps, task info, and the write endpoints that need no task of Flower's app
  (revoke, send-task) acting on the celeriac worker; on Redis and RabbitMQ.
- ``celeriac -A proj flower``: Flower for the app's broker and result backend, knowing
  the app's tasks (``async-apply`` and ``rate-limit`` accept only those), a clear
  message when ``flower`` is not installed, and Flower's own error for a bad option.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from conftest import (
    EVENT_WAIT,
    READY_TIMEOUT,
    REDIS_URL,
    ResultKeys,
    TasksDir,
    WorkerProcess,
    app_module,
    celeriac_argv,
    wait_until,
)

from compat.conftest import Flower, module_on_broker

#: Ports this module may give the Flower it starts.
FLOWER_PORTS = range(7400, 7500)

FLOWER_TASKS_PY = app_module(
    "flower_tasks",
    """

@app.task
def add(x, y):
    return x + y


@app.task
def fail(message):
    raise ValueError(message)


# Routed away from the default queue, by the settings and by the task's own option.
ROUTED = os.environ["CELERIAC_TEST_QUEUE"] + ".b"
app.conf.task_routes = {"flower_tasks.by_setting": {"queue": ROUTED}}


@app.task(bind=True)
def by_setting(self):
    return self.request.delivery_info["routing_key"]


@app.task(bind=True, queue=ROUTED)
def by_option(self):
    return self.request.delivery_info["routing_key"]
""",
)


@pytest.fixture(params=["redis", "amqp"])
def flower_dir(request: pytest.FixtureRequest, tasks_dir: TasksDir) -> Iterator[TasksDir]:
    """The test's directory with ``flower_tasks``, on Redis or RabbitMQ (results in Redis)."""
    with module_on_broker(request.param, tasks_dir, "flower_tasks", FLOWER_TASKS_PY) as ready:
        yield ready


@pytest.fixture
def redis_flower_dir(tasks_dir: TasksDir) -> TasksDir:
    tasks_dir.write("flower_tasks.py", FLOWER_TASKS_PY)
    return tasks_dir


def _start_worker(tasks_dir: TasksDir, node: str) -> WorkerProcess:
    queues = f"{tasks_dir.queue},{tasks_dir.queue}.b"
    argv = celeriac_argv(
        "-A", "flower_tasks", "worker", "-l", "info", "-Q", queues, "-c", "2", "-E",
        "-n", node,
    )  # fmt: skip
    process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
    process.wait_for(r" ready\.$", timeout=READY_TIMEOUT)
    return process


def _listed(flower: Flower, node: str) -> dict[str, Any]:
    listed: dict[str, Any] = flower.get(f"/api/tasks?workername={node}")
    return listed


def test_flower_api_shows_and_drives_a_celeriac_worker(
    flower_dir: TasksDir, tmp_path: Path, result_keys: ResultKeys
) -> None:
    broker = flower_dir.env["CELERIAC_TEST_BROKER"]
    node = f"flower-{flower_dir.queue[-8:]}@test"
    flower = Flower(tmp_path, FLOWER_PORTS, broker=broker)
    client = Celery("client", broker=broker, set_as_current=False)
    try:
        worker = _start_worker(flower_dir, node)
        try:
            tasks = flower_dir.import_module("flower_tasks")
            ok = tasks.add.delay(2, 3)
            bad = tasks.fail.delay("boom")
            result_keys.add(ok.id)
            result_keys.add(bad.id)
            assert ok.get(timeout=EVENT_WAIT) == 5
            assert isinstance(bad.get(timeout=EVENT_WAIT, propagate=False), ValueError)

            # The worker, with what remote control tells Flower (stats, registered).
            workers = flower.get(f"/api/workers?workername={node}&refresh=1")
            assert workers[node]["stats"]["pool"]["max-concurrency"] == 2
            assert any(t.startswith("flower_tasks.add") for t in workers[node]["registered"])

            # Its tasks, from the events: states, results, timestamps.
            def both_final() -> bool:
                listed = _listed(flower, node)
                return (
                    listed.get(ok.id, {}).get("state") == "SUCCESS"
                    and listed.get(bad.id, {}).get("state") == "FAILURE"
                )

            assert wait_until(both_final, EVENT_WAIT), _listed(flower, node)
            listed = _listed(flower, node)
            done = listed[ok.id]
            assert (done["name"], done["args"], done["result"]) == (
                "flower_tasks.add",
                "(2, 3)",
                "5",
            )
            assert 0 < done["received"] <= done["started"] <= done["succeeded"]
            failed = listed[bad.id]
            assert "boom" in failed["exception"] and failed["failed"] >= failed["started"] > 0

            # The dashboard, from the worker's own events (which name celeriac): online.
            rows = flower.get("/workers?json=1")["data"]
            row = next(r for r in rows if r.get("hostname") == node)
            assert row["status"] is True, row

            info = flower.get(f"/api/task/info/{ok.id}")
            assert (info["uuid"], info["state"], info["worker"]) == (ok.id, "SUCCESS", node)

            # Revoke: the worker discards the task when it arrives.
            revoked_id = str(uuid.uuid4())
            result_keys.add(revoked_id)
            flower.post(f"/api/task/revoke/{revoked_id}", form={})
            assert wait_until(
                lambda: (
                    revoked_id
                    in (client.control.inspect(destination=[node], timeout=2).revoked() or {}).get(
                        node, []
                    )
                ),
                EVENT_WAIT,
            )
            tasks.add.apply_async((1, 1), task_id=revoked_id)
            assert wait_until(
                lambda: tasks.app.AsyncResult(revoked_id).state == "REVOKED", EVENT_WAIT
            )

            # send-task: Flower's Celery client sends by name; the celeriac worker runs it.
            sent = flower.post(
                "/api/task/send-task/flower_tasks.add",
                body={"args": [20, 22], "queue": flower_dir.queue},
            )
            result_keys.add(sent["task-id"])
            assert tasks.app.AsyncResult(sent["task-id"]).get(timeout=EVENT_WAIT) == 42
        finally:
            assert worker.stop() == 0, worker.log
    finally:
        client.close()
        flower.stop()


def test_celeriac_flower_runs_flower_for_the_app(
    redis_flower_dir: TasksDir, result_keys: ResultKeys
) -> None:
    node = f"cf-{redis_flower_dir.queue[-8:]}@test"
    flower = Flower(
        redis_flower_dir.path,
        FLOWER_PORTS,
        command=celeriac_argv("-A", "flower_tasks", "flower"),
        env=redis_flower_dir.env,
    )
    client = Celery("client", broker=REDIS_URL, set_as_current=False)
    try:
        worker = _start_worker(redis_flower_dir, node)
        try:
            workers = flower.get(f"/api/workers?workername={node}&refresh=1")
            assert any(t.startswith("flower_tasks.add") for t in workers[node]["registered"])
            # async-apply needs the task in Flower's app: celeriac declares the app's
            # tasks there, and the result backend (Flower reports the state from it).
            reply = flower.post("/api/task/async-apply/flower_tasks.add", body={"args": [20, 22]})
            result_keys.add(reply["task-id"])
            assert "state" in reply, reply
            tasks = redis_flower_dir.import_module("flower_tasks")
            assert tasks.app.AsyncResult(reply["task-id"]).get(timeout=EVENT_WAIT) == 42
            # ...routed as the app routes them (the worker reads the two queues).
            for name in ("by_setting", "by_option"):
                reply = flower.post(f"/api/task/async-apply/flower_tasks.{name}", body={})
                result_keys.add(reply["task-id"])
                routed = tasks.app.AsyncResult(reply["task-id"]).get(timeout=EVENT_WAIT)
                assert routed == f"{redis_flower_dir.queue}.b", name

            # Rate limit (a task of Flower's app too): set through Flower, seen by the worker.
            reply = flower.post(
                "/api/task/rate-limit/flower_tasks.add",
                form={"workername": node, "ratelimit": "7/m"},
            )
            assert "rate limit" in reply["message"].lower(), reply
            registered = client.control.inspect(destination=[node], timeout=5).registered(
                "rate_limit"
            )
            assert "flower_tasks.add [rate_limit=7/m]" in registered[node]
        finally:
            assert worker.stop() == 0, worker.log
    finally:
        client.close()
        flower.stop()


def test_celeriac_flower_without_flower_says_how_to_install(redis_flower_dir: TasksDir) -> None:
    shim = redis_flower_dir.path / "shim" / "flower"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("no module named flower (test shim)")\n')
    env = dict(redis_flower_dir.env, PYTHONPATH=str(shim.parent))
    done = subprocess.run(
        celeriac_argv("-A", "flower_tasks", "flower", "--port=7499"),
        cwd=redis_flower_dir.path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done
    assert "pip install flower" in done.stderr


def test_celeriac_flower_shows_flowers_error_for_a_bad_option(
    redis_flower_dir: TasksDir,
) -> None:
    done = subprocess.run(
        celeriac_argv("-A", "flower_tasks", "flower", "--port=notaport"),
        cwd=redis_flower_dir.path, env=redis_flower_dir.env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done
    assert "notaport" in done.stderr and "Flower stopped" in done.stderr


def test_celeriac_help_flower_describes_the_command(tmp_path: Path) -> None:
    # ``flower --help`` is Flower's own; ``help flower`` is celeriac's description.
    done = subprocess.run(
        celeriac_argv("help", "flower"), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done
    assert "pip install flower" in done.stdout
