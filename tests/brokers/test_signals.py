"""Signals on real workers: receivers defined in the tasks module write to Redis what
they received (signal, sender, pid, keyword names), and the tests check each signal
fired in the right process (a prefork child or the process that speaks for the node)
with Celery's keyword arguments. One run under the real ``celery`` worker checks the
same module fires the same signals, with the same keywords, in the same roles.

Every wait is bounded; nothing asserts on speed.
"""

from __future__ import annotations

import datetime
import json
import signal
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celeriac import signals as celeriac_signals
from conftest import REDIS_URL, WorkerProcess, app_module, wait_until, worker_env
from test_bad_input import b64, envelope

if TYPE_CHECKING:
    from conftest import ResultKeys, Scratch, StartWorker, TasksDir

pytestmark = pytest.mark.redis

SIGNAL_BODY = """
import datetime
import json

MAIN_PID = os.getpid()  # the process that imports the app: the worker's first
KEY = os.environ["CELERIAC_TEST_QUEUE"] + "-signals"


def describe(sender):
    if sender is None:
        return "None"
    if isinstance(sender, str):
        return "str"
    if isinstance(getattr(sender, "name", None), str) and hasattr(sender, "delay"):
        return "task:" + sender.name
    return "object"


def record(name):
    def receiver(sender=None, **kwargs):
        kwargs.pop("signal", None)
        entry = {
            "signal": name,
            "sender": describe(sender),
            "pid": os.getpid(),
            "main": os.getpid() == MAIN_PID,
            "keys": sorted(kwargs),
            "id": getattr(kwargs.get("request"), "id", None),
            "values": {k: kwargs[k] for k in ("state", "terminated", "signum", "expired")
                       if k in kwargs},
        }
        shared().rpush(KEY, json.dumps(entry))
    return receiver


_SHARED = []


def shared():  # one client per module (redis-py starts a new pool in a forked child)
    if not _SHARED:
        _SHARED.append(client())
    return _SHARED[0]


RECORDED = (
    "before_task_publish", "after_task_publish", "task_received", "task_prerun",
    "task_postrun", "task_success", "task_failure", "task_retry", "task_revoked",
    "task_rejected", "task_unknown", "celeryd_init", "celeryd_after_setup", "worker_init",
    "worker_process_init", "worker_process_shutdown", "worker_ready",
    "worker_shutting_down", "worker_shutdown", "import_modules", "after_setup_logger",
    "after_setup_task_logger", "task_internal_error",
)
# Held here: receivers are weakly referenced by default.
RECEIVERS = [record(name) for name in RECORDED]
for _name, _receiver in zip(RECORDED, RECEIVERS):
    getattr(signals, _name).connect(_receiver)


@app.task
def add(x, y):
    return x + y


@app.task
def fail():
    raise ValueError("boom")


@app.task(bind=True, max_retries=1)
def retry_once(self):
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return "retried"


@app.task
def nap(seconds):
    import time

    time.sleep(seconds)


if os.environ.get("SIG_ASYNC"):
    @app.task
    async def aadd(x, y):
        return x + y


signals.heartbeat_sent.connect(record("heartbeat_sent"), weak=False)


@signals.celeryd_init.connect
def configure_node(sender=None, conf=None, **kwargs):
    if os.environ.get("SIG_NODE") == sender:  # settings for one node, by its name
        conf.worker_send_task_events = True


class Broken(app.Task):  # fails in the worker after the body: a worker-side error
    def pop_request(self):
        super().pop_request()
        raise RuntimeError("worker-side failure")


@app.task(base=Broken)
def broken():
    return 1


@app.task
def guarded(x):
    return x


@signals.task_prerun.connect(sender=guarded)
def raising_receiver(sender=None, **kwargs):
    raise RuntimeError("receiver broke")


@signals.task_postrun.connect(sender=add)
def only_add(sender=None, task_id=None, **kwargs):
    shared().rpush(KEY + "-only-add", sender.name)


@signals.task_success.connect(dispatch_uid="one")
def first(sender=None, **kwargs):
    shared().rpush(KEY + "-uid", "first")


@signals.task_success.connect(dispatch_uid="one")
def second(sender=None, **kwargs):
    shared().rpush(KEY + "-uid", "second")


@signals.before_task_publish.connect
def add_trace_header(headers=None, **kwargs):
    headers["trace"] = "t-1"


@app.task(bind=True)
def trace_of(self):
    return self.request.get("trace") if hasattr(self.request, "get") else getattr(
        self.request, "trace", None
    )
"""


