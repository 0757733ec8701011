"""Celery's worker command line, unchanged, on celeriac: ``-f/--logfile``, ``--pidfile``,
``--purge``, ``--without-heartbeat``/``--heartbeat-interval``, ``--without-mingle``,
``--without-gossip``, ``--autoscale``, and the Celery options celeriac refuses with a
clear error. Real worker processes on the real Redis and on the default SQLite file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import TASKS_PY, app_module, queue_length, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

    import redis
    from conftest import ResultKeys, RunCli, StartWorker, TasksDir, WorkerProcess

    StartCli = Callable[..., WorkerProcess]

#: Longest wait for a worker or a log line (a bound, never a speed check).
WAIT = 20.0

#: The SQLite default: an app that names no broker and no backend.
DEFAULT_TASKS_PY = """\
import os
import time

from celeriac import Celery

app = Celery("tasks")
app.conf.task_default_queue = os.environ["CELERIAC_TEST_QUEUE"]


@app.task
def add(x, y):
    return x + y


@app.task
def slow(seconds):
    time.sleep(seconds)
    return seconds
"""

#: Sends ``tasks.add(x, y)``, prints the task id and then its result (bounded).
CALL = """\
import sys
import tasks

result = tasks.add.delay(int(sys.argv[1]), int(sys.argv[2]))
print(result.id, flush=True)
print(result.get(timeout=30))
"""

#: Sends ``count`` additions nobody runs yet; prints their ids.
SEND = """\
import sys
import tasks

for n in range(int(sys.argv[1])):
    print(tasks.add.delay(n, n).id)
tasks.app.close()
"""

#: Sends ``tasks.slow(seconds)`` and prints its id.
SEND_SLOW = """\
import sys
import tasks

print(tasks.slow.delay(float(sys.argv[1])).id)
tasks.app.close()
"""


def python(tasks_dir: TasksDir, script: str, *args: str) -> list[str]:
    """Run ``script`` in the tasks directory; its stdout lines (fails on an error)."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=tasks_dir.path,
        env=tasks_dir.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def call_add(tasks_dir: TasksDir, result_keys: ResultKeys, x: int, y: int) -> int:
    task_id, value = python(tasks_dir, CALL, str(x), str(y))
    result_keys.add(task_id)
    return int(value)


def wait_in_file(path: Path, pattern: str, process: WorkerProcess) -> str:
    """The file's text once a line matches ``pattern``; fails if the worker exits first
    or after ``WAIT`` seconds."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + WAIT
    while True:
        text = path.read_text() if path.exists() else ""
        if regex.search(text):
            return text
        if process.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"{pattern!r} not in {path} (worker exit status {process.proc.poll()}):\n"
                f"{text}\nworker output:\n{process.log}",
                pytrace=False,
            )
        time.sleep(0.05)


def log_lines(text: str) -> list[str]:
    """Lines in Celery's log format (``[time: LEVEL/process] message``)."""
    return [line for line in text.splitlines() if re.match(r"\[\d{4}-\d\d-\d\d .*?: \w+/", line)]


@pytest.fixture(params=["redis", "sqlite-default"])
def broker(request: pytest.FixtureRequest, tasks_dir: TasksDir) -> str:
    """The test's app on the real Redis (conftest's tasks), or an app that names no
    broker: celeriac's default, ``celeriac.sqlite3`` in the worker's directory."""
    if request.param == "sqlite-default":
        tasks_dir.write("tasks.py", DEFAULT_TASKS_PY)
        for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERIAC_APP"):
            tasks_dir.env.pop(name, None)
    return str(request.param)


# -- the whole Celery command line ---------------------------------------------------


def test_celery_command_line_runs_a_task(
    broker: str, tasks_dir: TasksDir, start_cli: StartCli, result_keys: ResultKeys
) -> None:
    """A Celery user's systemd line, unchanged: logs go to the file (not stderr), the
    pidfile holds the worker's pid while it runs and is gone after a warm shutdown."""
    process = start_cli(
        *("-A", "tasks", "worker", "-l", "INFO", "--without-gossip", "--without-mingle"),
        *("--without-heartbeat", "-f", "worker.log", "--pidfile", "w.pid"),
    )
    logfile, pidfile = tasks_dir.path / "worker.log", tasks_dir.path / "w.pid"
    wait_in_file(logfile, r" ready\.$", process)
    assert pidfile.read_text() == f"{process.proc.pid}\n"
    assert call_add(tasks_dir, result_keys, 2, 3) == 5
    text = wait_in_file(logfile, r"Task tasks\.add\[[-\w]+\] succeeded in .*: 5$", process)
    assert process.stop() == 0, process.log
    assert not pidfile.exists()
    assert "(celeriac)" in process.stdout  # the banner stays on stdout, as Celery's
    assert log_lines(process.log) == [], process.log  # every log line went to the file
    assert "/MainProcess] Connected to " in text
    if broker == "sqlite-default":
        assert (tasks_dir.path / "celeriac.sqlite3").exists()
        assert "sqlite://" in process.stdout


