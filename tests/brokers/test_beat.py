"""``celeriac beat`` against the real brokers: each due run is sent once, whatever
number of beats run, one of them killed with SIGKILL, restarted or cut off from its
store.

Every run is counted by the task it starts: the task records its id and the run
stamp beat put in the message (``celeriac_beat_run``: the previous run, this run). The
runs of an entry form a chain: each one's previous run is the run before it. A lost
run breaks the chain, a doubled one shows as two runs after the same previous one.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import (
    AMQP_URL,
    EVENT_WAIT,
    PRIORITY_SEP,
    REDIS_URL,
    TasksDir,
    WorkerProcess,
    app_module,
    delete_amqp,
    wait_until,
    worker_env,
)

#: The beat test's tasks module: ``record`` writes what it ran to ``<queue>-runs``.
BEAT_BODY = """
import json
import time


@app.task(bind=True, name="beat.record")
def record(self, tag="run"):
    stamp = (self.request.headers or {{}}).get("celeriac_beat_run")
    # How the message arrived, so that a doubled run tells "sent twice" (two task ids)
    # from "ran twice" (one id, delivered again) in the test's failure message.
    delivery = self.request.delivery_info or {{}}
    seen = {{"pid": os.getpid(), "redelivered": bool(delivery.get("redelivered")),
            "tag": str(delivery.get("delivery_tag")), "at": time.time()}}
    line = json.dumps([self.request.id, tag, stamp, seen])
    client().rpush(os.environ["CELERIAC_TEST_QUEUE"] + "-runs", line)

{schedule}
"""

EVERY_SECOND = """
app.conf.beat_schedule = {"every-second": {"task": "beat.record", "schedule": 1.0}}
"""

SENDING = r"Scheduler: Sending due task"
MUST_SEE = 40.0  # bound on waiting for a handful of 1-second runs on a busy machine


def beat_module(schedule: str) -> str:
    return app_module("beattasks", BEAT_BODY.format(schedule=schedule), redis_client=True)


class Runs:
    """The runs recorded by the tasks of one test.

    A run is a task id: beat sends each run as one message with its own id. The
    worker may run one message twice (at-least-once delivery: a message delivered
    again after its consumer was taken for dead or lost its connection); that is not
    beat sending twice, so it counts once here, provided both deliveries carried the
    same run. Two task ids for one run are beat's doing, and fail ``chain``."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self.client = client
        self.key = f"{queue}-runs"

    def raw(self) -> list[list[Any]]:
        """Every execution as recorded: task id, tag, stamp, and how its message was
        delivered (pid, redelivered flag, delivery tag, time): failure messages show it."""
        return [json.loads(raw) for raw in self.client.lrange(self.key, 0, -1)]

    def all(self) -> list[tuple[str, str, list[int] | None]]:
        """``(task id, tag, stamp)`` of every run (task id), in the order they first ran;
        an id that ran again must have carried the same stamp."""
        first: dict[str, tuple[str, str, list[int] | None]] = {}
        for task_id, tag, stamp, *_ in self.raw():
            seen = first.setdefault(task_id, (task_id, tag, stamp))
            assert seen[1:] == (tag, stamp), f"task {task_id} ran as two runs: {self.raw()}"
        return list(first.values())

    def count(self, tag: str = "run") -> int:
        return sum(1 for run in self.all() if run[1] == tag)

    def wait_for(self, count: int, tag: str = "run") -> None:
        assert wait_until(lambda: self.count(tag) >= count, MUST_SEE), (
            f"only {self.count(tag)} of {count} runs of {tag!r} arrived: {self.raw()}"
        )

    def chain(self, tag: str = "run") -> list[tuple[int, int]]:
        """The ``(previous, run)`` stamps of ``tag``'s runs, checked to form one chain:
        no run twice (two task ids after the same previous run), no gap."""
        runs = [run for run in self.all() if run[1] == tag]
        stamps = sorted((stamp[0], stamp[1]) for _, _, stamp in runs if stamp)
        assert len(stamps) == len(runs), f"a run without beat's stamp: {runs}"
        previous = [stamp[0] for stamp in stamps]
        assert len(set(previous)) == len(previous), f"a run was sent twice: {self.raw()}"
        for before, after in itertools.pairwise(stamps):
            assert after[0] == before[1], f"a run was lost between {before} and {after}"
        return stamps


