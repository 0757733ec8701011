"""Signatures keep their task's result type: mypy sees ``add.s(1, 2).delay()`` as an
``AsyncResult[int]``, and a chain's result as its last step's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SNIPPET = """\
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
    assert len(expected) == 4
    assert lines == expected, run.stdout + run.stderr