# -- -f/--logfile ---------------------------------------------------------------------


def test_logfile_per_child_with_node_name(
    tasks_dir: TasksDir, start_cli: StartCli, result_keys: ResultKeys
) -> None:
    """``-f %n%I.log``: the main process logs to ``<name>.log``, each prefork child to
    ``<name>-<index>.log`` (Celery numbers children from 1)."""
    node = f"files-{tasks_dir.queue}@test"
    process = start_cli(
        *("-A", "tasks", "worker", "-l", "info", "-P", "prefork", "-c", "2", "-n", node),
        *("-f", "%n%I.log"),
    )
    main_log = tasks_dir.path / f"files-{tasks_dir.queue}.log"
    wait_in_file(main_log, rf"/MainProcess\] {re.escape(node)} ready\.$", process)
    assert call_add(tasks_dir, result_keys, 20, 22) == 42
    assert process.stop() == 0, process.log
    children = sorted(p.name for p in tasks_dir.path.glob(f"files-{tasks_dir.queue}-*.log"))
    assert children == [f"files-{tasks_dir.queue}-1.log", f"files-{tasks_dir.queue}-2.log"]
    child_text = "".join((tasks_dir.path / name).read_text() for name in children)
    assert re.search(r"/ForkPoolWorker-\d\] Task tasks\.add\[[-\w]+\] succeeded", child_text)
    assert "ForkPoolWorker" not in main_log.read_text()
    assert "MainProcess" not in child_text
    assert log_lines(process.log) == [], process.log


def test_logfile_is_reopened_after_logrotate_moves_it(
    tasks_dir: TasksDir, start_cli: StartCli, result_keys: ResultKeys
) -> None:
    process = start_cli("-A", "tasks", "worker", "-l", "info", "-P", "solo", "-f", "w.log")
    logfile = tasks_dir.path / "w.log"
    wait_in_file(logfile, r" ready\.$", process)
    logfile.rename(tasks_dir.path / "w.log.1")
    assert call_add(tasks_dir, result_keys, 1, 1) == 2
    text = wait_in_file(logfile, r"Task tasks\.add\[[-\w]+\] succeeded", process)
    assert "ready." not in text  # a new file, not the moved one
    assert process.stop() == 0, process.log


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(
            "no/such/dir/w.log", "the directory {dir}/no/such/dir does not exist", id="dir"
        ),
        pytest.param("w%q.log", "unknown format key %q", id="format-key"),
        pytest.param(".", "'.' is not a file name", id="directory"),
    ],
)
def test_bad_logfile_starts_nothing(
    tasks_dir: TasksDir, run_cli: RunCli, value: str, message: str
) -> None:
    result = run_cli("-A", "tasks", "worker", "-f", value, "--pidfile", "w.pid")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("celeriac worker: error: argument -f/--logfile: ")
    assert message.format(dir=tasks_dir.path) in result.stderr
    assert result.stdout == ""  # no banner
    assert not (tasks_dir.path / "w.pid").exists()
    assert not (tasks_dir.path / "no").exists()


# -- --pidfile ------------------------------------------------------------------------


def test_pidfile_of_a_running_process_refuses_the_start(
    tasks_dir: TasksDir, run_cli: RunCli, redis_client: redis.Redis
) -> None:
    """Celery's rule and exit status (73, can't create): the pid is alive, so another
    worker may be running with this file."""
    pidfile = tasks_dir.path / "w.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # this test process: alive
    python(tasks_dir, SEND, "1")
    result = run_cli("-A", "tasks", "worker", "--pidfile", "w.pid", "-P", "solo")
    assert result.returncode == 73, result.stderr
    assert result.stderr == (
        f"celeriac worker: error: the pidfile {pidfile} exists and names process "
        f"{os.getpid()}, which is running: is this worker already running? "
        "(remove the file if not)\n"
    )
    assert result.stdout == ""
    assert pidfile.read_text() == f"{os.getpid()}\n"  # left alone
    assert queue_length(redis_client, tasks_dir.queue) == 1  # nothing was consumed


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(30)
    return done.pid


