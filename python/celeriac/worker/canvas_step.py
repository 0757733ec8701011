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
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from traceback import format_exc
from typing import TYPE_CHECKING, Any, Protocol

from celeriac import states
from celeriac.canvas import Signature, seconds_of, signature
from celeriac.canvas_links import call_errbacks, send_callbacks
from celeriac.exceptions import ChordError
from celeriac.result import GroupResult, exception_from_meta, exception_to_meta, meta_for
from celeriac.task import Request as TaskRequest

if TYPE_CHECKING:
    from celeriac._core import Backend, ChordJoin, Delivery
    from celeriac.task import Task

logger = logging.getLogger("celeriac.worker.canvas")


class Request(Protocol):
    """What a canvas step reads of the worker's request (``worker.request.Request``,
    which calls this module: a shape here, so the two do not import each other)."""

    @property
    def delivery(self) -> Delivery: ...
    @property
    def task(self) -> Task[Any, Any]: ...
    @property
    def name(self) -> str: ...
    @property
    def id(self) -> str: ...

    def context(self) -> dict[str, Any]: ...


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
        context = TaskRequest(**request.context())
    sigs = _signatures(request, "errbacks", errbacks)
    call_errbacks(sigs, context, exc, traceback, request.task.app)


# -- chords ---------------------------------------------------------------------------


def chord_part(request: Request, backend: Backend | None, state: str, result: Any) -> None:
    """A chord header task ended (its result stored): record its part of the join;
    the worker that records the last part sends the body, or fails it with
    ``ChordError`` when a part failed. Problems are logged, never raised."""
    pending = begin_chord_part(request, backend, state, result)
    if pending is not None:
        pending.settle()


def begin_chord_part(
    request: Request, backend: Backend | None, state: str, result: Any
) -> PendingChordPart | None:
    """``chord_part`` in two steps: the part is sent now (on Redis, its script goes
    out without waiting for the reply); ``settle()`` on what this returns reads the
    reply and sends the body when this part completed the header. The worker settles
    before it acks the message, so under ``acks_late`` a redelivered header task still
    finds its part recorded or joins again. None when there is nothing to settle
    (the problem was logged)."""
    try:
        return _begin_chord_part(request, backend, state, result)
    except Exception as exc:
        _log_join_error(request, exc)
        return None


def _log_join_error(request: Request, exc: Exception) -> None:
    logger.error(
        "Task %s[%s] is part of chord %r, which could not be joined: %s",
        request.name, request.id, request.delivery.headers.get("group"), exc,
        exc_info=not isinstance(exc, (TypeError, NotImplementedError)),
    )  # fmt: skip


def _begin_chord_part(
    request: Request, backend: Backend | None, state: str, result: Any
) -> PendingChordPart:
    headers = request.delivery.headers
    group_id = headers.get("group")
    if not isinstance(group_id, str) or not group_id:
        raise TypeError("embed.chord is set but the message has no group id")
    embed = request.delivery.embed
    raw_body = embed.get("chord")
    if not isinstance(raw_body, Mapping):
        raise TypeError(f"embed.chord is not a signature dict: {raw_body!r}"[:300])
    app = request.task.app
    body = signature(raw_body, app=app)
    conf = app.conf
    store = app.taskset_backend
    if isinstance(result, BaseException):
        result = exception_to_meta(result)
    index = headers.get("group_index")
    join_timeout = float(conf.get("result_chord_join_timeout") or 5.0)
    claim_expires = max(5, int(join_timeout * 2))
    token = uuid.uuid4().hex
    expires = seconds_of(conf.get("result_chord_expires") or conf["result_expires"])
    join = store.chord_part_begin(
        group_id, request.id, index if isinstance(index, int) else None,
        [1, request.id, state, result], expires, claim_expires, token,
    )  # fmt: skip
    return PendingChordPart(request, backend, store, group_id, body, join, token, claim_expires)


@dataclass
class PendingChordPart:
    """A header part on its way to the join; ``settle`` finishes it (once)."""

    request: Request
    backend: Backend | None
    store: Backend
    group_id: str
    body: Signature[Any]
    join: ChordJoin
    token: str
    claim_expires: int

    def settle(self) -> None:
        """Read the join's reply; the part that completed the header sends the body
        (or fails it). Problems are logged, never raised."""
        try:
            self._settle()
        except Exception as exc:
            _log_join_error(self.request, exc)

    def _settle(self) -> None:
        request, backend, store = self.request, self.backend, self.store
        group_id, token, claim_expires = self.group_id, self.token, self.claim_expires
        ready, _total, claimed = self.join.wait()
        if ready < 0 or not claimed:
            return
        body = self.body
        parts = store.chord_results(group_id)
        values: list[Any] = []
        for part in parts:
            _, part_id, part_state, value = part
            if part_state in states.PROPAGATE_STATES:
                cause = (
                    exception_from_meta(value) if part_state in states.EXCEPTION_STATES else value
                )
                error = ChordError(f"Dependency {part_id} raised {cause!r}")
                logger.error("Chord %r raised: %r", group_id, error)
                try:
                    _fail_chord_body(request, backend, body, error)
                finally:
                    store.chord_drop_size(group_id)
                return
            values.append(value)
        if not store.chord_claim_extend(group_id, token, claim_expires * 2):
            logger.warning("Chord callback for %r not sent: another worker claimed it", group_id)
            return
        try:
            body.apply_async((values,), **_lineage(request))
        except Exception as exc:
            logger.exception("Chord callback for %r raised: %r", group_id, exc)
            _fail_chord_body(request, backend, body, ChordError(f"Callback error: {exc!r}"))
        finally:
            store.chord_cleanup(group_id, token, max(claim_expires * 2, 300))


def _fail_chord_body(
    request: Request, backend: Backend | None, body: Signature[Any], error: ChordError
) -> None:
    """Celery's ``chord_error_from_stack``: the body's FAILURE, its chain failed and
    its errbacks called (as if the body had raised ``error``)."""
    body_id = body.id
    if backend is None or not body_id:
        return
    try:
        raise error
    except ChordError:
        traceback = format_exc()
    context = TaskRequest(
        id=body_id, task=body.task, args=body.args, kwargs=body.kwargs,
        root_id=body.root_id or body_id, group=body.options.get("group_id"),
        parent_id=body.parent_id, called_directly=False, delivery_info={},
    )  # fmt: skip
    backend.store(body_id, meta_for(body_id, states.FAILURE, error, traceback, context))
    chain = body.options.get("chain")
    if chain:
        _fail_chain(request, backend, chain, error, traceback)
    errbacks = body.options.get("link_error")
    if errbacks:
        sigs = _signatures(
            request, "link_error", errbacks if isinstance(errbacks, list) else [errbacks]
        )
        call_errbacks(sigs, context, error, None, request.task.app)
