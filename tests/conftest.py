"""Shared fixtures: the real Redis, a unique queue per test, and real worker processes.

Nothing here is mocked. ``worker`` starts ``python -m celeriac -A tasks worker`` in a
temporary directory holding a small ``tasks`` module, waits for its ``ready.`` line,
and on teardown sends SIGTERM and checks the worker stopped cleanly (status 0).
Every Redis key a test touches is namespaced by its queue name or task ids, and removed.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from tls_pki import pki  # noqa: F401 (the fixture: the TLS tests' CA and certificates)

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
PRIORITY_SEP = "\x06\x16"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 20.0
#: Longest wait for an expected event (a bound, never a speed check).
EVENT_WAIT = 15.0

#: The top of every tasks module: ``app`` on the broker, result backend and default
#: queue that :func:`worker_env` puts in the environment, so the worker and the test
#: process share one module text.
APP_HEADER = """\
import os
{imports}
from {impl} import Celery

app = Celery(
    "{name}",
    broker=os.environ["CELERIAC_TEST_BROKER"],
    backend=os.environ["CELERIAC_TEST_BACKEND"],
)
app.conf.task_default_queue = os.environ["CELERIAC_TEST_QUEUE"]
"""

#: ``client()`` in a tasks module: the test Redis, where tasks leave what a test reads.
REDIS_CLIENT_PY = """

def client():
    return redis.Redis(host="127.0.0.1", port=6379, db=0)
