"""``self.replace(sig)`` inside a task, as Celery 5.7 does it.

The running task hands its place to ``sig``: ``sig`` is frozen with the running task's
id (so results already given out follow it), takes over its callbacks, errbacks, chord
membership, group id/index and root id, and the rest of its chain follows ``sig``. A group
becomes a chord whose body (``celery.accumulate``) gives the group's list. Then ``sig`` is
sent and :class:`~celeriac.exceptions.Ignore` stops the current task (no result stored
for it: the replacement stores it). In eager mode ``sig`` runs here and its value is
returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celeriac.canvas_signatures import Signature, _chain, as_list, group, signature
from celeriac.exceptions import Ignore, ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.task import Task

__all__ = ["replace_task"]


def replace_task(task: Task[Any, Any], sig: Signature[Any]) -> Any:
    request = task.request
    app = task.app
    if "chord" in sig.options:
        raise ImproperlyConfigured("A signature replacing a task must not be part of a chord")
    if isinstance(sig, _chain) and not sig.tasks:
        raise ImproperlyConfigured("Cannot replace with an empty chain")
    sig = sig.clone()
    if isinstance(sig, group):
        # A group cannot carry callbacks: a chord with an identity body can.
        sig = sig | app.tasks["celery.accumulate"].s(index=0)
    for callback in as_list(request.callbacks):
        sig.link(signature(callback, app=app))
    for errback in as_list(request.errbacks):
        sig.link_error(signature(errback, app=app))
    if isinstance(sig, _chain) and "link" in sig.options:
        # The chain's callbacks belong after its last step, even when more steps follow.
        sig.tasks[-1].extend_list_option("link", sig.options.pop("link"))
    sig.freeze(request.id)
    nesting = (request.get("replaced_task_nesting") or 0) + 1
    sig.set(
        chord=request.chord,
        group_id=request.group,
        group_index=request.group_index,
        root_id=request.root_id,
        replaced_task_nesting=nesting,
    )
    for step in reversed(as_list(request.chain)):
        following = signature(step, app=app)
        following.set(replaced_task_nesting=nesting)
        sig = sig | following
    if request.is_eager:
        return sig.apply().get()
    sig.delay()
    raise Ignore("Replaced by new task")
