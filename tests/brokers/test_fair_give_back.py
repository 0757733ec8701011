"""``-O fair`` on every broker: a prefork child that starts a task which may be long gives
back the messages it prefetched and has not started, so an idle sibling runs them
meanwhile; each comes back with everything it carried (retries, ETA, headers) and none
is lost.

Every wait is bounded; nothing asserts on speed (that is ``benches/``).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import AMQP_URL, REDIS_URL, app_module, delete_amqp, worker_env

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

pytestmark = pytest.mark.redis  # results (and the run records) are in Redis

FAIR_PY = app_module(
    "fair",
    """

@app.task
def sleeper(seconds):
    time.sleep(seconds)
    return seconds


@app.task(bind=True)
def probe(self):
    request = self.request
    return [os.getpid(), request.retries, request.eta, request.get("x_carried")]
""",
    imports=("import time",),
)

#: Two children, a window of four messages each.
FAIR_WORKER = ("-c", "2", "--prefetch-multiplier", "4", "-O", "fair")

#: broker -> result backend ("sqlite": the test's own file for both).
BROKERS = {"redis": (REDIS_URL, REDIS_URL), "amqp": (AMQP_URL, REDIS_URL), "sqlite": ("", "")}


@pytest.fixture(params=sorted(BROKERS))
def fair(request: pytest.FixtureRequest, tasks_dir: TasksDir, tmp_path: Path) -> Iterator[TasksDir]:
    """The ``fair`` tasks module on one broker; a test lists it before ``worker`` so that
    its queue is removed after the worker stopped."""
    broker, backend = BROKERS[request.param]
    if request.param == "sqlite":
        broker = backend = f"sqlite://{tmp_path / 'celeriac.sqlite3'}"
    tasks_dir.env = worker_env(tasks_dir.queue, broker, backend)
    tasks_dir.write("fair.py", FAIR_PY)
    yield tasks_dir
    if request.param == "amqp":
        delete_amqp(AMQP_URL, tasks_dir.queue)


def _child_pids(parent: int) -> set[int]:
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            return {int(pid) for pid in f.read().split()}
    except OSError:
        return set()


def test_prefork_child_gives_back_what_waits_behind_a_long_task(
    fair: TasksDir, worker: StartWorker, result_keys: ResultKeys
) -> None:
    """Two children with a window of four each: whichever takes the long task also
    holds some probes; it gives them back and the other child runs every probe while
    the long task runs. Without the give-back a probe waits the long task's 8 s."""
    process = worker(*FAIR_WORKER, "-n", f"fair-{fair.queue[-8:]}@test", pool="prefork", app="fair")
    tasks = fair.import_module("fair")
    long = tasks.sleeper.delay(8)
    eta = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    probes = [
        tasks.probe.apply_async(retries=2, eta=eta, headers={"x_carried": f"probe-{n}"})
        for n in range(6)
    ]
    for r in [long, *probes]:
        result_keys.add(r.id)
    try:
        seen = [r.get(timeout=6) for r in probes]
    except Exception as exc:
        pytest.fail(f"a probe waited behind the long task or was lost: {exc!r}\n{process.log}")
    assert not long.ready(), "the probes waited for the long task"
    for n, (_pid, retries, seen_eta, carried) in enumerate(seen):
        assert retries == 2, seen
        assert datetime.datetime.fromisoformat(seen_eta) == eta, seen
        assert carried == f"probe-{n}", seen
    assert long.get(timeout=20) == 8
    assert {pid for pid, *_ in seen} <= _child_pids(process.proc.pid)


def test_a_message_past_its_expiry_is_revoked_not_given_back(
    fair: TasksDir, worker: StartWorker, result_keys: ResultKeys
) -> None:
    """A child about to run a long task settles what it holds past its expiry (REVOKED)
    instead of giving it back: Celery also sends ``expires`` to RabbitMQ as a message
    TTL, and RabbitMQ drops a message that comes back past it, leaving no record."""
    process = worker(*FAIR_WORKER, "-n", f"fair-{fair.queue[-8:]}@test", pool="prefork", app="fair")
    tasks = fair.import_module("fair")
    long = tasks.sleeper.delay(4)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    expired = [tasks.probe.apply_async(expires=past) for _ in range(4)]
    for r in [long, *expired]:
        result_keys.add(r.id)
    for r in expired:
        with pytest.raises(Exception) as raised:
            r.get(timeout=10)
        assert type(raised.value).__name__ == "TaskRevokedError", f"{raised.value!r}\n{process.log}"
        assert r.state == "REVOKED"
    assert long.get(timeout=20) == 4