@pytest.mark.parametrize("content", ["dead", "garbage", "empty"])
def test_stale_pidfile_is_replaced(tasks_dir: TasksDir, worker: StartWorker, content: str) -> None:
    pidfile = tasks_dir.path / "w.pid"
    text = {"dead": f"{_dead_pid()}\n", "garbage": "not a pid\n", "empty": ""}[content]
    pidfile.write_text(text)
    process = worker("--pidfile", "w.pid")
    assert pidfile.read_text() == f"{process.proc.pid}\n"
    assert f"Replaced the stale pidfile {pidfile}" in process.stderr
    assert process.stop() == 0, process.log
    assert not pidfile.exists()


def test_pidfile_expands_the_node_name_and_goes_after_a_cold_shutdown(
    tasks_dir: TasksDir, start_cli: StartCli
) -> None:
    """``--pidfile %n.pid`` as Celery expands it; a cold shutdown (SIGQUIT) while a
    task runs still removes the file (the solo pool leaves through ``os._exit``)."""
    node = f"pid-{tasks_dir.queue}@test"
    process = start_cli(
        *("-A", "tasks", "worker", "-l", "info", "-P", "solo", "-n", node),
        *("--pidfile", "%n.pid"),
    )
    process.wait_for(r" ready\.$", timeout=WAIT)
    pidfile = tasks_dir.path / f"pid-{tasks_dir.queue}.pid"
    assert pidfile.read_text() == f"{process.proc.pid}\n"
    python(tasks_dir, SEND_SLOW, "30")
    process.wait_for(r"Task tasks\.slow\[[-\w]+\] received", timeout=WAIT)
    process.signal(signal.SIGQUIT)
    assert process.wait(WAIT) == 1
    assert not pidfile.exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("missing/w.pid", "the directory {dir}/missing does not exist", id="dir"),
        pytest.param(".", "'.' is not a file name", id="directory"),
        pytest.param("w%z.pid", "unknown format key %z", id="format-key"),
    ],
)
def test_bad_pidfile_starts_nothing(
    tasks_dir: TasksDir, run_cli: RunCli, value: str, message: str
) -> None:
    result = run_cli("-A", "tasks", "worker", "--pidfile", value)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("celeriac worker: error: argument --pidfile: ")
    assert message.format(dir=tasks_dir.path) in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        # /proc refuses new files whoever asks (the tests may run as root).
        ("--pidfile", "/proc/celeriac-w.pid", "cannot write /proc/celeriac-w.pid: "),
        ("-f/--logfile", "/proc/celeriac-w.log", "cannot write /proc/celeriac-w.log: "),
        ("--pidfile", "afile/w.pid", "the directory {dir}/afile is not a directory"),
    ],
)
def test_unwritable_file_starts_nothing(
    tasks_dir: TasksDir, run_cli: RunCli, flag: str, value: str, message: str
) -> None:
    (tasks_dir.path / "afile").write_text("")
    result = run_cli("-A", "tasks", "worker", flag.split("/")[-1], value)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"celeriac worker: error: argument {flag}: ")
    assert message.format(dir=tasks_dir.path) in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


# -- --purge ----------------------------------------------------------------------------


def test_purge_erases_the_consumed_queue_before_starting(
    broker: str, tasks_dir: TasksDir, worker: StartWorker, result_keys: ResultKeys
) -> None:
    purged = python(tasks_dir, SEND, "3")
    process = worker("--purge")
    assert f"purge: discarded 3 messages from queue {tasks_dir.queue}.\n" in process.stdout
    stdout = process.stdout
    assert stdout.index("purge: discarded") < stdout.index("(celeriac)")  # before the banner
    assert call_add(tasks_dir, result_keys, 4, 5) == 9
    assert not set(purged) & process.task_ids()  # none of them ran


def test_discard_is_purge_and_quiet_when_empty(tasks_dir: TasksDir, worker: StartWorker) -> None:
    process = worker("--discard")
    assert "purge:" not in process.stdout  # as Celery: a line only when it erased some


# -- worker events: --without-heartbeat, --heartbeat-interval -------------------------


def test_heartbeat_interval(tasks_dir: TasksDir, worker: StartWorker, start_cli: StartCli) -> None:
    node = f"hb-{tasks_dir.queue}@test"
    dump = start_cli("-A", "tasks", "events", "--dump")
    dump.wait_for("-> evdump: starting capture...", timeout=WAIT)
    worker("-n", node, "--heartbeat-interval", "0.25")
    beats = dump.wait_for(rf"^{re.escape(node)} \[.*\] heartbeat: ", timeout=WAIT, count=4)
    assert all("freq=0.25," in line for line in beats), beats