"""


def app_module(
    name: str,
    body: str,
    *,
    imports: tuple[str, ...] = (),
    impl: str = "celeriac",
    redis_client: bool = False,
) -> str:
    """The text of the tasks module ``name`` (its ``app`` is named ``name`` too):
    :data:`APP_HEADER` for ``impl`` (``celeriac`` or ``celery``) with the ``imports``
    lines, ``client()`` (:data:`REDIS_CLIENT_PY`) when ``redis_client``, then ``body``."""
    if redis_client:
        imports = (*imports, "import redis")
    header = APP_HEADER.format(name=name, imports="\n".join(imports), impl=impl)
    return header + (REDIS_CLIENT_PY if redis_client else "") + body


#: The tutorial's tasks.
TASKS_PY = app_module(
    "tasks",
    '''

@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def fail():
    raise ValueError("boom", 42)


@app.task
def slow(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def rendezvous(key, parties, timeout=10.0):
    """True when ``parties`` tasks reached this point at the same time (bounded)."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    client.incr(key)
    client.expire(key, 60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(client.get(key) or 0) >= parties:
            return True
        time.sleep(0.01)
    return False


@app.task
def unserializable():
    return object()


@app.task(bind=True, max_retries=3)
def flaky(self, succeed_after):
    if self.request.retries < succeed_after:
        raise self.retry(countdown=0.1)
    return self.request.retries


@app.task(acks_late=True)
def late(x):
    return x
''',
    imports=("import time", "import redis"),
)


def _client() -> redis.Redis:
    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_connect_timeout=2)


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    """The real Redis. Fails (never skips) when it is not running."""
    client = _client()
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"these tests need the Redis server at {REDIS_HOST}:{REDIS_PORT} (db 0), "
            f"and it is not reachable: {exc}",
            pytrace=False,
        )
    yield client
    client.close()


def queue_keys(queue: str) -> list[str]:
    """The four priority lists kombu uses for ``queue``."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in (3, 6, 9)]


def queue_length(client: redis.Redis, queue: str) -> int:
    return sum(int(client.llen(key)) for key in queue_keys(queue))


def unacked_tags(client: redis.Redis, queue: str) -> list[str]:
    """Delivery tags in kombu's ``unacked`` hash whose message came from ``queue``."""
    tags: list[str] = []
    for tag, record in client.hscan_iter("unacked"):
        try:
            _envelope, _exchange, routing_key = json.loads(record)
        except (ValueError, TypeError):
            continue
        if isinstance(routing_key, str) and routing_key.startswith(queue):
            tags.append(tag.decode() if isinstance(tag, bytes) else str(tag))
    return tags


def recorded_runs(client: redis.Redis, key: str) -> list[tuple[int, float]]:
    """(number, time) of every run a test's ``record`` task pushed to ``key`` (``"number
    time"``), in the order they ran."""
    out = []
    for raw in client.lrange(key, 0, -1):
        number, at = raw.decode().split()
        out.append((int(number), float(at)))
    return out


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.fixture
def queue_name(redis_client: redis.Redis) -> Iterator[str]:
    """A queue no other test uses; its lists, binding and unacked entries are removed."""
    name = f"celeriac-test-{uuid.uuid4().hex[:12]}"
    yield name
    tags = unacked_tags(redis_client, name)
    # the queue's lists and bindings, and those of any queue named after it (name.b)
    keys = set(queue_keys(name))
    keys.update(redis_client.scan_iter(match=f"*{name}*", count=1000))
    pipe = redis_client.pipeline()
    pipe.delete(*keys)
    if tags:
        pipe.hdel("unacked", *tags)
        pipe.zrem("unacked_index", *tags)
    pipe.execute()


class ResultKeys:
    """Task ids whose ``celery-task-meta-*`` keys a test created; removed afterwards."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.ids: set[str] = set()

    def add(self, task_id: str) -> str:
        self.ids.add(task_id)
        return task_id

    def clear(self) -> None:
        if self.ids:
            self.client.delete(*(f"celery-task-meta-{i}" for i in self.ids))
            self.ids.clear()


@pytest.fixture
def result_keys(redis_client: redis.Redis) -> Iterator[ResultKeys]:
    keys = ResultKeys(redis_client)
    yield keys
    keys.clear()


def task_meta(client: redis.Redis, task_id: str) -> dict[str, Any]:
    """The stored ``celery-task-meta-*`` document of ``task_id`` (``{}`` when none)."""
    raw = client.get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else {}


def success_meta(task_id: str, result: Any) -> dict[str, Any]:
    """The result document Celery stores for a task that returned ``result`` now."""
    return {
        "status": "SUCCESS",
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "task_id": task_id,
    }


def worker_env(queue: str, broker: str = REDIS_URL, backend: str = REDIS_URL) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CELERIAC_TEST_BROKER=broker,
        CELERIAC_TEST_BACKEND=backend,
        CELERIAC_TEST_QUEUE=queue,
        PYTHONUNBUFFERED="1",
    )
    return env


_TASK_ID = re.compile(r"Task [\w.]+\[([^\]]+)\] received")


class WorkerProcess:
    """A running ``celeriac worker`` with its output captured line by line."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Condition()
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr_lines)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    def _read(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._lock:
                sink.append(line.rstrip("\n"))
                self.lines.append(line.rstrip("\n"))
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    @property
    def stdout(self) -> str:
        with self._lock:
            return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self.stderr_lines)

    @property
    def log(self) -> str:
        """stdout and stderr, interleaved in arrival order."""
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Wait until ``count`` output lines match the regex ``pattern``; fail otherwise."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reading()):
                    break
                self._lock.wait(min(left, 0.2))
        pytest.fail(
            f"no {count} line(s) matching {pattern!r} within {timeout}s "
            f"(exit status {self.proc.poll()}); output:\n{self.log}",
            pytrace=False,
        )

    def _reading(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def task_ids(self) -> set[str]:
        return set(_TASK_ID.findall(self.log))

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (warm shutdown) and wait; kill and fail if it does not stop."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail(f"worker did not exit within {timeout}s; output:\n{self.log}")
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return status

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.wait(10)


def celeriac_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "celeriac", *args]


class TasksDir:
    """A temporary directory holding ``tasks.py`` (and friends), importable here too."""

    def __init__(self, path: Path, queue: str) -> None:
        self.path = path
        self.queue = queue
        self.env = worker_env(queue)
        self.write("tasks.py", TASKS_PY)

    def write(self, name: str, text: str) -> Path:
        target = self.path / name
        target.write_text(textwrap.dedent(text))
        return target

    def import_module(self, name: str = "tasks") -> ModuleType:
        """Import ``name`` from this directory, fresh (each test has its own copy)."""
        saved = {key: os.environ.get(key) for key in self.env if key.startswith("CELERIAC_TEST_")}
        for key in saved:
            os.environ[key] = self.env[key]
        sys.modules.pop(name, None)
        sys.path.insert(0, str(self.path))
        try:
            importlib.invalidate_caches()
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(self.path))
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def tasks_dir(tmp_path: Path, queue_name: str) -> Iterator[TasksDir]:
    tasks = TasksDir(tmp_path, queue_name)
    yield tasks
    for name in ("tasks", "celeryconfig"):
        sys.modules.pop(name, None)


Scratch = Callable[[str], str]


@pytest.fixture
def scratch(redis_client: redis.Redis, tasks_dir: TasksDir) -> Iterator[Scratch]:
    """``scratch("name")``: a Redis key of this test's own (named after its queue),
    removed afterwards."""
    made: list[str] = []

    def key(name: str) -> str:
        made.append(f"{tasks_dir.queue}-{name}")
        return made[-1]

    yield key
    if made:
        redis_client.delete(*made)


def delete_amqp(broker: str, *queues: str) -> None:
    """Remove our durable queues and their same-named exchanges from RabbitMQ."""
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(broker, connect_timeout=5) as conn:
        channel = conn.default_channel
        for queue in queues:
            with contextlib.suppress(Exception):
                channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                channel.exchange_delete(queue)


@pytest.fixture
def on_rabbitmq(tasks_dir: TasksDir) -> Iterator[str]:
    """Point this test's tasks modules (worker and client) at RabbitMQ, results in
    Redis; the queue is removed from RabbitMQ afterwards."""
    tasks_dir.env = worker_env(tasks_dir.queue, AMQP_URL, REDIS_URL)
    yield tasks_dir.queue
    delete_amqp(AMQP_URL, tasks_dir.queue)


class EventLog:
    """Events that arrive in another thread (``_on_event``), waited for with a bound."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, count: int = 1
    ) -> list[dict[str, Any]]:
        """The first ``count`` events that match; fail after ``EVENT_WAIT`` seconds."""
        deadline = time.monotonic() + EVENT_WAIT
        with self._cond:
            while True:
                found = [e for e in self.events if predicate(e)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(e["type"], e.get("uuid")) for e in self.events]
                    pytest.fail(f"no {count} {what} within {EVENT_WAIT}s; saw {seen}")
                self._cond.wait(min(left, 0.2))


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def worker(
    tasks_dir: TasksDir, redis_client: redis.Redis, result_keys: ResultKeys
) -> Iterator[StartWorker]:
    """``worker(*extra_args, pool="solo", app="tasks", ready=True)`` starts a worker
    on the test's queue (``pool=None``: no ``-P``, the default pool); teardown stops it
    and requires exit status 0."""
    started: list[tuple[WorkerProcess, bool]] = []

    def start(
        *extra: str,
        pool: str | None = "solo",
        app: str = "tasks",
        loglevel: str = "info",
        ready: bool = True,
        check_exit: bool = True,
    ) -> WorkerProcess:
        pool_args = () if pool is None else ("-P", pool)
        argv = celeriac_argv(
            "-A", app, "worker", "-l", loglevel, "-Q", tasks_dir.queue, *pool_args, *extra
        )
        process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
        started.append((process, check_exit))
        if ready:
            process.wait_for(r" ready\.$", timeout=READY_TIMEOUT)
        return process

    yield start

    failures: list[str] = []
    for process, check_exit in started:
        status = process.stop()
        for task_id in process.task_ids():
            result_keys.add(task_id)
        if check_exit and status != 0:
            failures.append(f"worker {process.argv} exited with {status}:\n{process.log}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


RunCli = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def run_cli(tasks_dir: TasksDir) -> RunCli:
    """``run_cli(*args, timeout=60)``: run ``python -m celeriac *args`` to completion in
    the test's directory and environment (bounded), capturing its output."""

    def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            celeriac_argv(*args),
            cwd=tasks_dir.path,
            env=tasks_dir.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def start_cli(tasks_dir: TasksDir) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_cli(*args)``: a celeriac process left running (killed at teardown if
    the test did not stop it)."""
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        process = WorkerProcess(celeriac_argv(*args), tasks_dir.path, tasks_dir.env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
