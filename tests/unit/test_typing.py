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


CANVAS_SNIPPET = """\
from celeriac import AsyncResult, Celeriac, Signature, chain, group
from celeriac.canvas import _chain

app = Celeriac("typed")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def show(x: int) -> str:
    return str(x)


sig: Signature[int] = add.s(1, 2)
sent: AsyncResult[int] = add.s(1, 2).delay()
value: int = add.si(1, 2).apply_async(countdown=1).get(timeout=1)
here: int = add.s(1)(2)
flow: _chain[str] = add.s(1, 2) | show.s()
last: AsyncResult[str] = (add.s(1, 2) | show.s()).apply_async()
copied: Signature[int] = add.s(1).clone((2,)).set(queue="q")
anything: int = chain(add.s(1, 2), show.s()).apply_async().get()
members = group(add.s(1, 1), add.s(2, 2))

wrong: Signature[str] = add.s(1, 2)  # BAD: the task returns int
wrong_result: AsyncResult[str] = add.s(1, 2).delay()  # BAD
wrong_value: str = add.si(1, 2).apply_async().get()  # BAD
wrong_last: AsyncResult[int] = (add.s(1, 2) | show.s()).apply_async()  # BAD: show returns str
"""


def test_mypy_keeps_result_types_through_signatures(tmp_path: Path) -> None:
    """A signature keeps its task's result type: ``add.s(1, 2).delay()`` is an
    ``AsyncResult[int]``, a chain's result is its last step's."""
    lines, expected, output = mypy_errors(tmp_path, CANVAS_SNIPPET)
    assert len(expected) == 4
    assert lines == expected, output


def mypy_errors(tmp_path: Path, snippet: str) -> tuple[list[int], list[int], str]:
    """Run ``mypy --strict`` on ``snippet``: the lines it flags, the lines marked
    ``# BAD``, and its output."""
    source = tmp_path / "snippet.py"
    source.write_text(textwrap.dedent(snippet))
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
    expected = [n for n, text in enumerate(snippet.splitlines(), 1) if "# BAD" in text]
    return lines, expected, run.stdout + run.stderr


def test_mypy_checks_task_calls(tmp_path: Path) -> None:
    lines, expected, output = mypy_errors(tmp_path, SNIPPET)
    assert len(expected) == 5
    assert lines == expected, output
    assert '"delay" of "Task" has incompatible type "str"; expected "int"' in output
