"""Fix-ups around the worker's tasks: a failing hook is logged, never the task's failure."""

from __future__ import annotations

import logging

import pytest
from celeriac.fixups import Fixup, run_with_fixups


class Recording(Fixup):
    per_task = True

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def on_task_start(self) -> None:
        self.calls.append("start")
        if self.fail:
            raise RuntimeError("start hook broke")

    def on_task_end(self) -> None:
        self.calls.append("end")
        if self.fail:
            raise RuntimeError("end hook broke")


def test_hooks_run_around_the_task_in_order() -> None:
    fixup = Recording()
    ran: list[str] = []

    def task(value: int) -> int:
        ran.append("task")
        assert fixup.calls == ["start"]
        return value * 2

    assert run_with_fixups([fixup], task, 21) == 42
    assert ran == ["task"]
    assert fixup.calls == ["start", "end"]


def test_a_failing_hook_is_logged_and_the_task_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken, healthy = Recording(fail=True), Recording()
    with caplog.at_level(logging.ERROR, logger="celeriac.fixups"):
        assert run_with_fixups([broken, healthy], lambda: "done") == "done"
    assert healthy.calls == ["start", "end"]
    assert [record.exc_info[1].args[0] for record in caplog.records if record.exc_info] == [
        "start hook broke",
        "end hook broke",
    ]


def test_the_tasks_own_error_propagates_after_the_end_hook() -> None:
    fixup = Recording()

    def task() -> None:
        raise ValueError("the task's")

    with pytest.raises(ValueError, match="the task's"):
        run_with_fixups([fixup], task)
    assert fixup.calls == ["start", "end"]


def test_fixups_without_per_task_hooks_are_skipped() -> None:
    fixup = Recording()
    fixup.per_task = False
    assert run_with_fixups([fixup], lambda: 1) == 1
    assert fixup.calls == []
