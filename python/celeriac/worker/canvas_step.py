"""The worker's side of the canvas: what a task's message asks for once it has run.

After a success, *before* its result is stored (so the stored ``children`` name them,
as Celery's do): the callbacks (``embed.callbacks``) get the return value, and the
next chain step -- the LAST element of ``embed.chain`` -- is sent with the return
value in front of its arguments and the rest of the chain in its own ``embed.chain``.

After a failure, once the FAILURE is stored: every remaining chain step that has a
task id is stored as FAILURE too (so ``get()`` on the chain's result fails at once),
then the errbacks run: those that take ``(request, exc, traceback)`` here, the others
as one group of messages with the failed task's id (Celery's rule, see
``celeriac.canvas.takes_request``).

Malformed canvas fields (not a list, not a signature dict) are logged with the reason;
the task's own result is kept and the worker goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.canvas import Signature, call_errbacks, send_callbacks, signature
from celeriac.result import GroupResult, meta_for

if TYPE_CHECKING:
    from celeriac._core import Backend
    from celeriac.worker.request import Request

logger = logging.getLogger("celeriac.worker.canvas")


def _signatures(request: Request, field: str, value: Any) -> list[Signature[Any]]:
    """``value`` (an embed field) as signatures; ``TypeError`` naming what is wrong."""
    if not isinstance(value, list):
        raise TypeError(f"embed.{field} is not a list: {value!r}"[:300])
    app = request.task.app
    sigs: list[Signature[Any]] = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise TypeError(f"embed.{field}[{index}] is not a signature dict: {item!r}"[:300])
        sigs.append(signature(item, app=app))
    return sigs


def _lineage(request: Request) -> dict[str, Any]:
    """``parent_id``/``root_id`` (and the inherited priority) of what this task sends."""
    headers = request.delivery.headers
    sent: dict[str, Any] = {
        "parent_id": request.id,
        "root_id": headers.get("root_id") or request.id,
    }
    app = request.task.app
    if app.conf["task_inherit_parent_priority"]:
        sent["priority"] = request.delivery.priority
    return sent


def send_after_success(request: Request, retval: Any) -> None:
    """Send the callbacks and the next chain step of a task that returned ``retval``."""
    embed = request.delivery.embed
    callbacks = embed.get("callbacks")
    chain = embed.get("chain")
    if callbacks:
        try:
            _send_callbacks(request, retval, callbacks)
        except Exception as exc:
            logger.error(
                "Task %s[%s] succeeded but its callbacks could not be sent: %s",
                request.name, request.id, exc, exc_info=not isinstance(exc, TypeError),
            )  # fmt: skip
    if chain:
        try:
            # Only the next step is read; the rest travels on as it came.
            if not isinstance(chain, list):
                raise TypeError(f"embed.chain is not a list: {chain!r}"[:300])
            (step,) = _signatures(request, "chain", chain[-1:])
            _add_child(request, step.apply_async((retval,), chain=chain[:-1], **_lineage(request)))
        except Exception as exc:
            logger.error(
                "Task %s[%s] succeeded but the next step of its chain could not be sent: %s",
                request.name, request.id, exc, exc_info=not isinstance(exc, TypeError),
            )  # fmt: skip


def _add_child(request: Request, result: Any) -> None:
    """Record a message this task sent in its ``children`` (a group adds itself)."""
    if isinstance(result, GroupResult):
        return
    context = request.task.request
    if getattr(context, "id", None) == request.id:
        request.task.add_trail(result)


def _send_callbacks(request: Request, retval: Any, callbacks: Any) -> None:
    sigs = _signatures(request, "callbacks", callbacks)
    result = send_callbacks(sigs, retval, request.task.app, **_lineage(request))
    if result is not None:
        _add_child(request, result)


def after_failure(
    request: Request, backend: Backend | None, exc: BaseException, traceback: str | None
) -> None:
    """Fail the rest of the chain and run the errbacks of a task that raised ``exc``
    (its own FAILURE already stored)."""
    embed = request.delivery.embed
    chain = embed.get("chain")
    if chain and backend is not None:
        try:
            _fail_chain(request, backend, chain, exc, traceback)
        except Exception as error:
            logger.error(
                "Task %s[%s] failed; the rest of its chain could not be marked failed: %s",
                request.name, request.id, error,
            )  # fmt: skip
    errbacks = embed.get("errbacks")
    if errbacks:
        try:
            _call_errbacks(request, errbacks, exc, traceback)
        except Exception as error:
            logger.error(
                "Task %s[%s] failed and its errbacks could not be called: %s",
                request.name, request.id, error, exc_info=not isinstance(error, TypeError),
            )  # fmt: skip


def _fail_chain(
    request: Request, backend: Backend, chain: Any, exc: BaseException, traceback: str | None
) -> None:
    for step in _signatures(request, "chain", chain):
        options = step.options
        task_id = options.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            continue  # a step without an id of its own: nobody waits on it
        context = {"group": options.get("group_id"), "parent_id": options.get("parent_id")}
        backend.store(
            task_id,
            meta_for(task_id, states.FAILURE, exc, traceback, context),
            reply_to=options.get("reply_to"),
            correlation_id=task_id,
        )


def _call_errbacks(
    request: Request, errbacks: Any, exc: BaseException, traceback: str | None
) -> None:
    context = request.task.request
    if getattr(context, "id", None) != request.id:
        from celeriac.task import Request as TaskRequest

        context = TaskRequest(**request.context())
    sigs = _signatures(request, "errbacks", errbacks)
    call_errbacks(sigs, context, exc, traceback, request.task.app)
