"""The ``celeriac`` command line: help texts, app discovery, and bad input.

Bad input must end with one clear line on stderr and status 2 (usage) or 1, and
nothing may start: no banner, no connection attempt.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celeriac.cli import UsageError, build_parser, load_app
from celeriac.worker.log import parse_loglevel
from celeriac.worker.options import available_cpus, expand_nodename, split_names

#: A broker nobody listens on: if a bad command got as far as connecting, it would
#: log connection errors, which the tests below would see.
DEAD_BROKER = "redis://127.0.0.1:1/0"

APP_PY = f"""\
from celeriac import Celeriac

app = Celeriac("tasks", broker="{DEAD_BROKER}")


@app.task
def add(x, y):
    return x + y
"""


def run_cli(*args: str, cwd: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celeriac", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tasks.py").write_text(APP_PY)
    (tmp_path / "noapp.py").write_text("X = 1\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    return tmp_path


# -- help ---------------------------------------------------------------------------


def test_top_level_help(project: Path) -> None:
    result = run_cli("--help", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "worker" in result.stdout
    assert "-A APP" in result.stdout
    assert "--broker" in result.stdout
    assert "--result-backend" in result.stdout
    assert "--workdir" in result.stdout


def test_help_command_is_top_level_help(project: Path) -> None:
    assert run_cli("help", cwd=project).stdout == run_cli("--help", cwd=project).stdout


def test_worker_help(project: Path) -> None:
    result = run_cli("worker", "--help", cwd=project)
    assert result.returncode == 0, result.stderr
    for option in (
        "--loglevel",
        "--concurrency",
        "--pool",
        "--queues",
        "--exclude-queues",
        "--hostname",
        "--task-events",
        "--prefetch-multiplier",
        "-O",
    ):
        assert option in result.stdout, option
    assert run_cli("help", "worker", cwd=project).stdout == result.stdout


def test_version(project: Path) -> None:
    result = run_cli("--version", cwd=project)
    assert result.returncode == 0
    assert result.stdout.startswith("celeriac ")


def test_console_script_matches_module(project: Path) -> None:
    script = Path(sys.executable).with_name("celeriac")
    if not script.exists():
        pytest.fail(f"the celeriac console script is not installed next to {sys.executable}")
    result = subprocess.run(
        [str(script), "--help"], cwd=project, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert result.stdout == run_cli("--help", cwd=project).stdout


# -- bad input ----------------------------------------------------------------------

BAD_INPUT = [
    pytest.param(["-A", "tasks", "worker", "-P", "bogus"], 2, "unknown pool 'bogus'", id="pool"),
    pytest.param(["-A", "tasks", "worker", "-P", "gevent"], 2, "not available", id="gevent"),
    pytest.param(
        ["-A", "tasks", "worker", "--time-limit", "-1"], 2, "seconds > 0", id="time-limit-neg"
    ),
    pytest.param(
        ["-A", "tasks", "worker", "--soft-time-limit", "soon"],
        2,
        "'soon' is not a number of seconds",
        id="soft-time-limit-nan",
    ),
    pytest.param(
        ["-A", "tasks", "worker", "--max-tasks-per-child", "0"], 2, "at least 1", id="mtpc0"
    ),
    pytest.param(["-A", "tasks", "worker", "-c", "auto2"], 2, "(nor 'auto')", id="c-auto2"),
    pytest.param(["-A", "tasks", "worker", "-c", "0"], 2, "at least 1", id="c0"),
    pytest.param(["-A", "tasks", "worker", "-c", "-3"], 2, "at least 1", id="c-neg"),
    pytest.param(["-A", "tasks", "worker", "-c", "abc"], 2, "'abc' is not a whole", id="c-abc"),
    pytest.param(["-A", "tasks", "worker", "-l", "loud"], 2, "unknown log level", id="loglevel"),
    pytest.param(
        ["-A", "tasks", "worker", "--prefetch-multiplier", "-1"], 2, "0 (unbounded)", id="pm"
    ),
    pytest.param(["-A", "tasks", "worker", "-n", "w@%z"], 2, "%z", id="hostname"),
    pytest.param(["-A", "tasks", "worker", "-Q", "a", "-X", "a"], 2, "excluded", id="exclude"),
    pytest.param(["-A", "tasks", "worker", "-O", "greedy"], 2, "invalid choice", id="opt"),
    pytest.param(["-A", "nosuchmodule", "worker"], 2, "'nosuchmodule' not found", id="nomod"),
    pytest.param(["-A", "noapp", "worker"], 2, "has no celeriac app", id="noapp"),
    pytest.param(["-A", "tasks:nope", "worker"], 2, "cannot find 'nope'", id="noattr"),
    pytest.param(["worker"], 2, "no app given", id="no-app"),
    pytest.param(["frobnicate"], 2, "invalid choice: 'frobnicate'", id="command"),
    pytest.param([], 2, "required: COMMAND", id="no-command"),
    pytest.param(
        ["--workdir", "/nonexistent/celeriac", "-A", "tasks", "worker"], 2, "--workdir", id="wd"
    ),
    # remote control, purge, call, result, events: refused before any connection
    pytest.param(
        ["-A", "tasks", "inspect", "frobnicate"], 2, "Command frobnicate not recognized", id="insp"
    ),
    pytest.param(
        ["-A", "tasks", "control", "ping"], 2, "Available control commands", id="ctl-kind"
    ),
    pytest.param(["-A", "tasks", "inspect"], 2, "missing the inspect COMMAND", id="insp-none"),
    pytest.param(
        ["-A", "tasks", "control", "rate_limit", "tasks.add"],
        2,
        "Command 'rate_limit' takes arguments: <task_name> <rate_limit",
        id="rate-args",
    ),
    pytest.param(
        ["-A", "tasks", "control", "rate_limit", "a", "1/s", "extra"],
        2,
        "takes arguments",
        id="rate-extra",
    ),
    pytest.param(
        ["-A", "tasks", "control", "pool_grow", "many"], 2, "n 'many' is not valid", id="grow"
    ),
    pytest.param(
        ["-A", "tasks", "control", "time_limit", "tasks.add", "soon"], 2, "soft 'soon'", id="tl"
    ),
    pytest.param(
        ["-A", "tasks", "inspect", "conf", "maybe"], 2, "with_defaults 'maybe'", id="conf"
    ),
    pytest.param(["-A", "tasks", "inspect", "ping", "-t", "0"], 2, "--timeout", id="timeout"),
    pytest.param(["-A", "tasks", "status", "-t", "-1"], 2, "--timeout", id="status-timeout"),
    pytest.param(
        ["-A", "tasks", "call", "tasks.add", "--args", "[1,"], 2, "is not JSON", id="call-json"
    ),
    pytest.param(
        ["-A", "tasks", "call", "tasks.add", "--args", "{}"], 2, "not a JSON array", id="call-args"
    ),
    pytest.param(
        ["-A", "tasks", "call", "tasks.add", "--kwargs", "[]"], 2, "not a JSON object", id="kw"
    ),
    pytest.param(
        ["-A", "tasks", "call", "tasks.add", "--eta", "tomorrow"], 2, "ISO 8601", id="call-eta"
    ),
    pytest.param(
        ["-A", "tasks", "call", "tasks.add", "--countdown", "x"], 2, "invalid float", id="cd"
    ),
    pytest.param(["-A", "tasks", "call"], 2, "TASK_NAME", id="call-name"),
    pytest.param(["-A", "tasks", "result"], 2, "TASK_ID", id="result-id"),
    pytest.param(
        ["-b", "bogus://nowhere", "-A", "tasks", "status"], 2, "bogus", id="status-bad-url"
    ),
    pytest.param(
        ["-A", "tasks", "result", "x", "--task", "no.such"], 2, "no such task", id="result-task"
    ),
]


@pytest.mark.parametrize(("args", "status", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_starts_nothing(
    project: Path, args: list[str], status: int, message: str
) -> None:
    result = run_cli(*args, cwd=project)
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "error:" in lines[0]
    assert result.stdout == ""  # no banner
    assert "Cannot connect" not in result.stderr


def test_error_inside_the_app_module_shows_its_traceback(project: Path) -> None:
    result = run_cli("-A", "broken", "worker", cwd=project)
    assert result.returncode == 1
    assert "RuntimeError: broken on purpose" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("celeriac worker: error:")
    assert result.stdout == ""


def test_loglevel_is_case_insensitive() -> None:
    parser = build_parser()
    for value, expected in (("INFO", "info"), ("Debug", "debug"), ("warn", "warning")):
        ns = parser.parse_args(["-A", "x", "worker", "-l", value])
        assert ns.loglevel == expected


def test_worker_defaults() -> None:
    ns = build_parser().parse_args(["-A", "tasks", "worker"])
    assert ns.pool is None  # prefork unless worker_pool says otherwise
    assert ns.concurrency is None
    assert ns.hostname == "celery@%h"
    assert ns.loglevel == "warning"
    assert ns.task_events is False


def test_app_option_after_the_command_is_accepted() -> None:
    ns = build_parser().parse_args(["worker", "-A", "tasks", "-O", "fair", "-E"])
    assert ns.app == "tasks"
    assert ns.task_events is True


# -- finding the app ----------------------------------------------------------------


@pytest.fixture
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory on the cwd with a uniquely named module prefix."""
    prefix = f"cliapp_{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield tmp_path, prefix
    for name in set(sys.modules) - before:
        if name.startswith(prefix):
            del sys.modules[name]
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_load_app_forms(importable: tuple[Path, str]) -> None:
    root, prefix = importable
    _write(
        root / f"{prefix}_a.py",
        """
        from celeriac import Celeriac
        app = Celeriac("a")
        other = Celeriac("other")
        """,
    )
    module = f"{prefix}_a"
    assert load_app(module).main == "a"
    assert load_app(f"{module}:app").main == "a"
    assert load_app(f"{module}.app").main == "a"
    assert load_app(f"{module}:other").main == "other"
    assert load_app(f"{module}.other").main == "other"


