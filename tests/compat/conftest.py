"""Fixtures for the interop suite: real Celery 5.7 beside celeriac.

Both sides load one module text, ``compat_tasks`` (celeriac) and ``celery_tasks``
(Celery), with the same explicitly named tasks, so a message sent by either client is
understood by either worker. Celery workers run as ``python -m celery ... worker -P
solo`` subprocesses; the Celery client runs in the test process.

Every test gets its own queue; Redis keys and RabbitMQ queues/exchanges named after it
are removed afterwards, as are the result keys of the task ids the test recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from conftest import (
    AMQP_URL,
    READY_TIMEOUT,
    REDIS_URL,
    ResultKeys,
    TasksDir,
    WorkerProcess,
    app_module,
    delete_amqp,
    worker_env,
)

#: broker + result backend pairs every interop test runs on.
PAIRS = {
    "redis": (REDIS_URL, REDIS_URL),
    "amqp-rpc": (AMQP_URL, "rpc://"),
}

#: One module body for both implementations (see :func:`compat_module`).
TASKS_BODY = '''\
app.conf.broker_connection_retry_on_startup = True
if os.environ.get("CELERIAC_TEST_PROTOCOL"):
    app.conf.task_protocol = int(os.environ["CELERIAC_TEST_PROTOCOL"])


@app.task(name="compat.add")
def add(x, y):
    return x + y


@app.task(name="compat.echo")
def echo(*args, **kwargs):
    """The arguments as received, and their type names (proof of decoding)."""
    return {
        "args": list(args),
        "kwargs": kwargs,
        "arg_types": [type(a).__name__ for a in args],
        "kwarg_types": {k: type(v).__name__ for k, v in kwargs.items()},
    }


@app.task(name="compat.fail")
def fail(kind, *args):
    if kind == "custom":
        raise compat_errors.CustomError(*args)
    if kind == "key":
        raise KeyError(*args)
    raise ValueError(*args)


@app.task(name="compat.flaky", bind=True, max_retries=3)
def flaky(self, succeed_after):
    if self.request.retries < succeed_after:
        raise self.retry(countdown=0.1)
    return self.request.retries


@app.task(name="compat.give_up", bind=True, max_retries=1)
def give_up(self):
    try:
        raise ValueError("still broken")
    except ValueError as exc:
        raise self.retry(exc=exc, countdown=0.1)


@app.task(name="compat.info", bind=True)
def info(self):
    """What the worker read from the message."""
    req = self.request
    delivery_info = req.delivery_info or {}
    timelimit = req.timelimit
    return {
        "id": req.id,
        "retries": req.retries,
        "eta": req.eta if req.eta is None else str(req.eta),
        "expires": req.expires if req.expires is None else str(req.expires),
        "timelimit": list(timelimit) if timelimit else None,
        "priority": delivery_info.get("priority"),
        "root_id": req.root_id,
        "parent_id": req.parent_id,
        "group": req.group,
        "group_index": req.group_index,
        "now": time.time(),
    }


@app.task(name="compat.record_failure")
def record_failure(task_id, key):
    """An errback of Celery's old kind (one argument left): sent as a message."""
    redis.Redis(host="127.0.0.1", port=6379).rpush(key, json.dumps(["message", task_id]))


@app.task(name="compat.on_error")
def on_error(request, exc, traceback, key):
    """An errback that takes (request, exc, traceback): called in the failing worker."""
    seen = ["inline", request.id, request.task, type(exc).__name__, str(exc),
            isinstance(traceback, str) and "Traceback" in traceback]
    redis.Redis(host="127.0.0.1", port=6379).rpush(key, json.dumps(seen))


@app.task(name="compat.tsum")
def tsum(numbers):
    return sum(numbers)


@app.task(name="compat.replaced", bind=True)
def replaced(self, x):
    """Hands its place to add(x, 100) (``self.replace``)."""
    return self.replace(add.s(x, 100))