def test_without_heartbeat_sends_no_worker_events_but_task_events(
    tasks_dir: TasksDir,
    worker: StartWorker,
    start_cli: StartCli,
    result_keys: ResultKeys,
) -> None:
    """As Celery: no worker-online/heartbeat/offline; ``-E`` task events still flow."""
    node = f"nohb-{tasks_dir.queue}@test"
    dump = start_cli("-A", "tasks", "events", "--dump")
    dump.wait_for("-> evdump: starting capture...", timeout=WAIT)
    process = worker("-n", node, "-E", "--without-heartbeat", "--heartbeat-interval", "0.2")
    assert call_add(tasks_dir, result_keys, 3, 4) == 7
    dump.wait_for(rf"^{re.escape(node)} \[.*\] task succeeded: ", timeout=WAIT)
    assert process.stop() == 0, process.log
    # A marker event sent after the worker exited: once the dump shows it, it has shown
    # everything the worker sent (one Redis channel, in order), worker-offline included.
    from celeriac.events import EventDispatcher

    marker = f"marker-{tasks_dir.queue}@test"
    dispatcher = EventDispatcher(tasks_dir.import_module().app, marker)
    dispatcher.send("worker-heartbeat", freq=0.2, active=0, processed=0)
    dispatcher.close()
    dump.wait_for(rf"^{re.escape(marker)} \[.*\] heartbeat: ", timeout=WAIT)
    ours = [line for line in dump.stdout_lines if line.startswith(f"{node} ")]
    kinds = {line.split("] ", 1)[1].split(":", 1)[0] for line in ours}
    assert kinds == {"task received", "task started", "task succeeded"}, ours


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_bad_heartbeat_interval(run_cli: RunCli, value: str) -> None:
    result = run_cli("-A", "tasks", "worker", f"--heartbeat-interval={value}")
    assert result.returncode == 2
    assert result.stderr.startswith("celeriac worker: error: argument --heartbeat-interval: ")
    assert result.stdout == ""


# -- --autoscale ------------------------------------------------------------------------


def test_autoscale_runs_a_fixed_pool_of_the_maximum(
    tasks_dir: TasksDir, worker: StartWorker, result_keys: ResultKeys
) -> None:
    process = worker("--autoscale", "1,3", "-c", "7", pool="threads")
    assert ".> concurrency: 3 (threads)" in process.stdout
    assert (
        "--autoscale=3,1: celeriac does not resize the pool by load yet; "
        "running a fixed pool of 3 (the maximum)." in process.stderr
    )
    assert call_add(tasks_dir, result_keys, 1, 2) == 3


@pytest.mark.parametrize("value", ["1,2,3", "ten", "0", "4,-1", ""])
def test_bad_autoscale(run_cli: RunCli, value: str) -> None:
    result = run_cli("-A", "tasks", "worker", f"--autoscale={value}")
    assert result.returncode == 2
    assert result.stderr.startswith("celeriac worker: error: argument --autoscale: ")
    assert result.stdout == ""


# -- options celeriac does not have -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["-S", "worker.state"], "-S/--statedb"),
        (["--statedb=worker.state"], "-S/--statedb"),
    ],
)
def test_unsupported_option_is_an_error(
    tasks_dir: TasksDir, run_cli: RunCli, args: list[str], named: str
) -> None:
    result = run_cli("-A", "tasks", "worker", "-l", "info", *args, "--pidfile", "w.pid")
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"celeriac worker: error: {named} is not supported by celeriac yet: "
    )
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""
    assert not (tasks_dir.path / "w.pid").exists()