def test_load_app_celery_attribute_and_single_instance(importable: tuple[Path, str]) -> None:
    root, prefix = importable
    _write(
        root / f"{prefix}_b.py",
        'from celeriac import Celery\ncelery = Celery("b")\n',
    )
    _write(
        root / f"{prefix}_c.py",
        'from celeriac import Celeriac\nmy_app = Celeriac("c")\n',
    )
    assert load_app(f"{prefix}_b").main == "b"
    assert load_app(f"{prefix}_c").main == "c"


def test_load_app_package_with_celery_module(importable: tuple[Path, str]) -> None:
    root, prefix = importable
    _write(root / f"{prefix}_proj" / "__init__.py", "")
    _write(
        root / f"{prefix}_proj" / "celery.py",
        'from celeriac import Celeriac\napp = Celeriac("proj")\n',
    )
    assert load_app(f"{prefix}_proj").main == "proj"


def test_load_app_ambiguous_and_wrong_type(importable: tuple[Path, str]) -> None:
    root, prefix = importable
    _write(
        root / f"{prefix}_d.py",
        'from celeriac import Celeriac\nx = Celeriac("x")\ny = Celeriac("y")\nz = 3\n',
    )
    with pytest.raises(UsageError, match="several apps"):
        load_app(f"{prefix}_d")
    with pytest.raises(UsageError, match="not a celeriac app"):
        load_app(f"{prefix}_d:z")


