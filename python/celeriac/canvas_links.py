"""What happens after a task ends, for the worker and for eager ``apply``: its
callbacks get its return value, its errbacks are called by Celery's rule."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celeriac.canvas_signatures import Signature, as_list, as_signature, group
from celeriac.exceptions import NotRegistered
from celeriac.result import AsyncResult as _AsyncResult

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["call_errbacks", "send_callbacks", "signature_list", "takes_request"]

logger = logging.getLogger("celeriac.canvas")


# -- errbacks -----------------------------------------------------------------------


def takes_request(errback: Signature[Any]) -> bool:
    """Celery's split of errbacks: True for one called in the failing task's process
    as ``errback(request, exc, traceback)`` -- a task made by the decorator, not
    ``bind=True``, whose function still takes more than one positional argument
    after the signature's own ones. False: sent as a message with the failed task's id
    (also when this process does not know the task)."""
    try:
        task = errback.type
    except NotRegistered:
        return False
    function = task.__dict__.get("__wrapped__")
    body = task.__dict__.get("_orig_run") or task.__dict__.get("run")
    if function is None or isinstance(body, type(task.retry)):
        return False  # a Task subclass, or bind=True: the old single-argument call
    target: Callable[..., Any] = function
    if not errback.immutable and (errback.args or errback.kwargs):
        target = functools.partial(function, *errback.args, **errback.kwargs)
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        params = inspect.signature(function).parameters.values()
    kinds = inspect.Parameter
    if any(p.kind is kinds.VAR_POSITIONAL for p in params):
        return True
    positional = [
        p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) > 1


# -- what happens after a task ends (the worker's and eager apply's) ------------------


def signature_list(value: Any, app: Celeriac | None = None) -> list[Signature[Any]]:
    """A ``link``/``link_error`` value (one signature or a list) as signatures."""
    return [as_signature(item, app) for item in as_list(value)]


def send_callbacks(
    sigs: list[Signature[Any]], retval: Any, app: Celeriac, **lineage: Any
) -> _AsyncResult[Any] | None:
    """Apply a succeeded task's callbacks to its return value, as Celery does: one is
    sent alone (its result is returned); several go out as one group (each callback
    that is itself a group on its own). ``lineage``: parent_id, root_id, priority."""
    if len(sigs) == 1:
        return sigs[0].apply_async((retval,), **lineage)
    plain = [sig for sig in sigs if not isinstance(sig, group)]
    for sig in sigs:
        if isinstance(sig, group):
            sig.apply_async((retval,), **lineage)
    if plain:
        group(plain, app=app).apply_async((retval,), **lineage)
    return None


def call_errbacks(
    sigs: list[Signature[Any]],
    request: Any,
    exc: BaseException,
    traceback: str | None,
    app: Celeriac,
    eager: bool = False,
) -> None:
    """Run a failed task's errbacks: ``errback(request, exc, traceback)`` here for
    those that take it (:func:`takes_request`; what they raise is logged), the others
    as one group with ``(failed task id,)`` (run here too when ``eager``)."""
    by_message: list[Signature[Any]] = []
    for errback in sigs:
        if not takes_request(errback):
            by_message.append(errback)
            continue
        try:
            errback(request, exc, traceback)
        except Exception:
            logger.exception("Errback %r raised an exception", errback.task)
    if by_message:
        task_id = request.id
        lineage = {"parent_id": task_id, "root_id": request.root_id or task_id}
        errbacks = group(by_message, app=app)
        if eager:
            errbacks.apply((task_id,), **lineage)
        else:
            errbacks.apply_async((task_id,), **lineage)