def test_worker_help_lists_the_options(run_cli: RunCli) -> None:
    result = run_cli("worker", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for option in (
        "-f FILE, --logfile FILE",
        "--pidfile FILE",
        "--purge, --discard",
        "--without-heartbeat",
        "--heartbeat-interval SECONDS",
        "--without-mingle",
        "--without-gossip",
        "--autoscale MAX,MIN",
        "-E, --task-events, --events",
        "-B, --beat",
        "-D, --detach",
        "--executable PYTHON",
        "-S VALUE, --statedb VALUE",
    ):
        assert option in text, option
    assert "does not send events" not in text
    assert "always schedules fairly" not in text


# -- --disable-prefetch -----------------------------------------------------------------

#: ``hold(key)``: counts itself started, then waits (bounded) until the test lets it go.
HOLDING_PY = app_module(
    "holding",
    """

@app.task
def hold(key, timeout=30.0):
    client().incr(key + "-started")
    client().expire(key + "-started", 120)
    deadline = time.monotonic() + timeout
    while not client().exists(key + "-go") and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()
""",
    imports=("import time",),
    redis_client=True,
)


@pytest.mark.parametrize(
    ("pool", "args", "taken"),
    [
        pytest.param(
            "threads", ("--disable-prefetch", "--prefetch-multiplier", "10"), 2, id="threads"
        ),
        pytest.param("prefork", ("--disable-prefetch",), 2, id="prefork"),
        pytest.param("threads", ("--prefetch-multiplier", "10"), 5, id="prefetching"),
    ],
)
def test_disable_prefetch_takes_a_message_only_for_a_free_slot(
    tasks_dir: TasksDir,
    worker: StartWorker,
    result_keys: ResultKeys,
    redis_client: redis.Redis,
    scratch: Callable[[str], str],
    pool: str,
    args: tuple[str, ...],
    taken: int,
) -> None:
    """Celery's ``--disable-prefetch`` on Redis (it wins over the multiplier): with two
    threads (or children) busy, the other three messages stay in the broker's queue,
    where another worker could take them; once they are free the rest run. Without it
    the worker takes all five at once."""
    tasks_dir.write("holding.py", HOLDING_PY)
    holding = tasks_dir.import_module("holding")
    key = scratch("hold")
    scratch("hold-started")
    scratch("hold-go")
    results = [holding.hold.delay(key) for _ in range(5)]
    for r in results:
        result_keys.add(r.id)

    def started() -> int:
        return int(redis_client.get(f"{key}-started") or 0)

    other = None
    try:
        worker("-c", "2", *args, pool=pool, app="holding")
        assert wait_until(lambda: started() == 2, WAIT)
        if taken == 5:  # the worker took them all: none is left in the queue
            assert wait_until(lambda: queue_length(redis_client, tasks_dir.queue) == 0, WAIT)
        else:  # the other three are still there: a second worker takes and starts them
            other = worker("-c", "3", pool="threads", app="holding")
            assert wait_until(lambda: started() == 5, WAIT), started()
    finally:
        redis_client.set(f"{key}-go", 1, ex=60)
    pids = [r.get(timeout=WAIT) for r in results]  # nothing lost
    if other is not None:
        assert pids.count(other.proc.pid) == 3, pids
    assert queue_length(redis_client, tasks_dir.queue) == 0


def test_disable_prefetch_is_ignored_with_a_warning_off_redis(
    tasks_dir: TasksDir, worker: StartWorker, result_keys: ResultKeys
) -> None:
    """As Celery, which supports it on Redis only: the default SQLite broker runs."""
    tasks_dir.write("tasks.py", DEFAULT_TASKS_PY)
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERIAC_APP"):
        tasks_dir.env.pop(name, None)
    process = worker("--disable-prefetch")
    assert (
        "--disable-prefetch (worker_disable_prefetch) works on Redis brokers only; "
        "ignored on sqlite://" in process.stderr
    )
    assert call_add(tasks_dir, result_keys, 6, 7) == 13


# -- -I/--include -----------------------------------------------------------------------

#: A module of more tasks on the app of ``tasks``, for ``-I``.
INCLUDED_PY = """\
from tasks import app


@app.task
def hello(who):
    return f"hello {{who}} from {name}"
"""


def test_include_imports_task_modules_at_start(
    tasks_dir: TasksDir, worker: StartWorker, result_keys: ResultKeys
) -> None:
    """``-I`` comma-separated and repeated, as Celery: the tasks of those modules are
    registered (listed in the banner) and run. ``--pool-start-method fork`` is the
    default, accepted."""
    names = ("extra_one", "extra_two", "extra_three")
    for name in names:
        tasks_dir.write(f"{name}.py", INCLUDED_PY.format(name=name))
    process = worker(
        *("-I", "extra_one", "--include", "extra_two, extra_three", "-c", "1"),
        *("--pool-start-method", "fork"),
        pool="prefork",
    )
    for name in names:
        assert f"  . {name}.hello" in process.stdout
    tasks = tasks_dir.import_module("tasks")
    results = [tasks.app.send_task(f"{name}.hello", args=[name]) for name in names]
    for r in results:
        result_keys.add(r.id)
    assert [r.get(timeout=WAIT) for r in results] == [f"hello {name} from {name}" for name in names]


@pytest.mark.parametrize(
    ("value", "status", "message"),
    [
        pytest.param(
            "extra_one,no_such_module",
            2,
            "argument -I/--include: module 'no_such_module' not found (looked in {dir} and "
            "sys.path)\n",
            id="missing",
        ),
        pytest.param("extra-one", 2, "argument -I/--include: 'extra-one' is not a module name\n"),
        pytest.param("tasks.", 2, "argument -I/--include: 'tasks.' is not a module name\n"),
        pytest.param(" , ", 2, "argument -I/--include: no module names given\n", id="empty"),
        pytest.param(
            "broken",
            1,
            "argument -I/--include: importing 'broken' failed: RuntimeError: no database\n",
            id="raises",
        ),
        pytest.param(
            "needs_dep",
            1,
            "argument -I/--include: importing 'needs_dep' failed: No module named "
            "'no_such_dependency'\n",
            id="missing-dependency",
        ),
    ],
)
def test_bad_include_starts_nothing(
    tasks_dir: TasksDir,
    run_cli: RunCli,
    redis_client: redis.Redis,
    value: str,
    status: int,
    message: str,
) -> None:
    tasks_dir.write("extra_one.py", INCLUDED_PY.format(name="extra_one"))
    tasks_dir.write("broken.py", 'raise RuntimeError("no database")\n')
    tasks_dir.write("needs_dep.py", "import no_such_dependency\n")
    python(tasks_dir, SEND, "1")
    result = run_cli("-A", "tasks", "worker", "-I", value, "--pidfile", "w.pid")
    assert result.returncode == status, result.stderr
    assert result.stderr.endswith(f"celeriac worker: error: {message.format(dir=tasks_dir.path)}")
    if status == 2:
        assert result.stderr.count("\n") == 1
    else:  # the module's own error, with its traceback
        assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stdout == ""
    assert not (tasks_dir.path / "w.pid").exists()
    assert queue_length(redis_client, tasks_dir.queue) == 1  # nothing was consumed


# -- -c ---------------------------------------------------------------------------------


def test_concurrency_auto(tasks_dir: TasksDir, worker: StartWorker) -> None:
    """Celery 5.7's ``-c auto``: the CPUs this process may use, whatever
    ``worker_concurrency`` says. With ``-P threads`` ``--pool-start-method spawn`` is
    accepted (it is about prefork)."""
    from celeriac.worker.options import available_cpus

    cpus = available_cpus()
    configured = cpus + 2
    tasks_dir.write("tasks.py", TASKS_PY + f"\napp.conf.worker_concurrency = {configured}\n")
    auto = worker("-c", "auto", "--pool-start-method", "spawn", pool="threads")
    assert f".> concurrency: {cpus} (threads)" in auto.stdout


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "autox"])
def test_bad_concurrency(run_cli: RunCli, value: str) -> None:
    result = run_cli("-A", "tasks", "worker", f"--concurrency={value}")
    assert result.returncode == 2
    assert result.stderr.startswith("celeriac worker: error: argument -c/--concurrency: ")
    assert result.stdout == ""