@app.task(name="compat.sleep")
def sleep(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return seconds
'''

ERRORS_PY = '''\
class CustomError(Exception):
    """A user exception both sides can import."""
'''


def compat_module(impl: str, module: str) -> str:
    """The tasks module ``module`` on ``impl`` (``celeriac`` or ``celery``)."""
    return app_module(
        module,
        TASKS_BODY,
        imports=("import json", "import time", "import redis", "import compat_errors"),
        impl=impl,
    )


class CompatDir(TasksDir):
    """The test directory with ``compat_tasks`` (celeriac) and ``celery_tasks``."""

    def __init__(self, path: Path, queue: str) -> None:
        super().__init__(path, queue)
        self.write("compat_errors.py", ERRORS_PY)
        self.write("compat_tasks.py", compat_module("celeriac", "compat_tasks"))
        self.write("celery_tasks.py", compat_module("celery", "celery_tasks"))

    def celeriac_app(self) -> ModuleType:
        return self.import_module("compat_tasks")

    def celery_app(self) -> ModuleType:
        return self.import_module("celery_tasks")


@pytest.fixture(params=sorted(PAIRS))
def compat(
    request: pytest.FixtureRequest, tmp_path: Path, queue_name: str, result_keys: ResultKeys
) -> Iterator[CompatDir]:
    """A test directory on one broker/backend pair; both apps are closed afterwards."""
    broker, backend = PAIRS[request.param]
    directory = CompatDir(tmp_path, queue_name)
    directory.env = worker_env(queue_name, broker, backend)
    yield directory
    close_compat(broker, queue_name)


def close_compat(broker: str, queue_name: str) -> None:
    """Close both apps of a compat directory, forget its modules, remove its queues."""
    for name in ("celery_tasks", "compat_tasks"):
        module = sys.modules.pop(name, None)
        app = getattr(module, "app", None)
        if app is not None:
            with contextlib.suppress(Exception):
                app.close()
    sys.modules.pop("compat_errors", None)
    if broker.startswith("amqp"):
        delete_amqp(broker, queue_name)


#: (client, worker) pairs.
DIRECTIONS = [("celery", "celeriac"), ("celeriac", "celery")]


def direction_id(direction: tuple[str, str]) -> str:
    return f"{direction[0]}-client-{direction[1]}-worker"


@pytest.fixture(params=DIRECTIONS, ids=direction_id)
def client(request: pytest.FixtureRequest, compat: CompatDir, start_worker: Any) -> ModuleType:
    """The client's task module, with a worker of the other kind ready on the queue."""
    client_kind, worker_kind = request.param
    start_worker(worker_kind)
    return compat.celery_app() if client_kind == "celery" else compat.celeriac_app()


def node_name() -> str:
    """A celeriac node name of its own: no other worker on the broker answers to it."""
    return f"celeriac-{uuid.uuid4().hex[:8]}@test"


def _cli(compat: CompatDir, program: str, app: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", program, "-A", app, *args],
        cwd=compat.path,
        env=compat.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def celeriac_cli(compat: CompatDir, *args: str) -> subprocess.CompletedProcess[str]:
    """``celeriac -A compat_tasks *args`` run to completion in the test's directory."""
    return _cli(compat, "celeriac", "compat_tasks", *args)


def celery_cli(compat: CompatDir, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A celery_tasks *args`` run to completion in the test's directory."""
    return _cli(compat, "celery", "celery_tasks", *args)


def celery_argv(app: str, queue: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-P",
        "solo",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "info",
        "-Q",
        queue,
        "-n",
        f"celery-{uuid.uuid4().hex[:8]}@%h",
        *extra,
    ]


@pytest.fixture
def start_worker(compat: CompatDir, result_keys: ResultKeys) -> Iterator[Any]:
    """``start_worker("celery" | "celeriac", *extra)``: a worker on the test's queue,
    ready; stopped (warm) at teardown, exit status 0 required."""
    started: list[WorkerProcess] = []

    def start(kind: str, *extra: str, pool: str = "solo") -> WorkerProcess:
        if kind == "celery":
            argv = celery_argv("celery_tasks", compat.queue, *extra)
            if pool != "solo":
                argv[argv.index("solo")] = pool
        else:
            argv = [
                sys.executable,
                "-m",
                "celeriac",
                "-A",
                "compat_tasks",
                "worker",
                "-l",
                "info",
                "-P",
                pool,
                "-Q",
                compat.queue,
                *extra,
            ]
        process = WorkerProcess(argv, compat.path, compat.env)
        started.append(process)
        process.wait_for(r" ready\.", timeout=READY_TIMEOUT)
        return process

    yield start

    failures: list[str] = []
    for process in started:
        status = process.stop()
        for task_id in process.task_ids():
            result_keys.add(task_id)
        if status != 0:
            failures.append(f"worker {process.argv} exited with {status}:\n{process.log}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


# -- Flower -------------------------------------------------------------------------


class Flower:
    """The real Flower on a free port of ``ports``, reading ``broker``'s events.

    Started as ``celery --broker=URL flower`` unless ``command`` says how (e.g.
    ``celeriac -A proj flower``); Flower's own options are added after it.
    """

    def __init__(
        self,
        cwd: Path,
        ports: range,
        *,
        broker: str = REDIS_URL,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = _free_port(ports)
        self.broker = broker
        argv = command or [sys.executable, "-m", "celery", "--broker", broker, "flower"]
        env = dict(env or os.environ, FLOWER_UNAUTHENTICATED_API="true")
        self.proc = subprocess.Popen(
            [*argv, f"--port={self.port}", "--address=127.0.0.1"],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, form: dict[str, str] | None = None, body: Any = None) -> Any:
        """A form (``form``) or a JSON body (``body``) posted to Flower's API."""
        if body is not None:
            data, kind = json.dumps(body).encode(), "application/json"
        else:
            data, kind = (
                urllib.parse.urlencode(form or {}).encode(),
                "application/x-www-form-urlencoded",
            )
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, headers={"Content-Type": kind}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _wait_listening(self) -> None:
        """Until Flower answers, then until it has the events of a probe sent now
        (Redis pub/sub keeps nothing for a subscriber that comes late)."""
        probe = str(uuid.uuid4())
        sender = Celery("probe", broker=self.broker, set_as_current=False)
        deadline = time.monotonic() + 30
        try:
            with sender.connection_for_write() as conn:
                dispatcher = sender.events.Dispatcher(conn, hostname=f"probe-{probe}")
                try:
                    while time.monotonic() < deadline:
                        if self.proc.poll() is not None:
                            error = self.proc.stderr.read() if self.proc.stderr else ""
                            raise AssertionError(f"flower exited: {error}")
                        dispatcher.send("task-received", uuid=probe, name="probe")
                        with contextlib.suppress(OSError, ValueError):
                            if self.get(f"/api/task/info/{probe}").get("uuid") == probe:
                                return
                        time.sleep(0.2)
                finally:
                    dispatcher.close()
        finally:
            sender.close()
        raise AssertionError("flower did not show the probe task within 30 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _free_port(ports: range) -> int:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {ports}")


@contextlib.contextmanager
def module_on_broker(broker: str, tasks_dir: TasksDir, name: str, text: str) -> Iterator[TasksDir]:
    """``tasks_dir`` with the module ``name`` (``text``) on ``broker`` (``"redis"`` or
    ``"amqp"``, results in Redis either way); the RabbitMQ queue is deleted after."""
    if broker == "amqp":
        tasks_dir.env = worker_env(tasks_dir.queue, AMQP_URL, REDIS_URL)
    tasks_dir.write(f"{name}.py", text)
    try:
        yield tasks_dir
    finally:
        if broker == "amqp":
            delete_amqp(AMQP_URL, tasks_dir.queue)