@pytest.fixture
def runs(redis_client: redis.Redis, tasks_dir: TasksDir) -> Runs:
    return Runs(redis_client, tasks_dir.queue)


TRANSPORTS = ("redis", "sqlite", "amqp-redis", "amqp-sqlite")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, tasks_dir: TasksDir) -> Iterator[str]:
    """The test's broker and backend: Redis; the embedded SQLite file for both;
    RabbitMQ with Redis or SQLite results (beat's state then lives there)."""
    kind = request.param
    if kind == "sqlite":
        url = f"sqlite://{tasks_dir.path / 'broker.sqlite3'}"
        tasks_dir.env = worker_env(tasks_dir.queue, url, url)
    elif kind == "amqp-redis":
        tasks_dir.env = worker_env(tasks_dir.queue, AMQP_URL, REDIS_URL)
    elif kind == "amqp-sqlite":
        results = f"sqlite://{tasks_dir.path / 'results.sqlite3'}"
        tasks_dir.env = worker_env(tasks_dir.queue, AMQP_URL, results)
    yield kind
    if kind.startswith("amqp"):
        delete_amqp(AMQP_URL, tasks_dir.queue)


StartBeat = Callable[..., WorkerProcess]


@pytest.fixture
def beat(tasks_dir: TasksDir) -> Iterator[StartBeat]:
    """``beat(*extra)``: ``celeriac -A beattasks beat -l info -s <queue>``, waited for
    until it starts; killed at teardown if still running."""
    started: list[WorkerProcess] = []

    def start(*extra: str, app: str = "beattasks", ready: bool = True) -> WorkerProcess:
        argv = [
            sys.executable, "-m", "celeriac", "-A", app, "beat", "-l", "info",
            "-s", tasks_dir.queue, *extra,
        ]  # fmt: skip
        process = WorkerProcess(argv, tasks_dir.path, tasks_dir.env)
        started.append(process)
        if ready:
            process.wait_for(r"beat: Starting\.\.\.", timeout=EVENT_WAIT)
        return process

    yield start
    for process in started:
        process.kill()


def sent_by(process: WorkerProcess) -> int:
    return len(re.findall(SENDING, process.log))


def test_two_beats_and_a_sigkill_send_every_run_once(
    transport: str, tasks_dir: TasksDir, worker: Any, beat: StartBeat, runs: Runs
) -> None:
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    worker(app="beattasks")
    first, second = beat(ready=False), beat(ready=False)
    for process in (first, second):
        process.wait_for(r"beat: Starting\.\.\.", timeout=EVENT_WAIT)
    runs.wait_for(3)
    # The beat that sent the latest run is killed (there is no leader to pick).
    last_sender = max((first, second), key=lambda p: p.log.rfind("Sending due task"))
    survivor = second if last_sender is first else first
    last_sender.kill()
    before = runs.count()
    runs.wait_for(before + 4)
    assert survivor.stop() == 0
    sent = sent_by(first) + sent_by(second)
    assert wait_until(lambda: runs.count() >= sent, MUST_SEE), (sent, runs.all())
    stamps = runs.chain()
    assert len(stamps) == sent >= 7
    assert "every-second" in survivor.log


def test_a_restarted_beat_continues_the_chain_with_one_catch_up_run(
    tasks_dir: TasksDir, worker: Any, beat: StartBeat, runs: Runs
) -> None:
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    worker(app="beattasks")
    process = beat()
    runs.wait_for(2)
    assert process.stop() == 0
    stopped = sent_by(process)
    assert wait_until(lambda: runs.count() == stopped, MUST_SEE)
    time.sleep(3.5)  # beat is down for three periods: one catch-up run, not three
    again = beat()
    runs.wait_for(stopped + 3)
    assert again.stop() == 0
    assert wait_until(lambda: runs.count() == sent_by(process) + sent_by(again), MUST_SEE)
    stamps = runs.chain()
    catch_up = stamps[stopped]
    assert catch_up[1] - catch_up[0] >= 3_500_000  # the catch-up run covers the gap
    for previous, run in stamps[stopped + 1 :]:
        assert run - previous >= 1_000_000  # then the period again, not a burst


