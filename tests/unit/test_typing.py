"""The task decorator is typed: mypy flags a wrong ``delay`` call and accepts a right one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SNIPPET = """\
from typing import Any

from celeriac import AsyncResult, Celeriac, Task, shared_task

app = Celeriac("typed")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="typed.mul", ignore_result=True)
def mul(x: int, y: int) -> int:
    return x * y


@app.task(bind=True, max_retries=2)
def bound(self: Task[Any, Any], x: int) -> str:
    return str(x)


@shared_task
def shared(text: str) -> str:
    return text


good: AsyncResult[int] = add.delay(1, 2)
value: int = good.get(timeout=1)
local: int = add(1, 2)
also_good = mul.delay(x=3, y=4)
bound_good = bound.delay(1)
shared_good = shared.delay("x")
sent = add.apply_async((1, 2), countdown=5, queue="q")

add.delay(1, "x")  # BAD: wrong type
mul.delay(1)  # BAD: missing argument
bound.delay("no")  # BAD: wrong type, self not counted
shared.delay(1)  # BAD: wrong type
bad_return: str = add(1, 2)  # BAD: wrong return type
"""


def test_mypy_checks_task_calls(tmp_path: Path) -> None:
    source = tmp_path / "snippet.py"
    source.write_text(textwrap.dedent(SNIPPET))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "--show-error-codes",
            "--no-error-summary",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    lines = sorted({int(line.split(":")[1]) for line in errors})
    expected = [n for n, text in enumerate(SNIPPET.splitlines(), 1) if "# BAD" in text]
    assert len(expected) == 5
    assert lines == expected, run.stdout + run.stderr
    assert '"delay" of "Task" has incompatible type "str"; expected "int"' in run.stdout
    assert 'Missing positional argument "y"' in run.stdout