def test_load_app_missing_dependency_is_not_reported_as_missing_app(
    importable: tuple[Path, str],
) -> None:
    root, prefix = importable
    _write(root / f"{prefix}_e.py", "import celeriac_no_such_dependency\n")
    from celeriac.cli import AppError

    with pytest.raises(AppError, match="celeriac_no_such_dependency"):
        load_app(f"{prefix}_e")


# -- option helpers ----------------------------------------------------------------


def test_expand_nodename() -> None:
    host = "box.example.com"
    assert expand_nodename("celery@%h", host) == "celery@box.example.com"
    assert expand_nodename("w1@%n", host) == "w1@box"
    assert expand_nodename("w1@%d", host) == "w1@example.com"
    assert expand_nodename("w1@%h-%%", host) == "w1@box.example.com-%"
    assert expand_nodename("somehost", host) == "celery@somehost"
    assert expand_nodename("w2@", host) == "w2@box.example.com"
    assert expand_nodename("celery@%h") == f"celery@{socket.gethostname()}"
    with pytest.raises(ValueError, match="%q"):
        expand_nodename("w@%q", host)


def test_split_names() -> None:
    assert split_names(["a,b", "c", " a , ,d"]) == ["a", "b", "c", "d"]
    assert split_names(None) == []


def test_available_cpus() -> None:
    cpus = available_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    assert cpus <= len(os.sched_getaffinity(0))