def test_a_changed_schedule_applies_on_restart_and_a_removed_entry_is_dropped(
    tasks_dir: TasksDir, worker: Any, beat: StartBeat, runs: Runs, redis_client: redis.Redis
) -> None:
    two = """
app.conf.beat_schedule = {
    "a": {"task": "beat.record", "schedule": 1.0, "args": ("a",)},
    "b": {"task": "beat.record", "schedule": 1.0, "args": ("b",)},
}
"""
    tasks_dir.write("beattasks.py", beat_module(two))
    worker(app="beattasks")
    process = beat()
    runs.wait_for(2, "a")
    runs.wait_for(2, "b")
    assert process.stop() == 0
    state = f"celeriac-beat:{tasks_dir.queue}"
    assert set(redis_client.hkeys(state)) == {b"a", b"b"}
    before = runs.count("a")
    changed = """
app.conf.beat_schedule = {"a": {"task": "beat.record", "schedule": 2.0, "args": ("a",)}}
"""
    tasks_dir.write("beattasks.py", beat_module(changed))
    again = beat()
    again.wait_for(r"dropped 'b' from the schedule store")
    assert redis_client.hkeys(state) == [b"a"]
    runs.wait_for(before + 3, "a")
    assert again.stop() == 0
    stamps = runs.chain("a")
    for previous, run in stamps[before + 1 :]:
        assert run - previous >= 2_000_000  # the new period


def test_worker_dash_b_runs_beat_beside_another_beat_and_stops_it(
    tasks_dir: TasksDir, worker: Any, beat: StartBeat, runs: Runs
) -> None:
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    process = worker("-B", "-s", tasks_dir.queue, app="beattasks")
    other = beat()
    runs.wait_for(4)
    process.wait_for(SENDING)
    embedded = f"--exit-with-parent {process.proc.pid}"
    assert embedded in _command_lines()
    assert other.stop() == 0
    sent = sent_by(other) + sent_by(process)
    assert wait_until(lambda: runs.count() >= sent, MUST_SEE)
    assert len(runs.chain()) >= sent
    # The worker's own beat may send one more run while the worker stops: that one
    # waits in the queue, as any message sent to a stopping worker does.
    assert process.stop() == 0
    assert wait_until(lambda: embedded not in _command_lines(), EVENT_WAIT)


def test_worker_dash_b_gives_beat_the_workers_expanded_logfile(
    tasks_dir: TasksDir, worker: Any
) -> None:
    """``-f %n%I.log``: the worker's main process logs to ``<name>.log`` (no child
    index), and so does its beat, as Celery's embedded beat logs where the worker does."""
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    template = str(tasks_dir.path / "%n%I.log")
    process = worker("-B", "-s", tasks_dir.queue, "-n", "beatnode@%h", "-f", template,
                     app="beattasks", ready=False)  # fmt: skip
    logfile = tasks_dir.path / "beatnode.log"
    assert wait_until(lambda: logfile.exists() and SENDING in logfile.read_text(), MUST_SEE)
    assert f"--logfile {logfile}\n" in _command_lines()  # its last argument
    assert process.stop() == 0
    assert sorted(path.name for path in tasks_dir.path.glob("*.log")) == ["beatnode.log"]


def _command_lines() -> str:
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True)
    return out.stdout


def test_periodic_tasks_added_on_after_configure_run(
    tasks_dir: TasksDir, worker: Any, beat: StartBeat, runs: Runs
) -> None:
    schedule = """
@app.on_after_configure.connect
def setup_periodic_tasks(sender, **kwargs):
    sender.add_periodic_task(1.0, {"task": "beat.record", "args": ("added",)}, name="added")
    sender.add_periodic_task(1.0, record, ("by-task",))
"""
    tasks_dir.write("beattasks.py", beat_module(schedule))
    worker(app="beattasks")
    process = beat()
    runs.wait_for(2, "added")
    runs.wait_for(2, "by-task")
    assert process.stop() == 0
    assert "Sending due task added (beat.record)" in process.log
    assert "Sending due task beat.record('by-task') (beat.record)" in process.log


def test_entry_options_reach_the_message(
    tasks_dir: TasksDir, worker: Any, beat: StartBeat, runs: Runs, redis_client: redis.Redis
) -> None:
    other = f"{tasks_dir.queue}.other"
    schedule = f"""
app.conf.beat_schedule = {{
    "routed": {{
        "task": "beat.record",
        "schedule": 1.0,
        "kwargs": {{"tag": "routed"}},
        "options": {{"queue": "{other}", "priority": 3, "expires": 30}},
    }},
}}
"""
    tasks_dir.write("beattasks.py", beat_module(schedule))
    process = beat()
    listed = f"{other}{PRIORITY_SEP}3"  # kombu's list for priority 3
    assert wait_until(lambda: redis_client.llen(listed) >= 1, MUST_SEE)
    assert process.stop() == 0
    message = json.loads(redis_client.lindex(listed, 0))
    headers = message["headers"]
    assert headers["task"] == "beat.record"
    assert headers["expires"] is not None
    assert headers["celery_beat_task"] is True
    assert message["properties"]["priority"] == 3
    body = base64.b64decode(message["body"])
    assert json.loads(body)[1] == {"tag": "routed"}