def signals_module(impl: str) -> str:
    imports = (f"from {impl} import signals",)
    return app_module("sigtasks", SIGNAL_BODY, imports=imports, impl=impl, redis_client=True)


def entries(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(key, 0, -1)]


def by_signal(recorded: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in recorded:
        out.setdefault(entry["signal"], []).append(entry)
    return out


@pytest.fixture
def sigtasks(tasks_dir: TasksDir, scratch: Scratch) -> Iterator[TasksDir]:
    for suffix in ("signals", "signals-only-add", "signals-uid"):
        scratch(suffix)
    tasks_dir.write("sigtasks.py", signals_module("celeriac"))
    # The module's receivers connect to celeriac's signals in this process too when a
    # test imports it (as a client): they must not reach the tests that follow.
    connected = {
        sig: list(sig.receivers)
        for sig in vars(celeriac_signals).values()
        if isinstance(sig, celeriac_signals.Signal)
    }
    yield tasks_dir
    for sig, receivers in connected.items():
        sig.receivers = receivers
    sys.modules.pop("sigtasks", None)


def run_scenario(tasks: Any, result_keys: ResultKeys) -> None:
    """The same messages for either worker: a success, a failure, a retry, an
    unknown task; every outcome waited for."""
    for result in (tasks.add.delay(2, 3), tasks.fail.delay(), tasks.retry_once.delay()):
        result_keys.add(result.id)
        result.get(timeout=20, propagate=False)
    unknown = tasks.app.send_task("sigtasks.nope")
    result_keys.add(unknown.id)
    unknown.get(timeout=20, propagate=False)


def role_of(entry: dict[str, Any], worker_pid: int) -> str:
    """``client``, ``node`` (the worker's first process) or ``child`` (one it forked)."""
    if entry["pid"] == worker_pid:
        return "node"
    return "client" if entry["main"] else "child"


def roles(recorded: list[dict[str, Any]], worker_pid: int) -> dict[str, set[tuple[str, str, str]]]:
    """Per signal: ``(role, kind of sender, keyword names)``."""
    out: dict[str, set[tuple[str, str, str]]] = {}
    for entry in recorded:
        seen = (role_of(entry, worker_pid), entry["sender"], ",".join(entry["keys"]))
        out.setdefault(entry["signal"], set()).add(seen)
    return out


def test_signals_fire_in_the_right_process_with_celerys_arguments(
    worker: StartWorker,
    sigtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
) -> None:
    process = worker("-c", "2", pool="prefork", app="sigtasks")
    key = f"{sigtasks.queue}-signals"
    tasks = sigtasks.import_module("sigtasks")
    run_scenario(tasks, result_keys)
    assert process.proc.send_signal(signal.SIGTERM) is None
    assert process.wait(20) == 0
    recorded = entries(redis_client, key)
    seen = by_signal(recorded)
    pid = process.proc.pid
    node = [e for e in recorded if e["pid"] == pid]
    children = {e["pid"] for e in recorded if e["pid"] != pid and not e["main"]}
    assert len(children) == 2, recorded  # -c 2: two forked children

    # The node's life, in the first process.
    for name in ("celeryd_init", "celeryd_after_setup", "worker_init", "worker_ready",
                 "worker_shutting_down", "worker_shutdown", "import_modules",
                 "after_setup_logger", "after_setup_task_logger"):  # fmt: skip
        assert [e["pid"] for e in seen[name]] == [pid], (name, seen.get(name))
    order = [e["signal"] for e in node]
    assert (
        order.index("import_modules")
        < order.index("celeryd_init")
        < order.index("worker_init")
        < order.index("worker_ready")
        < order.index("worker_shutting_down")
        < order.index("worker_shutdown")
    )
    assert seen["celeryd_init"][0]["keys"] == ["conf", "instance", "options"]
    assert seen["worker_shutting_down"][0]["keys"] == ["exitcode", "how", "sig"]
    # Each child: worker_process_init once after the fork, worker_process_shutdown as it exits.
    assert sorted(e["pid"] for e in seen["worker_process_init"]) == sorted(children)
    assert sorted(e["pid"] for e in seen["worker_process_shutdown"]) == sorted(children)
    assert seen["worker_process_shutdown"][0]["keys"] == ["exitcode", "pid"]
    assert all(e["sender"] == "str" for e in seen["worker_process_init"])

    # Tasks: in the child that runs them, the task object as sender.
    for name in ("task_prerun", "task_postrun", "task_success", "task_failure", "task_retry"):
        assert seen[name] and all(e["pid"] in children for e in seen[name]), (name, seen)
        assert all(e["sender"].startswith("task:sigtasks.") for e in seen[name])
    assert {e["sender"] for e in seen["task_success"]} == {
        "task:sigtasks.add",
        "task:sigtasks.retry_once",
    }
    assert seen["task_prerun"][0]["keys"] == ["args", "kwargs", "task", "task_id"]
    assert seen["task_postrun"][0]["keys"] == [
        "args",
        "kwargs",
        "retval",
        "state",
        "task",
        "task_id",
    ]
    assert seen["task_success"][0]["keys"] == ["result", "runtime"]
    assert seen["task_failure"][0]["keys"] == [
        "args", "einfo", "exception", "kwargs", "task_id", "traceback"
    ]  # fmt: skip
    assert seen["task_retry"][0]["keys"] == ["einfo", "reason", "request"]
    assert [e["sender"] for e in seen["task_unknown"]] == ["object"]
    assert seen["task_unknown"][0]["keys"] == ["exc", "id", "message", "name"]
    assert seen["task_received"][0]["keys"] == ["request"]
    # The client: around each send, the task name as sender.
    publish = seen["before_task_publish"]
    # add, fail, retry_once, nope from here; the retry from the child that ran it.
    assert len([e for e in publish if e["main"] and e["pid"] != pid]) == 4, publish
    assert len([e for e in publish if e["pid"] in children]) == 1, publish
    assert publish[0]["sender"] == "str"
    assert publish[0]["keys"] == [
        "body", "declare", "exchange", "headers", "properties", "retry_policy", "routing_key"
    ]  # fmt: skip
    assert seen["after_task_publish"][0]["keys"] == ["body", "exchange", "headers", "routing_key"]
    # sender= filtering and dispatch_uid.
    assert set(redis_client.lrange(f"{key}-only-add", 0, -1)) == {b"sigtasks.add"}
    assert redis_client.lrange(f"{key}-uid", 0, -1) == [b"first", b"first"]


def test_a_raising_receiver_is_logged_and_the_worker_keeps_serving(
    worker: StartWorker, sigtasks: TasksDir, result_keys: ResultKeys
) -> None:
    process = worker("-c", "1", pool="prefork", app="sigtasks")
    tasks = sigtasks.import_module("sigtasks")
    results = [tasks.guarded.delay(i) for i in range(3)] + [tasks.add.delay(1, 1)]
    for result in results:
        result_keys.add(result.id)
    assert [r.get(timeout=20) for r in results] == [0, 1, 2, 2]
    process.wait_for(
        r"Signal handler .*raising_receiver.* raised: RuntimeError\('receiver broke'\)"
    )
    assert "ForkPoolWorker-2" not in process.log  # the child was not replaced


def test_headers_added_before_publish_reach_the_task(
    worker: StartWorker, sigtasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    worker(app="sigtasks")
    tasks = sigtasks.import_module("sigtasks")
    result = tasks.trace_of.delay()
    result_keys.add(result.id)
    assert result.get(timeout=20) == "t-1"
    # The batch API too: each message gets the receivers' headers, under its own id.
    many = tasks.trace_of.delay_many([(), ()])
    for one in many:
        result_keys.add(one.id)
    assert [one.get(timeout=20) for one in many] == ["t-1", "t-1"]
    published = [
        e for e in entries(redis_client, f"{sigtasks.queue}-signals")
        if e["signal"] == "after_task_publish"
    ]  # fmt: skip
    assert len(published) == 3


def test_bad_message_sends_task_rejected_and_the_worker_goes_on(
    worker: StartWorker,
    sigtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
) -> None:
    queue = sigtasks.queue
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "sigtasks.add", "id": task_id, "eta": "next tuesday"}
    redis_client.rpush(queue, envelope(queue, body=b64([[1, 2], {}, {}]), headers=headers))
    redis_client.rpush(queue, b"\x00not json")
    worker(app="sigtasks")
    tasks = sigtasks.import_module("sigtasks")
    result = tasks.add.delay(20, 22)
    result_keys.add(result.id)
    assert result.get(timeout=20) == 42
    rejected = by_signal(entries(redis_client, f"{queue}-signals"))["task_rejected"]
    assert [e["keys"] for e in rejected] == [["exc", "message"], ["exc", "message"]]


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_worker_process_init_in_a_solo_worker_only(
    worker: StartWorker,
    sigtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    pool: str,
) -> None:
    # Celery's solo pool sends it in the worker's process; threads never does.
    process = worker(pool=pool, app="sigtasks")
    tasks = sigtasks.import_module("sigtasks")
    result = tasks.add.delay(1, 2)
    result_keys.add(result.id)
    assert result.get(timeout=20) == 3
    seen = by_signal(entries(redis_client, f"{sigtasks.queue}-signals"))
    inits = [e["pid"] for e in seen.get("worker_process_init", [])]
    assert inits == ([process.proc.pid] if pool == "solo" else [])
    assert [e["pid"] for e in seen["task_prerun"]] == [process.proc.pid]


def test_signals_on_sqlite(
    worker: StartWorker, sigtasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    url = f"sqlite:///{sigtasks.path / 'broker.db'}"
    sigtasks.env = {**worker_env(sigtasks.queue, url, REDIS_URL)}
    process = worker("-c", "1", pool="prefork", app="sigtasks")
    tasks = sigtasks.import_module("sigtasks")
    results = [tasks.add.delay(1, 2), tasks.fail.delay()]
    for result in results:
        result_keys.add(result.id)
        result.get(timeout=20, propagate=False)
    assert wait_until(
        lambda: "task_failure" in by_signal(entries(redis_client, f"{sigtasks.queue}-signals"))
    )
    seen = by_signal(entries(redis_client, f"{sigtasks.queue}-signals"))
    child = {e["pid"] for e in seen["worker_process_init"]}
    assert len(child) == 1 and process.proc.pid not in child
    assert {e["pid"] for e in seen["task_postrun"]} == child


def test_same_signals_as_celery(
    sigtasks: TasksDir,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    worker: StartWorker,
) -> None:
    """The same tasks module under the real ``celery`` worker (prefork, 1 child) and
    under celeriac's: the same signals, with the same keyword names, in the same role
    (client, node, child)."""
    key = f"{sigtasks.queue}-signals"
    found: dict[str, dict[str, set[tuple[str, str, str]]]] = {}
    sequences: dict[str, list[tuple[str, str]]] = {}
    for impl in ("celery", "celeriac"):
        redis_client.delete(key)
        sigtasks.write("sigtasks.py", signals_module(impl))
        if impl == "celery":
            argv = [sys.executable, "-m", "celery", "-A", "sigtasks", "worker", "-l", "info",
                    "-Q", sigtasks.queue, "-P", "prefork", "-c", "1", "--without-mingle",
                    "--without-gossip"]  # fmt: skip
            process = WorkerProcess(argv, sigtasks.path, sigtasks.env)
            process.wait_for(r" ready\.$", timeout=30)
        else:
            process = worker("-c", "1", pool="prefork", app="sigtasks", check_exit=False)
        tasks = sigtasks.import_module("sigtasks")
        run_scenario(tasks, result_keys)
        process.proc.send_signal(signal.SIGTERM)
        process.wait(30)
        recorded = entries(redis_client, key)
        found[impl] = roles(recorded, process.proc.pid)
        sequences[impl] = [(role_of(e, process.proc.pid), e["signal"]) for e in recorded]
    celery, ours = found["celery"], found["celeriac"]
    # Known difference (README): celeriac's prefork children fetch their own
    # messages, so task_received and task_unknown fire in the child, not the node.
    moved = {"task_received", "task_unknown"}
    for name in sorted(set(celery) | set(ours)):
        if name in moved:
            assert {k[1:] for k in celery[name]} == {k[1:] for k in ours[name]}, name
            continue
        assert celery.get(name) == ours.get(name), (name, celery.get(name), ours.get(name))
    # And in the same order in the node and in the child (heartbeats come by the clock).
    for role in ("node", "child"):
        orders = [
            [
                name
                for who, name in sequences[impl]
                if who == role and name not in moved | {"heartbeat_sent"}
            ]
            for impl in ("celery", "celeriac")
        ]
        assert orders[0] == orders[1], (role, orders)


def test_async_tasks_send_the_task_signals(
    worker: StartWorker, sigtasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    sigtasks.env["SIG_ASYNC"] = "1"
    process = worker("-c", "1", pool="prefork", app="sigtasks")
    tasks = sigtasks.import_module("sigtasks")
    result = tasks.app.send_task("sigtasks.aadd", (2, 3))
    result_keys.add(result.id)
    assert result.get(timeout=20) == 5
    # The result is stored before task_postrun runs (as in Celery): wait for it.
    assert wait_until(
        lambda: "task_postrun" in by_signal(entries(redis_client, f"{sigtasks.queue}-signals"))
    )
    seen = by_signal(entries(redis_client, f"{sigtasks.queue}-signals"))
    names = [e["signal"] for e in entries(redis_client, f"{sigtasks.queue}-signals")]
    assert [n for n in names if n in ("task_prerun", "task_success", "task_postrun")] == [
        "task_prerun",
        "task_success",
        "task_postrun",
    ]
    run = [seen[n][0] for n in ("task_prerun", "task_success", "task_postrun")]
    assert {e["sender"] for e in run} == {"task:sigtasks.aadd"}
    assert len({e["pid"] for e in run}) == 1 and run[0]["pid"] != process.proc.pid
    assert run[2]["values"] == {"state": "SUCCESS"}


def test_task_revoked_for_held_expired_and_terminated_tasks(
    worker: StartWorker, sigtasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    process = worker("-c", "1", pool="prefork", app="sigtasks")
    key = f"{sigtasks.queue}-signals"
    tasks = sigtasks.import_module("sigtasks")
    held = tasks.add.apply_async((1, 1), countdown=60)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    expired = tasks.add.apply_async((1, 1), expires=past)
    for result in (held, expired):
        result_keys.add(result.id)

    def revoked() -> list[dict[str, Any]]:
        return by_signal(entries(redis_client, key)).get("task_revoked", [])

    assert wait_until(lambda: any(e["values"].get("expired") for e in revoked()))
    tasks.app.control.revoke(held.id)
    assert wait_until(lambda: len(revoked()) == 2)
    running = tasks.nap.delay(60)
    result_keys.add(running.id)
    assert wait_until(lambda: "task_prerun" in by_signal(entries(redis_client, key)))
    tasks.app.control.revoke(running.id, terminate=True)
    assert wait_until(lambda: len(revoked()) == 3)
    found = revoked()
    assert [e["values"] for e in found] == [
        {"terminated": False, "signum": None, "expired": True},
        {"terminated": False, "signum": None, "expired": False},
        {"terminated": True, "signum": signal.SIGTERM, "expired": False},
    ]
    assert {e["sender"] for e in found} == {"task:sigtasks.add", "task:sigtasks.nap"}
    assert found[0]["pid"] != process.proc.pid  # the child that fetched them
    assert found[2]["pid"] == process.proc.pid  # the supervisor stopped the child
    assert all(e["keys"] == ["expired", "request", "signum", "terminated"] for e in found)


def test_heartbeat_sent_in_the_node_process(
    worker: StartWorker, sigtasks: TasksDir, redis_client: redis.Redis
) -> None:
    process = worker("-c", "1", pool="prefork", app="sigtasks")
    key = f"{sigtasks.queue}-signals"

    def beats() -> list[dict[str, Any]]:
        return by_signal(entries(redis_client, key)).get("heartbeat_sent", [])

    assert wait_until(lambda: len(beats()) >= 2)  # worker-online, then a heartbeat
    assert {(e["pid"], e["sender"]) for e in beats()} == {(process.proc.pid, "object")}


def test_task_received_once_per_task_when_children_give_messages_back(
    worker: StartWorker, sigtasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    # A prefork child puts back what it prefetched before a task it does not know to be
    # quick (-O fair); a sibling takes those again: still one task_received for each.
    worker("-c", "2", pool="prefork", app="sigtasks")
    tasks = sigtasks.import_module("sigtasks")
    results = [tasks.nap.delay(0.2) if i % 5 == 0 else tasks.add.delay(i, i) for i in range(40)]
    for result in results:
        result_keys.add(result.id)
    assert [r.get(timeout=30) for r in results] == [
        None if i % 5 == 0 else i + i for i in range(40)
    ]
    seen = by_signal(entries(redis_client, f"{sigtasks.queue}-signals"))
    received = sorted(e["id"] for e in seen["task_received"])
    assert received == sorted(r.id for r in results)


def test_task_internal_error_when_the_worker_fails_around_the_body(
    worker: StartWorker, sigtasks: TasksDir, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    process = worker(app="sigtasks")
    tasks = sigtasks.import_module("sigtasks")
    result = tasks.broken.delay()
    result_keys.add(result.id)
    process.wait_for(r"INTERNAL ERROR: RuntimeError\('worker-side failure'\)")
    after = tasks.add.delay(1, 1)  # the worker goes on
    result_keys.add(after.id)
    assert after.get(timeout=20) == 2
    found = by_signal(entries(redis_client, f"{sigtasks.queue}-signals"))["task_internal_error"]
    assert [(e["sender"], e["pid"]) for e in found] == [("task:sigtasks.broken", process.proc.pid)]
    assert found[0]["keys"] == [
        "args", "einfo", "exception", "kwargs", "request", "task_id", "traceback"
    ]  # fmt: skip


def test_celeryd_init_receivers_configure_a_node_by_name(
    worker: StartWorker, sigtasks: TasksDir
) -> None:
    sigtasks.env["SIG_NODE"] = f"{sigtasks.queue}@here"
    process = worker("-n", f"{sigtasks.queue}@here", app="sigtasks")
    assert "task events: ON" in process.stdout
    other = worker("-n", f"{sigtasks.queue}@there", app="sigtasks")
    assert "task events: OFF" in other.stdout
