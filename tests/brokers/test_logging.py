"""Worker logging as Celery's: ``get_task_logger`` lines carry the task's name and id
(``worker_task_log_format``) in every pool, ``worker_log_format``,
``worker_hijack_root_logger``, ``worker_redirect_stdouts(_level)``. Real worker
processes on the real Redis; the lines are read from the worker's stderr."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest
from conftest import app_module

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ResultKeys, RunCli, TasksDir, WorkerProcess

    StartCli = Callable[..., WorkerProcess]

WAIT = 20.0

LOGGING_TASKS = """
from celeriac.utils.log import get_task_logger

logger = get_task_logger(__name__)

{settings}


@app.task
def chatty(word):
    logger.warning("task says %s", word)
    print("printed", word)
    return word
"""


IMPORTS = ("import logging", "import sys")


def write_tasks(tasks_dir: TasksDir, settings: str = "") -> None:
    tasks_dir.write(
        "tasks.py", app_module("tasks", LOGGING_TASKS.format(settings=settings), imports=IMPORTS)
    )


def run_chatty(tasks_dir: TasksDir, result_keys: ResultKeys, word: str) -> str:
    tasks = tasks_dir.import_module()
    result = tasks.chatty.delay(word)
    result_keys.add(result.id)
    assert result.get(timeout=WAIT) == word
    tasks.app.close()
    return str(result.id)


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_task_logger_lines_carry_task_name_and_id(
    tasks_dir: TasksDir, start_cli: StartCli, result_keys: ResultKeys, pool: str
) -> None:
    write_tasks(tasks_dir)
    process = start_cli("-A", "tasks", "worker", "-l", "info", "-P", pool, "-c", "2")
    process.wait_for(r" ready\.$", timeout=WAIT)
    task_id = run_chatty(tasks_dir, result_keys, "hello")
    line = process.wait_for(r"task says hello", timeout=WAIT)[0]
    assert re.search(
        rf"^\[[^\]]+: WARNING/\w+(-\d+)?\] tasks\.chatty\[{re.escape(task_id)}\]: task says hello$",
        line,
    ), line
    # worker_redirect_stdouts (default on, at WARNING): print() is a log line.
    printed = process.wait_for(r"printed hello", timeout=WAIT)[0]
    assert re.search(r"^\[[^\]]+: WARNING/\w+(-\d+)?\] printed hello$", printed), printed
    assert process.stop() == 0, process.log


def test_custom_formats_and_redirect_level(
    tasks_dir: TasksDir, start_cli: StartCli, result_keys: ResultKeys
) -> None:
    write_tasks(
        tasks_dir,
        'app.conf.worker_log_format = "ROOT %(levelname)s %(message)s"\n'
        'app.conf.worker_task_log_format = "TASK %(task_name)s %(task_id)s %(message)s"\n'
        'app.conf.worker_redirect_stdouts_level = "error"\n',
    )
    process = start_cli("-A", "tasks", "worker", "-l", "info", "-P", "solo")
    process.wait_for(r"^ROOT INFO .* ready\.$", timeout=WAIT)
    task_id = run_chatty(tasks_dir, result_keys, "there")
    assert process.wait_for(rf"^TASK tasks\.chatty {re.escape(task_id)} task says there$", WAIT)
    assert process.wait_for(r"^ROOT ERROR printed there$", timeout=WAIT)
    assert process.stop() == 0, process.log


def test_redirect_stdouts_off_leaves_print_on_stdout(
    tasks_dir: TasksDir, start_cli: StartCli, result_keys: ResultKeys
) -> None:
    write_tasks(tasks_dir, "app.conf.worker_redirect_stdouts = False\n")
    process = start_cli("-A", "tasks", "worker", "-l", "info", "-P", "solo")
    process.wait_for(r" ready\.$", timeout=WAIT)
    run_chatty(tasks_dir, result_keys, "plain")
    assert process.wait_for(r"^printed plain$", timeout=WAIT)
    assert process.stop() == 0, process.log
    assert "printed plain" in process.stdout


@pytest.mark.parametrize("hijack", [True, False])
def test_hijack_root_logger(
    tasks_dir: TasksDir, start_cli: StartCli, result_keys: ResultKeys, hijack: bool
) -> None:
    """The app installs its own root handler; Celery's default replaces it, False
    keeps it (its lines then carry the app's ``USER`` format)."""
    write_tasks(
        tasks_dir,
        "handler = logging.StreamHandler(sys.stderr)\n"
        'handler.setFormatter(logging.Formatter("USER %(message)s"))\n'
        "logging.getLogger().addHandler(handler)\n"
        f"app.conf.worker_hijack_root_logger = {hijack}\n",
    )
    process = start_cli("-A", "tasks", "worker", "-l", "info", "-P", "solo")
    process.wait_for(r" ready\.$", timeout=WAIT)
    assert process.stop() == 0, process.log
    user_lines = [line for line in process.stderr_lines if line.startswith("USER ")]
    if hijack:
        assert user_lines == [], process.log
    else:
        assert any(line.endswith(" ready.") for line in user_lines), process.log


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            'worker_redirect_stdouts_level = "LOUD"',
            "worker_redirect_stdouts_level: unknown log level 'LOUD'",
        ),
        ('worker_task_log_format = "%(task_name"', "worker_task_log_format"),
    ],
)
def test_bad_logging_setting_is_a_clear_error(
    tasks_dir: TasksDir, run_cli: RunCli, setting: str, message: str
) -> None:
    write_tasks(tasks_dir, f"app.conf.{setting}\n")
    result = run_cli("-A", "tasks", "worker", "-P", "solo")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