# -- --pool-start-method, and settings of the same options --------------------------------


@pytest.mark.parametrize(
    ("args", "setting", "message"),
    [
        pytest.param(
            ("--pool-start-method", "spawn"),
            "",
            "--pool-start-method spawn is not supported by celeriac yet: its prefork "
            "children are forked (leave it out, or give fork)",
            id="spawn",
        ),
        pytest.param(
            ("--pool-start-method", "forkserver"),
            "",
            "argument --pool-start-method: unknown start method 'forkserver' (choose from "
            "fork, spawn)",
            id="unknown",
        ),
        pytest.param(
            (),
            "app.conf.worker_pool_start_method = 'spawn'",
            "worker_pool_start_method spawn is not supported by celeriac yet",
            id="setting-spawn",
        ),
        pytest.param(
            (),
            "app.conf.worker_pool_start_method = 'forkserver'",
            "worker_pool_start_method must be 'fork' or 'spawn', not 'forkserver'",
            id="setting-unknown",
        ),
        pytest.param(
            (),
            "app.conf.worker_disable_prefetch = 'maybe'",
            "worker_disable_prefetch must be True or False, not 'maybe'",
            id="setting-disable-prefetch",
        ),
    ],
)
def test_bad_pool_options_start_nothing(
    tasks_dir: TasksDir, run_cli: RunCli, args: tuple[str, ...], setting: str, message: str
) -> None:
    tasks_dir.write("tasks.py", TASKS_PY + "\n" + setting + "\n")
    result = run_cli("-A", "tasks", "worker", "-P", "prefork", *args, "--pidfile", "w.pid")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"celeriac worker: error: {message}")
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""
    assert not (tasks_dir.path / "w.pid").exists()


# -- --umask, --uid, --gid ----------------------------------------------------------------