# -- bad input -------------------------------------------------------------------------


def _beat_with_bad_entry(tasks_dir: TasksDir, run_cli: Any, schedule: str) -> Any:
    """Run beat on a schedule whose one entry ``bad`` has ``schedule`` (Python)."""
    body = f"""
from datetime import timedelta
from celeriac.schedules import crontab
app.conf.beat_schedule = {{"bad": {{"task": "beat.record", "schedule": {schedule}}}}}
"""
    tasks_dir.write("beattasks.py", beat_module(body))
    result = run_cli("-A", "beattasks", "beat", "-s", tasks_dir.queue)
    assert SENDING not in result.stderr
    return result


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("-5", "it must be positive"),
        ("0", "it must be positive"),
        ('"every minute"', "a schedule must be a number of seconds"),
        ("timedelta(seconds=-1)", "it must be positive"),
    ],
)
def test_a_bad_schedule_is_refused_at_start(
    tasks_dir: TasksDir, run_cli: Any, schedule: str, expected: str
) -> None:
    result = _beat_with_bad_entry(tasks_dir, run_cli, schedule)
    assert result.returncode == 2, result.stderr
    assert "beat_schedule['bad']" in result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ('crontab(minute="*/0")', "the step must be positive"),
        ('crontab(minute="61")', "61 is out of range 0-59"),
        ('crontab(day_of_week="funday")', "'funday' is not a number, a day or a month"),
        ('crontab(day_of_month="31", month_of_year="feb")', "never occurs"),
    ],
)
def test_an_invalid_crontab_fails_where_it_is_made(
    tasks_dir: TasksDir, run_cli: Any, schedule: str, expected: str
) -> None:
    """As in Celery, a crontab checks its fields when it is made: the app module's
    import fails, naming the field, and beat does not start."""
    result = _beat_with_bad_entry(tasks_dir, run_cli, schedule)
    assert result.returncode == 1, result.stderr
    assert "importing 'beattasks' failed:" in result.stderr
    assert expected in result.stderr


def test_an_unregistered_task_is_warned_about_and_sent_by_name(
    tasks_dir: TasksDir, beat: StartBeat, redis_client: redis.Redis
) -> None:
    body = """
app.conf.beat_schedule = {"ghost": {"task": "nowhere.ghost", "schedule": 1.0}}
"""
    tasks_dir.write("beattasks.py", beat_module(body))
    process = beat()
    process.wait_for(r"the task 'nowhere.ghost' \(of 'ghost'\) is not registered in this app")
    assert wait_until(lambda: redis_client.llen(tasks_dir.queue) >= 1, MUST_SEE)
    assert process.stop() == 0
    message = json.loads(redis_client.lindex(tasks_dir.queue, 0))
    assert message["headers"]["task"] == "nowhere.ghost"


def test_a_store_down_at_start_is_a_clear_error(tasks_dir: TasksDir, run_cli: Any) -> None:
    tasks_dir.env = worker_env(tasks_dir.queue, REDIS_URL, "redis://127.0.0.1:7711/0")
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    result = run_cli("-A", "beattasks", "beat", "-s", tasks_dir.queue)
    assert result.returncode == 1, result.stderr
    assert "cannot use the schedule store" in result.stderr
    assert "127.0.0.1:7711" in result.stderr


