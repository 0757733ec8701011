"""``CELERIAC_TRACE``: the opt-in hop timestamps of docs/latency.md, from a real worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import ResultKeys, StartWorker, TasksDir, WorkerProcess

pytestmark = pytest.mark.redis

#: The hops one task passes in the worker, in the order they happen.
WORKER_HOPS = [
    "consume.fetched",
    "consume.handed",
    "py.fetched",
    "py.task.start",
    "py.task.end",
    "result.handoff",
    "result.written",
]


def _one_task(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, trace: Path
) -> WorkerProcess:
    """Run ``add(2, 3)`` through a worker started with ``CELERIAC_TRACE=trace``; stopped."""
    tasks_dir.env["CELERIAC_TRACE"] = str(trace)
    process = worker("-c", "1")
    tasks = tasks_dir.import_module()
    result = tasks.add.delay(2, 3)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 5
    process.stop()
    return process


def test_a_traced_worker_writes_its_hops_in_order(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    process = _one_task(worker, tasks_dir, result_keys, trace)
    lines = [line.split(" ", 3) for line in trace.read_text().splitlines()]
    # Rust (src/trace.rs) and Python (celeriac/_trace.py) lines share one format and clock.
    assert {pid for _, pid, _, _ in lines} == {str(process.proc.pid)}
    first: dict[str, int] = {}
    for ns, _, _, name in lines:
        first.setdefault(name, int(ns))
    assert set(WORKER_HOPS) <= set(first), sorted(first)
    times = [first[name] for name in WORKER_HOPS]
    assert times == sorted(times), list(zip(WORKER_HOPS, times, strict=True))


def test_a_trace_file_that_cannot_be_opened_warns_and_the_task_runs(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir" / "trace.txt"
    process = _one_task(worker, tasks_dir, result_keys, missing)
    assert f"CELERIAC_TRACE: cannot open {str(missing)!r}" in process.log
    assert not missing.parent.exists()