def test_umask_applies_to_the_files_the_worker_makes(
    tasks_dir: TasksDir, start_cli: StartCli
) -> None:
    process = start_cli(
        *("-A", "tasks", "worker", "-l", "info", "-P", "solo", "--umask", "077"),
        *("-f", "w.log", "--pidfile", "w.pid"),
    )
    logfile, pidfile = tasks_dir.path / "w.log", tasks_dir.path / "w.pid"
    wait_in_file(logfile, r" ready\.$", process)
    assert oct(logfile.stat().st_mode & 0o777) == oct(0o600)
    assert oct(pidfile.stat().st_mode & 0o777) == oct(0o600)
    assert process.stop() == 0, process.log


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("22", "'22' has no leading 0: write the umask in octal, e.g. 022 (Celery reads 22 "),
        ("0999", "'0999' is not an octal umask (e.g. 022)"),
        ("01000", "'01000' is more than 0777"),
        ("u=rwx", "'u=rwx' is not an octal umask"),
        ("-022", "'-022' is not an octal umask"),
        ("", "'' is not an octal umask"),
    ],
)
def test_bad_umask(run_cli: RunCli, value: str, message: str) -> None:
    result = run_cli("-A", "tasks", "worker", f"--umask={value}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"celeriac worker: error: argument --umask: {message}")
    assert result.stdout == ""


#: Who the task runs as.
WHOAMI_PY = app_module(
    "whoami",
    """

@app.task
def whoami():
    return [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())]
""",
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def _reachable_by_anyone(path: str) -> bool:
    """Whether every directory on the way to ``path`` lets any user through (o+x)."""
    target = Path(path).resolve()
    return all(d.stat().st_mode & 0o001 for d in (target, *target.parents) if d.is_dir())


#: Started with ``-S``: the site directories of this test run only (not the system
#: Python's own packages), then ``python -m celeriac`` with the arguments that follow.
CELERIAC_ON_SITE = (
    "import runpy, site, sys; [site.addsitedir(d) for d in sys.argv[1].split(':')]; "
    "sys.argv = ['celeriac', *sys.argv[2:]]; "
    "runpy.run_module('celeriac', run_name='__main__', alter_sys=True)"
)


def python_for_nobody() -> list[str]:
    """A command that runs ``python -m celeriac`` as a user without privileges can.

    Once the worker is ``nobody`` it imports more of Python and of celeriac as it runs,
    so all of it must be readable by others. When this Python is not (pyenv's, under
    /root), the system's build of the same version runs this run's site-packages:
    the extension module is built for the version, not for one build of it."""
    import site
    import sysconfig

    packages = [p for p in site.getsitepackages() if os.path.isdir(p)]
    ours = [
        sys.executable,
        os.path.dirname(os.__file__),
        os.path.dirname(__import__("celeriac").__file__),
        *packages,
    ]
    if all(_reachable_by_anyone(os.path.dirname(p)) for p in ours):
        return [sys.executable, "-m", "celeriac"]
    version = sysconfig.get_python_version()
    system_python = next(
        (
            p
            for p in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}")
            if os.path.exists(p) and _reachable_by_anyone(os.path.dirname(p))
        ),
        None,
    )
    if system_python is None:
        pytest.fail(
            f"no Python {version} that user nobody can run: {sys.executable} is not readable"
            f" by other users and /usr/bin/python{version} is not there; the --uid/--gid"
            " success path must run",
            pytrace=False,
        )
    if all(_reachable_by_anyone(os.path.dirname(p)) for p in ours[2:]):
        return [system_python, "-S", "-c", CELERIAC_ON_SITE, ":".join(packages)]
    # This checkout is behind a directory others cannot enter (a clone under /root):
    # celeriac needs no other package, so a copy of it in a directory anyone can read
    # (the extension module included) is all the worker needs.
    return [system_python, "-S", "-c", CELERIAC_ON_SITE, _celeriac_copy_for_anyone()]


def _celeriac_copy_for_anyone() -> str:
    """A directory readable by every user that holds a copy of the celeriac package."""
    import atexit
    import shutil
    import tempfile

    package = os.path.dirname(os.path.realpath(__import__("celeriac").__file__))
    where = tempfile.mkdtemp(prefix="celeriac-for-nobody-")
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    shutil.copytree(
        package,
        os.path.join(where, "celeriac"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for root, _dirs, files in os.walk(where):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return where


def _ids_of(pid: int) -> tuple[list[int], list[int]]:
    """Real, effective, saved and filesystem uids and gids of ``pid``, from the kernel."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return [int(n) for n in fields["Uid"].split()], [int(n) for n in fields["Gid"].split()]


@root_only
@pytest.mark.parametrize(
    ("args", "ids"),
    [
        pytest.param(("--uid", "nobody"), [65534, 65534, 65534, 65534, [65534]], id="uid"),
        pytest.param(
            ("--uid", "65534", "--gid", "daemon"), [65534, 65534, 1, 1, [1]], id="uid-gid"
        ),
        pytest.param(("--gid", "nogroup"), [0, 0, 65534, 65534, None], id="gid"),
    ],
)
def test_uid_gid_switch_the_worker_once_the_app_is_loaded(
    tasks_dir: TasksDir,
    result_keys: ResultKeys,
    args: tuple[str, ...],
    ids: list[object],
) -> None:
    """As Celery's ``maybe_drop_privileges``: ``--uid`` alone takes the user's primary
    group and its groups; the prefork children run as the new user too, and the kernel
    says so for the worker process and each child (all four ids: none kept root)."""
    from conftest import READY_TIMEOUT, WorkerProcess

    tasks_dir.write("whoami.py", WHOAMI_PY)
    argv = [*python_for_nobody(), "-A", "whoami", "worker", "-l", "info"]
    argv += ["-Q", tasks_dir.queue, "-P", "prefork", "-c", "2", *args]
    process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
    try:
        process.wait_for(r" ready\.$", timeout=READY_TIMEOUT)
        results = [tasks_dir.import_module("whoami").whoami.delay() for _ in range(4)]
        for result in results:
            result_keys.add(result.id)
            got = result.get(timeout=WAIT)
            if ids[-1] is None:  # --gid alone leaves root's other groups alone
                got[-1] = None
            assert got == ids
        uid, gid = ids[0], ids[2]
        children = Path(f"/proc/{process.proc.pid}/task/{process.proc.pid}/children")
        pids = [process.proc.pid, *map(int, children.read_text().split())]
        assert len(pids) == 3, pids
        for pid in pids:
            assert _ids_of(pid) == ([uid] * 4, [gid] * 4), pid
    finally:
        status = process.stop()
    assert status == 0, process.log


@root_only
def test_uid_drops_root_before_the_pidfile_is_written(
    tasks_dir: TasksDir, run_cli: RunCli, redis_client: redis.Redis
) -> None:
    """The test's directory is root's only (0700): the new user cannot write there."""
    assert tasks_dir.path.stat().st_mode & 0o077 == 0
    python(tasks_dir, SEND, "1")
    result = run_cli("-A", "tasks", "worker", "--uid", "nobody", "--pidfile", "w.pid")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"celeriac worker: error: argument --pidfile: cannot write "
        f"{tasks_dir.path / 'w.pid'}: Permission denied\n"
    )
    assert result.stdout == ""
    assert queue_length(redis_client, tasks_dir.queue) == 1


#: ``celeriac`` as a user without privileges: ``nobody`` when the tests run as root
#: (imported first: this Python may not be readable by ``nobody``), else the tests' user.
AS_NOBODY = """\
import grp, os, pwd, sys
import celeriac.cli, celeriac.worker, celeriac.worker.log, celeriac.worker.options
celeriac.cli.build_parser().format_help()  # what argparse imports as it goes
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sys.exit(celeriac.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--uid", "root"), "argument --uid: only root can switch the worker to another user"),
        (("--uid", "0", "--gid", "0"), "argument --uid: only root can switch"),
        (("--gid", "0"), "argument --gid: only root can switch the worker to another group"),
    ],
)
def test_uid_gid_of_another_user_without_root_is_an_error(
    tasks_dir: TasksDir, args: tuple[str, ...], message: str
) -> None:
    """The error comes before the app is loaded and before anything runs."""
    as_nobody = os.geteuid() == 0
    done = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, "-A", "tasks", "worker", *args],
        cwd=tasks_dir.path,
        env=tasks_dir.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"celeriac worker: error: {message}")
    who = "65534 (nobody)" if as_nobody else str(os.geteuid())
    assert f"this worker runs as uid {who}" in done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--uid", "no-such-user-x"), "argument --uid: no user named 'no-such-user-x'"),
        (("--uid", ""), "argument --uid: no user named ''"),
        (("--gid", "no-such-group-x"), "argument --gid: no group named 'no-such-group-x'"),
        (("--uid", "-1"), "argument --uid: no user named '-1'"),
        (
            ("--uid", "4242424"),
            "argument --uid: no user has uid 4242424, so it has no primary group: give --gid too",
        ),
    ],
)
def test_unknown_uid_gid(run_cli: RunCli, args: tuple[str, ...], message: str) -> None:
    result = run_cli("-A", "tasks", "worker", *args)
    assert result.returncode == 2
    assert result.stderr == f"celeriac worker: error: {message}\n"
    assert result.stdout == ""


def test_worker_help_lists_the_newer_options(run_cli: RunCli) -> None:
    result = run_cli("worker", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for option in (
        "-I MODULES, --include MODULES",
        "--uid USER",
        "--gid GROUP",
        "--umask UMASK",
        "--pool-start-method METHOD",
        "--disable-prefetch",
        "--executable PYTHON",
        "'auto'",
    ):
        assert option in text, option