class PrivateRedis:
    """A redis-server of this test's own on a port of our range, with an append-only
    file so that what it stored survives a restart."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        assert wait_until(lambda: _pings(client), EVENT_WAIT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path, 7712)
    yield server
    server.stop()


def test_a_store_that_goes_away_is_retried_and_nothing_is_sent_twice(
    tasks_dir: TasksDir, worker: Any, beat: StartBeat, runs: Runs, private_redis: PrivateRedis
) -> None:
    private_redis.start()
    # Results (and so beat's state) in the private Redis, messages on the shared one.
    tasks_dir.env = worker_env(
        tasks_dir.queue, REDIS_URL, f"redis://127.0.0.1:{private_redis.port}/0"
    )
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    worker(app="beattasks")
    first, second = beat(), beat()
    runs.wait_for(2)
    private_redis.stop()
    for process in (first, second):
        process.wait_for(r"beat: the schedule store .* failed: .*Trying again in")
    private_redis.start()
    after = runs.count()
    runs.wait_for(after + 3)
    for process in (first, second):
        assert process.stop() == 0
    sent = sent_by(first) + sent_by(second)
    assert wait_until(lambda: runs.count() >= sent, MUST_SEE)
    assert len(runs.chain()) == sent


def test_rabbitmq_with_rpc_results_keeps_state_in_a_local_file(
    tasks_dir: TasksDir, worker: Any, beat: StartBeat, runs: Runs
) -> None:
    tasks_dir.env = worker_env(tasks_dir.queue, AMQP_URL, "rpc://")
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    try:
        worker(app="beattasks")
        first, second = beat(), beat()
        for process in (first, second):
            process.wait_for(r"the schedule state is kept in the local file")
        runs.wait_for(3)
        for process in (first, second):
            assert process.stop() == 0
        assert (tasks_dir.path / f"{tasks_dir.queue}.sqlite3").exists()
        sent = sent_by(first) + sent_by(second)
        assert wait_until(lambda: runs.count() >= sent, MUST_SEE)
        assert len(runs.chain()) == sent
    finally:
        delete_amqp(AMQP_URL, tasks_dir.queue)


# -- command line ----------------------------------------------------------------------


def test_cli_options_logfile_pidfile_and_max_interval(
    tasks_dir: TasksDir, beat: StartBeat, run_cli: Any
) -> None:
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    logfile, pidfile = tasks_dir.path / "beat.log", tasks_dir.path / "beat.pid"
    process = beat("-f", str(logfile), "--pidfile", str(pidfile), "--max-interval", "7",
                   ready=False)  # fmt: skip
    process.wait_for(r"maxinterval -> 7 seconds")
    assert wait_until(lambda: logfile.exists() and "beat: Starting..." in logfile.read_text())
    assert pidfile.read_text() == f"{process.proc.pid}\n"
    second = run_cli("-A", "beattasks", "beat", "--pidfile", str(pidfile))
    assert second.returncode == 73
    assert "is this beat already running?" in second.stderr
    assert process.stop() == 0
    assert not pidfile.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("-S", "django_celery_beat.schedulers:DatabaseScheduler"), "-S/--scheduler"),
        (("--executable", sys.executable), "--executable: only with --detach"),
        (("--max-interval", "0"), "--max-interval: must be positive"),
        (("-f", "/nonexistent/dir/beat.log"), "the directory /nonexistent/dir does not exist"),
    ],
)
def test_cli_refuses_bad_options(
    tasks_dir: TasksDir, run_cli: Any, args: tuple[str, ...], expected: str
) -> None:
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    result = run_cli("-A", "beattasks", "beat", *args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr


def test_detach_runs_beat_as_a_daemon_until_sigterm(
    tasks_dir: TasksDir, worker: Any, run_cli: Any, runs: Runs
) -> None:
    tasks_dir.write("beattasks.py", beat_module(EVERY_SECOND))
    worker(app="beattasks")
    logfile, pidfile = tasks_dir.path / "beat.log", tasks_dir.path / "beat.pid"
    argv = ("-A", "beattasks", "beat", "--detach", "-l", "info", "-s", tasks_dir.queue,
            "-f", str(logfile), "--pidfile", str(pidfile))  # fmt: skip
    started = run_cli(*argv)
    assert started.returncode == 0, started.stderr
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), EVENT_WAIT)
    pid = int(pidfile.read_text())
    try:
        runs.wait_for(2)
        assert "beat: Starting..." in logfile.read_text()
        again = run_cli(*argv)  # the pidfile names the running daemon: refused here
        assert again.returncode == 73, again.stderr
        assert "is this beat already running?" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not pidfile.exists(), EVENT_WAIT)
    assert SENDING in logfile.read_text()


def test_an_idle_beat_sleeps_until_the_next_due_run(tmp_path: Path) -> None:
    """No polling: after the first tick, beat sleeps until the nearest run (or the
    longest interval allowed), whatever the number of entries."""
    from celeriac import Celeriac
    from celeriac.beat import Beat
    from celeriac.schedules import crontab

    url = f"sqlite://{tmp_path / 'beat.db'}"
    app = Celeriac("idle", broker=url, backend=url, set_as_current=False)
    far_minute = (app.now().minute + 30) % 60  # 29 to 31 minutes away
    app.conf.beat_schedule = {
        "fifty": {"task": "idle.x", "schedule": 50.0},
        "far": {"task": "idle.x", "schedule": crontab(minute=far_minute)},
        **{f"hourly-{n}": {"task": "idle.x", "schedule": 3600.0} for n in range(1000)},
    }
    try:
        for most, expected in ((3600.0, 50.0), (20.0, 20.0)):
            beat = Beat(app, schedule_filename=f"idle-{most}", max_interval=most)
            beat.setup()
            delay = beat.tick()
            assert expected - 10 < delay <= expected
            assert beat.tick() == pytest.approx(delay, abs=1.0)  # still nothing due
    finally:
        app.close()


def test_runs_due_at_once_are_sent_once_by_one_of_two_beats(
    tasks_dir: TasksDir, redis_client: redis.Redis
) -> None:
    """250 entries all overdue (more than one claim batch): the first beat's tick sends
    each once, the second beat's finds them all claimed."""
    from celeriac import _core

    names = [f"entry-{n}" for n in range(250)]
    app, long_ago = _overdue(tasks_dir, names)
    try:
        first, second = _two_beats(app, tasks_dir.queue)
        first.tick()
        second.tick()
        assert redis_client.llen(tasks_dir.queue) == 250
        stored = dict(_core.BeatStore(REDIS_URL, tasks_dir.queue).entries())
        assert set(stored) == set(names)
        assert all(run > long_ago for run in stored.values())
        assert all(entry.last_run == stored[name] for name, entry in second.entries.items())
    finally:
        app.close()


