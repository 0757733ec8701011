"""Canvas duties of a task whose prefork child died under it (hard time limit, killed,
crashed): Celery's main process then runs its errbacks, fails the rest of its chain and
records its chord part (``WorkerLostError``/``TimeLimitExceeded``), so the chord fails
instead of waiting forever.

The child cannot tell anyone once it is dead, so before running a task that has canvas
fields (``embed.errbacks``, ``chord``, ``chain``) it writes them to a small file of its
slot (:func:`record`); the supervisor, when that child dies with the task, reads the file
back and does what the child's worker would have done after a failure (:func:`after_lost`).
The child empties the file when the task ends (:func:`task_done`). Tasks without canvas
fields cost nothing.

Every chain step and chord header task writes a record, so it is kept cheap: the file
lives in shared memory (``/dev/shm``) when there is one, and each child keeps its file
open and overwrites it in place, instead of creating, renaming and removing a file per
task on a journaling disk. A child killed halfway through a write leaves a record that
does not parse or names another task; the supervisor ignores it, as it would a record
never written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from celeriac import states

if TYPE_CHECKING:
    from celeriac._core import Backend
    from celeriac.app import Celeriac
    from celeriac.worker.request import Request
    from celeriac.worker.slots import Slot

logger = logging.getLogger("celeriac.worker.canvas")

_CANVAS_FIELDS = ("errbacks", "chord", "chain")
_HEADERS = ("group", "group_index", "root_id", "parent_id")


_SHARED_MEMORY = "/dev/shm"


def _directory() -> str:
    if os.path.isdir(_SHARED_MEMORY) and os.access(_SHARED_MEMORY, os.W_OK | os.X_OK):
        return _SHARED_MEMORY
    return tempfile.gettempdir()


def _path(supervisor_pid: int, index: int) -> str:
    return os.path.join(_directory(), f"celeriac-canvas-{supervisor_pid}-{index}.json")


def record(child: Any, request: Request) -> None:
    """In a prefork child, before the task runs: keep its canvas fields where the
    supervisor finds them (only when it has any). ``child``: the ChildContext."""
    embed = request.delivery.embed
    if not embed or not any(embed.get(field) for field in _CANVAS_FIELDS):
        return
    headers = request.delivery.headers
    fields = {
        "id": request.id,
        "name": request.name,
        "embed": {field: embed.get(field) for field in _CANVAS_FIELDS},
        "headers": {key: headers.get(key) for key in _HEADERS},
        "priority": request.delivery.priority,
    }
    try:
        text = json.dumps(fields)
    except (TypeError, ValueError):
        return  # not JSON (a pickled canvas): nothing the supervisor could use
    data = text.encode()
    try:
        fd = _record_file(child.parent_pid, child.index)
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError as exc:
        logger.debug("Cannot record the canvas of %s: %s", request.id, exc)
        return
    _recorded[0] = True


#: Whether this child's record holds the task it runs (emptied when the task ends).
_recorded: list[bool] = [False]
#: This process's open record file: ``((supervisor pid, slot index), fd)``.
_record_fd: list[tuple[tuple[int, int], int] | None] = [None]


def _record_file(supervisor_pid: int, index: int) -> int:
    """The descriptor of this child's record file, opened once per process."""
    owner = (supervisor_pid, index)
    opened = _record_fd[0]
    if opened is not None:
        if opened[0] == owner:
            return opened[1]
        with contextlib.suppress(OSError):
            os.close(opened[1])
        _record_fd[0] = None
    fd = os.open(_path(supervisor_pid, index), os.O_RDWR | os.O_CREAT, 0o600)
    _record_fd[0] = (owner, fd)
    return fd


def task_done() -> None:
    """In a prefork child, after the task: its record is not needed any more."""
    opened = _record_fd[0]
    if _recorded[0] and opened is not None:
        _recorded[0] = False
        with contextlib.suppress(OSError):
            os.ftruncate(opened[1], 0)


def discard(supervisor_pid: int, index: int) -> None:
    """In the supervisor, once the child of slot ``index`` has exited: its record file
    (if any) goes with it."""
    with contextlib.suppress(OSError):
        os.unlink(_path(supervisor_pid, index))


def _take(supervisor_pid: int, index: int, task_id: str) -> dict[str, Any] | None:
    path = _path(supervisor_pid, index)
    try:
        with open(path, encoding="utf-8") as source:
            fields = json.load(source)
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        os.unlink(path)
    if not isinstance(fields, dict) or fields.get("id") != task_id:
        return None  # an older task's record
    return fields


class _LostRequest:
    """What ``canvas_step`` reads of a worker request, rebuilt from a record."""

    def __init__(self, fields: dict[str, Any], task: Any) -> None:
        headers = fields.get("headers") if isinstance(fields.get("headers"), dict) else {}
        embed = fields.get("embed") if isinstance(fields.get("embed"), dict) else {}
        self.id: str = fields["id"]
        self.name: str = str(fields.get("name"))
        self.task = task
        self.delivery = SimpleNamespace(
            embed=embed, headers=headers, priority=fields.get("priority")
        )

    def context(self) -> dict[str, Any]:
        headers = self.delivery.headers
        return {
            "id": self.id,
            "task": self.name,
            "name": self.name,
            "root_id": headers.get("root_id") or self.id,
            "parent_id": headers.get("parent_id"),
            "group": headers.get("group"),
            "group_index": headers.get("group_index"),
            "called_directly": False,
            "is_eager": False,
            "delivery_info": {},
            "errbacks": self.delivery.embed.get("errbacks"),
            "chain": self.delivery.embed.get("chain"),
            "chord": self.delivery.embed.get("chord"),
        }


def after_lost(
    app: Celeriac, backend: Backend | None, slot: Slot, index: int, exc: BaseException
) -> None:
    """In the supervisor, after a lost task's FAILURE was stored: its chord part, the
    rest of its chain and its errbacks, as its worker would have done. Never raises."""
    from celeriac.worker import canvas_step

    fields = _take(os.getpid(), index, slot.task_id)
    if fields is None:
        return
    try:
        task = app.tasks.get(str(fields.get("name")))
        if task is None:
            logger.warning("Task %s[%s] was lost; its canvas needs the task registered here",
                           fields.get("name"), slot.task_id)  # fmt: skip
            return
        lost: Any = _LostRequest(fields, task)
        embed = lost.delivery.embed
        if embed.get("chord"):
            canvas_step.chord_part(lost, backend, states.FAILURE, exc)
        if embed.get("chain") or embed.get("errbacks"):
            canvas_step.after_failure(lost, backend, exc, None)
    except Exception:
        logger.exception("The canvas of lost task %s could not be completed", slot.task_id)
