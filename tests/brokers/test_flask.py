"""Flask's "Background Tasks with Celery" app factory, on celeriac: ``examples/flask``.

The example is copied into a temporary folder; its settings come from the environment
through Flask's ``from_prefixed_env`` (``FLASK_CELERY__broker_url`` ...), as a deployment
would set them. The worker is ``celeriac -A make_celery worker``; the client is the
Flask app's test client in another process, calling the example's views.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import READY_TIMEOUT, REDIS_URL, WorkerProcess, celeriac_argv

if TYPE_CHECKING:
    from conftest import ResultKeys

pytestmark = pytest.mark.redis

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flask"
RESULT_PREFIX = "RESULT:"
WAIT = 15

CLIENT = f'''
import json
import time

from shopfront import create_app, tasks

app = create_app()
client = app.test_client()


def wait(result_id):
    deadline = time.monotonic() + {WAIT}
    while time.monotonic() < deadline:
        answer = client.get(f"/tasks/result/{{result_id}}").get_json()
        if answer["ready"]:
            return answer
        time.sleep(0.05)
    raise TimeoutError(result_id)


added = wait(client.post("/tasks/add", data={{"a": 2, "b": 40}}).get_json()["result_id"])
greeted = wait(client.post("/tasks/greet", data={{"name": "Ann"}}).get_json()["result_id"])
print("{RESULT_PREFIX}" + json.dumps({{
    "added": added,
    "greeted": greeted,
    "direct": tasks.greeting.delay("Bob").get(timeout={WAIT}),
    "same_app": tasks.greeting.app is app.extensions["celery"],
}}))
'''


@pytest.fixture
def site(tmp_path: Path, queue_name: str) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "site"
    shutil.copytree(EXAMPLE, path, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(
        FLASK_CELERY__broker_url=REDIS_URL,
        FLASK_CELERY__result_backend=REDIS_URL,
        FLASK_CELERY__task_default_queue=queue_name,
        FLASK_GREETING="Hello from the environment",
        PYTHONUNBUFFERED="1",
    )
    return path, env


@pytest.fixture
def worker(site: tuple[Path, dict[str, str]], result_keys: ResultKeys) -> Iterator[WorkerProcess]:
    path, env = site
    argv = celeriac_argv("-A", "make_celery", "worker", "-l", "INFO", "-c", "1")
    process = WorkerProcess(argv, path, env)
    try:
        process.wait_for(r"ready\.", timeout=READY_TIMEOUT)
        yield process
    finally:
        for task_id in process.task_ids():
            result_keys.add(task_id)
        assert process.stop() == 0, process.log


def run_client(site: tuple[Path, dict[str, str]]) -> Any:
    path, env = site
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLIENT)],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"the client failed:\n{done.stdout}\n{done.stderr}"
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise AssertionError(f"the client printed no result:\n{done.stdout}")


def test_tasks_run_inside_the_flask_app_context(
    site: tuple[Path, dict[str, str]], worker: WorkerProcess
) -> None:
    """The worker made from the factory runs each task through FlaskTask.__call__:
    ``flask.current_app`` is the app, with the config the environment gave it."""
    answers = run_client(site)
    assert answers["added"] == {"ready": True, "successful": True, "value": 42}
    assert answers["greeted"] == {
        "ready": True,
        "successful": True,
        "value": "Hello from the environment, Ann (shopfront)",
    }
    assert answers["direct"] == "Hello from the environment, Bob (shopfront)"
    assert answers["same_app"] is True  # the shared task sends through extensions["celery"]
    assert "shopfront.tasks.greeting" in worker.log  # found by the worker ([tasks])