def test_parse_loglevel() -> None:
    assert parse_loglevel("CRITICAL") == 50
    assert parse_loglevel("fatal") == 50
    with pytest.raises(ValueError, match="unknown log level"):
        parse_loglevel("chatty")


# -- remote control and the other tools: formats, as Celery's command line prints ---


def test_remote_arguments_follow_celery_signatures() -> None:
    from celeriac.cli import remote_arguments

    assert remote_arguments("rate_limit", ["tasks.add", "10/m"]) == {
        "task_name": "tasks.add",
        "rate_limit": "10/m",
    }
    assert remote_arguments("time_limit", ["tasks.add", "1", "2.5"]) == {
        "task_name": "tasks.add",
        "soft": 1.0,
        "hard": 2.5,
    }
    assert remote_arguments("registered", []) == {"taskinfoitems": []}
    assert remote_arguments("query_task", ["a", "b"]) == {"ids": ["a", "b"]}
    assert remote_arguments("terminate", ["KILL", "a", "b"]) == {
        "signal": "KILL",
        "task_id": ["a", "b"],
    }
    assert remote_arguments("pool_grow", []) == {}
    assert remote_arguments("pool_grow", ["3"]) == {"n": 3}
    assert remote_arguments("conf", ["true"]) == {"with_defaults": True}
    for bad in (["tasks.add"], ["a", "b", "c"]):
        with pytest.raises(UsageError, match="takes arguments"):
            remote_arguments("rate_limit", bad)


#: Remote-control replies as workers send them, one node each.
REPLIES = [
    {"w1@vm": {"ok": "pong"}},
    {"w1@vm": {"error": "unknown task"}},
    {"w1@vm": ["tasks.add", "tasks.mul [rate_limit=1/s]"]},
    {"w1@vm": []},
    {"w1@vm": {"pid": 1, "clock": "2"}},
    {"w1@vm": "a plain string"},
]


@pytest.mark.parametrize("show_body", [True, False])
@pytest.mark.parametrize("reply", REPLIES, ids=["ok", "error", "list", "empty", "dict", "str"])
def test_replies_are_printed_as_celery_prints_them(
    capsys: pytest.CaptureFixture[str], reply: dict[str, Any], show_body: bool
) -> None:
    """The reference is Celery's own ``celery inspect/control`` printer (no colours)."""
    from celeriac.cli.remote import say_reply as _say_reply
    from celery.bin.base import CLIContext
    from celery.bin.control import _say_remote_command_reply

    celery_cli = CLIContext(app=None, no_color=True, workdir=None)
    _say_remote_command_reply(SimpleNamespace(obj=celery_cli), reply, show_reply=show_body)
    celery_prints = capsys.readouterr().out
    _say_reply(reply, show_body=show_body)
    assert capsys.readouterr().out == celery_prints


def test_a_reply_of_none_is_printed_too(capsys: pytest.CaptureFixture[str]) -> None:
    """A worker's ``None`` (Celery's printer raises on it): shown, not a crash."""
    from celeriac.cli.remote import say_reply as _say_reply

    _say_reply({"w1@vm": None}, show_body=True)
    assert capsys.readouterr().out == "->  w1@vm: OK\n    None\n"