def test_a_run_due_when_the_store_lost_its_entry_is_sent_once(
    tasks_dir: TasksDir, redis_client: redis.Redis
) -> None:
    """The store forgets an entry while its run is due (a Redis restarted without its
    data): the run is claimed anew and sent once, not skipped until the next period."""
    app, long_ago = _overdue(tasks_dir, ["hourly"])
    try:
        first, second = _two_beats(app, tasks_dir.queue)
        redis_client.delete(f"celeriac-beat:{tasks_dir.queue}")
        for _ in range(3):
            for beat in (first, second):
                time.sleep(min(beat.tick(), 0.05))
        assert redis_client.llen(tasks_dir.queue) == 1
        message = json.loads(redis_client.lindex(tasks_dir.queue, 0))
        assert message["headers"]["celeriac_beat_run"][0] == long_ago
    finally:
        app.close()


def test_two_beats_that_pick_the_same_run_time_send_it_once(
    tasks_dir: TasksDir, redis_client: redis.Redis
) -> None:
    """Two beats wake at the same moment and stamp the run with the same microsecond:
    the loser finds its own value stored, which is not a claim of its own whose answer
    was lost (it never failed), so it does not send the run again."""
    import datetime

    app, _ = _overdue(tasks_dir, ["hourly"])
    moment = datetime.datetime.now(datetime.timezone.utc)
    app.now = lambda: moment  # both beats: one clock reading
    try:
        first, second = _two_beats(app, tasks_dir.queue)
        first.tick()
        second.tick()
        assert redis_client.llen(tasks_dir.queue) == 1
    finally:
        app.close()


def _overdue(tasks_dir: TasksDir, names: list[str]) -> tuple[Any, int]:
    """An app whose hourly entries ``names`` are stored as last run two hours ago (all
    due), on the test's queue: ``(app, that last run)``."""
    from celeriac import Celeriac, _core

    app = Celeriac("due", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    app.conf.task_default_queue = tasks_dir.queue
    app.conf.beat_schedule = {name: {"task": "due.x", "schedule": 3600.0} for name in names}
    long_ago = int((time.time() - 7200) * 1_000_000)
    _core.BeatStore(REDIS_URL, tasks_dir.queue).register(names, long_ago)
    return app, long_ago


def _two_beats(app: Any, queue: str) -> list[Any]:
    from celeriac.beat import Beat

    beats = [Beat(app, schedule_filename=queue) for _ in range(2)]
    for beat in beats:
        beat.setup()
    return beats
