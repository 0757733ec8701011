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