#: Events as they come off the wire (Celery's receiver adds ``local_received``; a dump
#: line shows what the worker sent).
EVENTS = [
    {"type": "worker-online", "hostname": "w1@vm", "timestamp": 1700000000.5, "freq": 2.0},
    {
        "type": "task-received",
        "hostname": "w1@vm",
        "timestamp": 1700000000.5,
        "uuid": "id-1",
        "name": "tasks.add",
        "args": "(1, 2)",
        "kwargs": "{}",
        "retries": 0,
    },
    {"type": "task-started", "hostname": "w1@vm", "timestamp": 1700000000.6, "uuid": "id-1"},
    {
        "type": "task-succeeded",
        "hostname": "w1@vm",
        "timestamp": 1700000000.7,
        "uuid": "id-1",
        "runtime": 0.01,  # fields out of order: a dump sorts them
        "result": "3",
    },
    {"type": "task-failed", "hostname": "w1@vm", "timestamp": 1700000001.0, "uuid": "nope"},
    {
        "type": "worker-heartbeat",
        "hostname": "w1@vm",
        "timestamp": 1700000002.0,
        "processed": 7,
        "active": 0,
    },
    {"type": "worker-offline", "hostname": "w1@vm", "timestamp": 1700000003.0},
]


def test_event_dump_lines_are_celerys(capsys: pytest.CaptureFixture[str]) -> None:
    """The reference is Celery's ``celery events --dump`` printer, fed the same events."""
    import copy
    import io

    from celeriac.cli import EventDumper
    from celery.events.dumper import Dumper

    celery_out = io.StringIO()
    celery_dumper = Dumper(out=celery_out)
    for event in copy.deepcopy(EVENTS):
        celery_dumper.on_event(event)
    dumper = EventDumper()
    for event in copy.deepcopy(EVENTS):
        dumper.on_event({**event, "local_received": 1700000009.0})
    assert capsys.readouterr().out.splitlines() == celery_out.getvalue().splitlines()


def test_event_dump_of_a_peer_that_sends_fewer_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No timestamp, no hostname (Celery's printer raises on it): still one line."""
    from celeriac.cli import EventDumper

    EventDumper().on_event({"type": "worker-heartbeat"})
    line = capsys.readouterr().out.rstrip("\n")
    assert line.startswith("? [") and line.endswith("] heartbeat ")


#: The same app for ``celery`` and for ``celeriac``, on a broker nobody listens on.
CELERY_APP_PY = APP_PY.replace("from celeriac import Celeriac", "from celery import Celery")
CELERY_APP_PY = CELERY_APP_PY.replace("Celeriac(", "Celery(")


def _error_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr
    return lines[0][len(prefix) :]


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "frobnicate"],
        ["control", "ping"],
        ["control", "rate_limit", "a", "1/s", "extra"],
        ["control", "time_limit", "a", "1", "2", "3"],
    ],
    ids=["inspect-unknown", "control-unknown", "rate-limit-extra", "time-limit-extra"],
)
def test_remote_command_usage_errors_are_celerys(project: Path, args: list[str]) -> None:
    """The reference is the ``celery`` command itself, run on the same input: the same
    message; where it lists the commands, celeriac's are among Celery's."""
    (project / "celeryapp.py").write_text(CELERY_APP_PY)
    celery = subprocess.run(
        [str(Path(sys.executable).with_name("celery")), "-A", "celeryapp", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    celery_message = _error_line(celery, "Error: ")
    ours = run_cli("-A", "tasks", *args, cwd=project)
    assert ours.returncode == 2, ours.stderr
    message = _error_line(ours, f"celeriac {args[0]}: error: ")
    head, _, listed = message.partition(" Available ")
    celery_head, _, celery_listed = celery_message.partition(" Available ")
    assert head == celery_head
    if listed:
        kind, _, names = listed.partition(": ")
        celery_kind, _, celery_names = celery_listed.partition(": ")
        assert kind == celery_kind
        assert set(names.split(", ")) <= set(celery_names.split(", "))


def test_remote_commands_cover_the_worker_table() -> None:
    from celeriac import control
    from celeriac.cli import REMOTE_COMMANDS

    for name, found in control.COMMANDS.items():
        if name == "hello" or name in REMOTE_COMMANDS:  # hello: mingle's, hidden
            if name in REMOTE_COMMANDS:
                assert REMOTE_COMMANDS[name].kind == found.kind, name
            continue
        pytest.fail(f"the worker answers {name!r} but the command line cannot send it")
