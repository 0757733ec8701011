"""The hooks a fix-up may override (:class:`Fixup`), apart from the fix-ups themselves so
that each of them can build on it without importing the package that installs them."""

from __future__ import annotations

from typing import Any

__all__ = ["Fixup"]


class Fixup:
    """The hooks; each does nothing unless a fix-up overrides it."""

    #: True when :meth:`on_task_start`/:meth:`on_task_end` do something (the worker
    #: skips them otherwise, so an app without fix-ups pays nothing per task).
    per_task = False

    def autodiscover_packages(self) -> list[str] | None:
        """The packages ``autodiscover_tasks()`` without arguments searches (None: none)."""
        return None

    def on_import_modules(self) -> None:
        """Before the worker imports the app's task modules."""

    def on_worker_init(self, worker: Any) -> None:
        """In the worker's main process, before its pool starts."""

    def on_task_start(self) -> None:
        """In the process and thread that runs the task, right before it."""

    def on_task_end(self) -> None:
        """In the process and thread that ran the task, right after it."""
