"""One task message on its way through the worker: parsed, run, its result stored.

``Request.from_delivery`` turns a decoded ``Delivery`` into what the task sees as
``self.request``; ``execute`` runs it (in whichever thread the pool chose), stores the
outcome in the result backend, logs Celery's lines and says what to do with the message.
Acking is left to the caller, which owns the consumer.
"""

from __future__ import annotations

import enum
import logging
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celeriac import _trace, states
from celeriac.conf import setting
from celeriac.exceptions import Ignore, Reject, Retry, TaskRevokedError
from celeriac.local import push_task
from celeriac.result import exception_to_meta, meta_for
from celeriac.signals import (
    task_failure,
    task_internal_error,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
)
from celeriac.task import Request as TaskRequest
from celeriac.utils.einfo import ExceptionInfo
from celeriac.worker import canvas_step

if TYPE_CHECKING:
    from collections.abc import Callable

    from celeriac._core import Backend, Delivery
    from celeriac.task import Task

logger = logging.getLogger("celeriac.worker.request")

#: Longest repr of a return value in the log (Celery's saferepr limit).
REPR_MAX = 1024


class Disposition(enum.Enum):
    """What the consumer must do with the message once the task is done."""

    #: Nothing (it was acked before the task ran).
    NONE = "none"
    ACK = "ack"
    #: Drop it (``reject(requeue=False)``).
    REJECT = "reject"
    #: Put it back in its queue (``reject(requeue=True)``).
    REQUEUE = "requeue"


#: Headers of the protocol itself (docs/wire.md §1.2, plus kombu's ``redelivered``);
#: any other header is the user's (``apply_async(headers=...)``).
PROTOCOL_HEADERS = frozenset(
    (
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
        "compression",
        "meth",
        "redelivered",
    )
)


class InvalidMessage(ValueError):
    """A message that cannot become a request (e.g. an unparseable ``eta``)."""


def parse_time(value: Any, field: str) -> datetime | None:
    """An ISO-8601 header value as an aware datetime (naive means UTC), or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidMessage(f"{field} {value!r} is not an ISO-8601 string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidMessage(f"{field} {value!r} is not an ISO-8601 date and time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when


def short_repr(value: Any, limit: int = REPR_MAX) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the worker
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


#: The task hooks ``execute`` calls; a hook still the base class's no-op is skipped.
HOOKS = frozenset(("before_start", "on_success", "on_failure", "on_retry", "after_return"))


@dataclass(frozen=True)
class TaskPolicy:
    """What the worker decides per task name once (task attributes over settings),
    instead of per message: the worker keeps one per task for its lifetime."""

    task: Any
    acks_late: bool
    acks_on_failure: bool
    #: The task's ``ignore_result`` (a message may still ask for it with a header).
    ignore_result: bool
    extended: bool
    reject_on_worker_lost: bool
    track_started: bool
    #: The hooks the task overrides (the others are not called).
    hooks: frozenset[str]


def task_policy(task: Task[Any, Any], conf: Any) -> TaskPolicy:
    acks_late = getattr(task, "acks_late", None)
    if acks_late is None:
        acks_late = setting(conf, "task_acks_late")
    ignore_result = getattr(task, "ignore_result", None)
    if ignore_result is None:
        ignore_result = setting(conf, "task_ignore_result")
    return TaskPolicy(
        task=task,
        acks_late=bool(acks_late),
        acks_on_failure=bool(setting(conf, "task_acks_on_failure_or_timeout")),
        ignore_result=bool(ignore_result),
        extended=bool(setting(conf, "result_extended")),
        reject_on_worker_lost=bool(getattr(task, "reject_on_worker_lost", None)),
        track_started=bool(getattr(task, "track_started", None)),
        hooks=_overridden_hooks(task),
    )


def _overridden_hooks(task: Any) -> frozenset[str]:
    from celeriac.task import Task as BaseTask

    hooks = set()
    for name in HOOKS:
        base = getattr(BaseTask, name, None)
        if name in getattr(task, "__dict__", {}) or getattr(type(task), name, None) is not base:
            hooks.add(name)
    return frozenset(hooks)


@dataclass
class Request:
    """A task message the worker accepted, with the policy decided up front."""

    delivery: Delivery
    task: Task[Any, Any]
    #: The name shown in logs: the ``shadow`` header, else the task name.
    name: str
    id: str
    eta: datetime | None
    expires: datetime | None
    acks_late: bool
    acks_on_failure: bool
    ignore_result: bool
    hostname: str
    #: ``result_extended``: store name, args, kwargs, worker, retries, queue too.
    extended: bool = False
    #: ``task_reject_on_worker_lost``: requeue (not fail) when the process dies.
    reject_on_worker_lost: bool = False
    #: ``task_track_started``: store STARTED before the body runs.
    track_started: bool = False
    #: Held (ETA or rate limit) with a window slot of its own.
    extra_slot: bool = False
    #: Held for its rate limit (not its ETA).
    rate_held: bool = False
    #: The process's ``EventDispatcher`` when task events are on (``-E``).
    events: Any = None
    #: Its ``task-received`` fields until sent (``announce.announce_received``).
    received_event: dict[str, Any] | None = None
    #: The task hooks to call (see ``HOOKS``).
    hooks: frozenset[str] = HOOKS
    #: When the body started (UNIX time), for ``inspect active``; None until then.
    time_start: float | None = None
    #: The worker, while this request's ``task_received`` waits until it is kept
    #: (``announce.announce_received``).
    received_by: Any = None
    #: ``(state, return value or exception)`` once the body ended (``task_postrun``).
    outcome: tuple[str, Any] | None = None
    #: Its chord part, sent and not yet settled: the worker settles it before it acks
    #: the message (``ExecutionMixin._finish``), off the task's own time.
    pending_join: canvas_step.PendingChordPart | None = None

    @property
    def args(self) -> Any:
        return self.delivery.args

    @property
    def kwargs(self) -> Any:
        return self.delivery.kwargs

    def send_event(self, type_: str, **fields: Any) -> None:
        """Buffer a task event for this request (no-op without ``-E``)."""
        if self.events is not None:
            self.events.send_task(type_, uuid=self.id, **fields)

    @property
    def delivery_tag(self) -> str:
        return self.delivery.delivery_tag

    @property
    def reply_options(self) -> dict[str, Any]:
        """Where an ``rpc://`` result goes: the sender's reply queue, tagged with the
        message's correlation id (other backends ignore these)."""
        d = self.delivery
        return {"reply_to": d.reply_to, "correlation_id": d.correlation_id or self.id}

    @classmethod
    def from_delivery(
        cls,
        delivery: Delivery,
        task: Task[Any, Any],
        conf: Any,
        hostname: str,
        policy: TaskPolicy | None = None,
    ) -> Request:
        """Raises ``InvalidMessage`` when the message's time fields cannot be read.
        ``policy``: the task's, when the caller keeps them (else read now)."""
        headers = delivery.headers
        task_id = delivery.id or delivery.correlation_id or ""
        if not task_id:
            raise InvalidMessage("the message has no task id")
        if policy is None or policy.task is not task:
            policy = task_policy(task, conf)
        get = headers.get
        eta = get("eta")
        expires = get("expires")
        return cls(
            delivery=delivery,
            task=task,
            name=str(get("shadow") or delivery.task or task.name),
            id=str(task_id),
            eta=None if eta is None else parse_time(eta, "eta"),
            expires=None if expires is None else parse_time(expires, "expires"),
            acks_late=policy.acks_late,
            acks_on_failure=policy.acks_on_failure,
            ignore_result=policy.ignore_result or get("ignore_result") is True,
            hostname=hostname,
            extended=policy.extended,
            reject_on_worker_lost=policy.reject_on_worker_lost,
            track_started=policy.track_started,
            hooks=policy.hooks,
        )

    def context(self) -> dict[str, Any]:
        """The fields of ``task.request`` (Celery's ``Context``) for this message.

        As in Celery, user headers become attributes too, and ``headers`` holds only
        them (None when there are none), so ``retry()`` carries them over without
        overwriting the protocol headers of the new message."""
        d = self.delivery
        headers = d.headers
        get = headers.get
        embed = d.embed or {}
        # Usually every header is the protocol's: test that with one set operation.
        custom = (
            {k: v for k, v in headers.items() if k not in PROTOCOL_HEADERS}
            if headers.keys() - PROTOCOL_HEADERS
            else {}
        )
        return {
            **custom,
            "id": self.id,
            "task": d.task,
            "name": self.name,
            "args": d.args,
            "kwargs": d.kwargs,
            "retries": get("retries") or 0,
            "eta": get("eta"),
            "expires": get("expires"),
            "group": get("group"),
            "group_index": get("group_index"),
            "root_id": get("root_id") or self.id,
            "parent_id": get("parent_id"),
            "shadow": get("shadow"),
            "timelimit": get("timelimit"),
            "origin": get("origin"),
            "ignore_result": self.ignore_result,
            "argsrepr": get("argsrepr"),
            "kwargsrepr": get("kwargsrepr"),
            "stamped_headers": get("stamped_headers"),
            "stamps": get("stamps") or {},
            "replaced_task_nesting": get("replaced_task_nesting") or 0,
            "correlation_id": d.correlation_id or self.id,
            "reply_to": d.reply_to,
            "hostname": self.hostname,
            "delivery_info": {
                "exchange": d.exchange,
                "routing_key": d.routing_key,
                "priority": d.priority,
                "redelivered": d.redelivered,
            },
            "headers": custom or None,
            "callbacks": embed.get("callbacks"),
            "errbacks": embed.get("errbacks"),
            "chain": embed.get("chain"),
            "chord": embed.get("chord"),
            "is_eager": False,
            "acks_late": self.acks_late,
        }

    def meta(self, status: str, result: Any, traceback: str | None = None) -> dict[str, Any]:
        """The result meta to store; inside a run, ``task.request`` (with the
        children the task sent) supplies the request fields."""
        ctx = getattr(self.task, "request", None)
        if ctx is None or getattr(ctx, "id", None) != self.id:
            ctx = self.context()
        return meta_for(self.id, status, result, traceback, ctx, extended=self.extended)

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires is None:
            return False
        return self.expires <= (now or datetime.now(timezone.utc))


class _ContextField:
    """A field of ``task.request`` that reads the message only when first asked for
    (a non-data descriptor: once filled, the instance's own value wins)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return getattr(TaskRequest, self.name, None)
        obj._fill()
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None


class LazyContext(TaskRequest):
    """``task.request`` for a message the worker runs: the same fields as
    ``Request.context()``, built on first use. Most tasks never look at their request,
    and building it for each message was a good part of the per-task cost."""

    def __init__(self, source: Request) -> None:
        self.children = []
        self.called_directly = False
        self._source: Request | None = source

    def _fill(self) -> None:
        fields = self.__dict__
        source = fields.pop("_source", None)
        if source is not None:
            for key, value in source.context().items():
                fields.setdefault(key, value)  # what the task set itself stays

    def __getattr__(self, name: str) -> Any:
        # Only names the class does not know: the message's own (user) headers.
        if name.startswith("__") or "_source" not in self.__dict__:
            raise AttributeError(name)
        self._fill()
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        self._fill()
        return super().__repr__()


#: Every field ``Request.context()`` sets (a user header may add more).
CONTEXT_FIELDS = (
    "id", "task", "name", "args", "kwargs", "retries", "eta", "expires", "group",
    "group_index", "root_id", "parent_id", "shadow", "timelimit", "origin",
    "ignore_result", "argsrepr", "kwargsrepr", "stamped_headers", "stamps",
    "replaced_task_nesting", "correlation_id", "reply_to", "hostname", "delivery_info",
    "headers", "callbacks", "errbacks", "chain", "chord", "is_eager", "acks_late",
)  # fmt: skip
for _name in CONTEXT_FIELDS:
    setattr(LazyContext, _name, _ContextField(_name))
del _name


def push_context(request: Request) -> None:
    """Make a ``LazyContext`` for ``request`` its task's current request (what
    ``task.push_request(**request.context())`` does, without building it now)."""
    task = request.task
    task._request_stack().append(LazyContext(request))
    push_task(task)


def store(backend: Backend | None, request: Request, meta: Mapping[str, Any]) -> None:
    """Write a result; an encoding error becomes a stored FAILURE naming it."""
    if backend is None:
        return
    try:
        backend.store(request.id, meta, **request.reply_options)
    except TypeError as exc:
        logger.error("Task %s[%s] result could not be stored: %s", request.name, request.id, exc)
        backend.store(
            request.id,
            request.meta(states.FAILURE, exception_to_meta(exc)),
            **request.reply_options,
        )


def store_revoked_expired(backend: Backend | None, request: Request) -> None:
    """Celery's record for a message that expired before it ran (docs/wire.md §7)."""
    logger.warning(
        "Task %s[%s] expired at %s; discarding it.",
        request.name,
        request.id,
        request.expires.isoformat() if request.expires else "?",
    )
    request.send_event("task-revoked", terminated=False, signum=None, expired=True)
    if task_revoked.receivers:
        send_revoked(request, terminated=False, signum=None, expired=True)
    if backend is not None and not request.ignore_result:
        reason = exception_to_meta(TaskRevokedError("expired"))
        store(backend, request, request.meta(states.REVOKED, reason))


def send_revoked(request: Request, *, terminated: bool, signum: int | None, expired: bool) -> None:
    """``task_revoked`` for a message discarded or stopped here (sender: its task)."""
    task_revoked.send(
        sender=request.task,
        request=LazyContext(request),
        terminated=terminated,
        signum=signum,
        expired=expired,
    )


def send_internal_error(request: Request, exc: BaseException) -> None:
    """``task_internal_error``: the worker failed around the body, not the task."""
    task_internal_error.send(
        sender=request.task,
        task_id=request.id,
        args=request.delivery.args,
        kwargs=request.delivery.kwargs,
        request=LazyContext(request),
        exception=exc,
        traceback=exc.__traceback__,
        einfo=ExceptionInfo(exc, "".join(traceback.format_exception(exc))),
    )


def _handler(request: Request, name: str, *args: Any) -> None:
    """Call a task hook (``on_success`` ...); its errors are logged, never fatal."""
    if name not in request.hooks:
        return  # the base class's no-op
    hook = getattr(request.task, name, None)
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        logger.exception("Task %s[%s] %s raised", request.name, request.id, name)


def execute(
    request: Request,
    backend: Backend | None,
    guard: Callable[[bool], None] | None = None,
) -> Disposition:
    """Run the task, store and log its outcome; returns what to do with the message.

    Early-acked messages (``acks_late`` false) were acked by the caller before this
    runs, so the answer for them is always ``Disposition.NONE``. ``guard(True)`` is
    called right before the task body and ``guard(False)`` right after it (a prefork
    child arms its soft time limit only for the body).
    """
    task = request.task
    late = request.acks_late
    args, kwargs = request.delivery.args, request.delivery.kwargs
    push_context(request)
    started = time.monotonic()
    request.time_start = time.time()
    if request.events is not None:
        request.send_event("task-started")
    if task_prerun.receivers:
        task_prerun.send(sender=task, task_id=request.id, task=task, args=args, kwargs=kwargs)
    try:
        if "before_start" in request.hooks:
            _handler(request, "before_start", request.id, args, kwargs)
        if request.track_started and backend is not None and not request.ignore_result:
            started_meta = {"pid": os.getpid(), "hostname": request.hostname}
            store(backend, request, request.meta(states.STARTED, started_meta))
        try:
            if guard is not None:
                guard(True)
            try:
                if _trace.ENABLED:
                    _trace.hop("py.task.start")
                retval = task(*args, **kwargs)
                if _trace.ENABLED:
                    _trace.hop("py.task.end")
            finally:
                if guard is not None:
                    guard(False)
        except Retry as exc:
            return _on_retry(request, backend, exc)
        except Ignore:
            return _on_ignore(request, late)
        except Reject as exc:
            return _on_reject(request, exc, late)
        except (Exception, SystemExit) as exc:
            return _on_failure(request, backend, exc, traceback.format_exc())
        return _on_success(request, backend, retval, time.monotonic() - started)
    finally:
        if task_postrun.receivers:
            send_postrun(request)
        task.pop_request()


def send_postrun(request: Request) -> None:
    """``task_postrun`` after the body and its outcome's handlers, still inside the
    task's context (``task.request`` is the message's)."""
    task = request.task
    state, retval = request.outcome or (states.FAILURE, None)
    task_postrun.send(
        sender=task,
        task_id=request.id,
        task=task,
        args=request.delivery.args,
        kwargs=request.delivery.kwargs,
        retval=retval,
        state=state,
    )


def _on_success(
    request: Request, backend: Backend | None, retval: Any, runtime: float
) -> Disposition:
    embed = request.delivery.embed
    if embed.get("chain") or embed.get("callbacks"):
        # Sent before the result is stored, so its `children` name them (Celery's order).
        canvas_step.send_after_success(request, retval)
    if backend is not None and not request.ignore_result:
        try:
            backend.store(request.id, request.meta(states.SUCCESS, retval), **request.reply_options)
        except TypeError as exc:
            # The return value cannot be encoded: that is the task's failure.
            return _on_failure(request, backend, exc, traceback.format_exc())
    if embed.get("chord"):
        request.pending_join = canvas_step.begin_chord_part(
            request, backend, states.SUCCESS, retval
        )
    if request.events is not None:
        request.send_event("task-succeeded", result=short_repr(retval), runtime=runtime)
    hooks = request.hooks
    if hooks:
        args, kwargs = request.delivery.args, request.delivery.kwargs
        _handler(request, "on_success", retval, request.id, args, kwargs)
        _handler(request, "after_return", states.SUCCESS, retval, request.id, args, kwargs, None)
    request.outcome = (states.SUCCESS, retval)
    if task_success.receivers:
        task_success.send(sender=request.task, result=retval, runtime=runtime)
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "Task %s[%s] succeeded in %ss: %s",
            request.name,
            request.id,
            f"{runtime:.6f}",
            short_repr(retval),
        )
    return Disposition.ACK if request.acks_late else Disposition.NONE


def _failure_disposition(request: Request) -> Disposition:
    if not request.acks_late:
        return Disposition.NONE
    return Disposition.ACK if request.acks_on_failure else Disposition.REJECT


def _on_failure(
    request: Request, backend: Backend | None, exc: BaseException, tb: str
) -> Disposition:
    expected = tuple(getattr(request.task, "throws", ()) or ())
    if expected and isinstance(exc, expected):
        logger.info("Task %s[%s] raised expected: %r", request.name, request.id, exc)
    else:
        logger.error(
            "Task %s[%s] raised unexpected: %r",
            request.name,
            request.id,
            exc,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    if backend is not None and not request.ignore_result:
        store(backend, request, request.meta(states.FAILURE, exception_to_meta(exc), tb))
    embed = request.delivery.embed
    if embed.get("chord"):
        request.pending_join = canvas_step.begin_chord_part(request, backend, states.FAILURE, exc)
    if embed.get("chain") or embed.get("errbacks"):
        canvas_step.after_failure(request, None if request.ignore_result else backend, exc, tb)
    request.send_event("task-failed", exception=short_repr(exc), traceback=tb)
    einfo = ExceptionInfo(exc, tb)
    args, kwargs = request.delivery.args, request.delivery.kwargs
    _handler(request, "on_failure", exc, request.id, args, kwargs, einfo)
    request.outcome = (states.FAILURE, exc)
    if task_failure.receivers:
        task_failure.send(
            sender=request.task,
            task_id=request.id,
            exception=exc,
            args=args,
            kwargs=kwargs,
            traceback=exc.__traceback__,
            einfo=einfo,
        )
    _handler(request, "after_return", states.FAILURE, exc, request.id, args, kwargs, einfo)
    return _failure_disposition(request)


def _on_ignore(request: Request, late: bool) -> Disposition:
    """The task raised ``Ignore``: no state stored; a late-acked message is acked."""
    logger.info("Task %s[%s] ignored", request.name, request.id)
    request.outcome = (states.IGNORED, None)
    return Disposition.ACK if late else Disposition.NONE


def _on_reject(request: Request, exc: Reject, late: bool) -> Disposition:
    """The task raised ``Reject``: a late-acked message is rejected or requeued."""
    requeue = bool(getattr(exc, "requeue", False))
    request.outcome = (states.REJECTED, exc)
    logger.warning("Task %s[%s] %r", request.name, request.id, exc)
    request.send_event("task-rejected", requeue=requeue)
    if not late:
        return Disposition.NONE
    return Disposition.REQUEUE if requeue else Disposition.REJECT


def _on_retry(request: Request, backend: Backend | None, exc: Retry) -> Disposition:
    logger.info("Task %s[%s] retry: %s", request.name, request.id, exc)
    cause = getattr(exc, "exc", None)
    reason: BaseException = cause if isinstance(cause, BaseException) else exc
    tb = traceback.format_exc()
    if backend is not None and not request.ignore_result:
        store(backend, request, request.meta(states.RETRY, exception_to_meta(reason), tb))
    request.send_event("task-retried", exception=short_repr(reason), traceback=tb)
    einfo = ExceptionInfo(reason, tb)
    args, kwargs = request.delivery.args, request.delivery.kwargs
    _handler(request, "on_retry", reason, request.id, args, kwargs, einfo)
    request.outcome = (states.RETRY, exc)
    if task_retry.receivers:
        task_retry.send(sender=request.task, request=request.task.request, reason=exc, einfo=einfo)
    _handler(request, "after_return", states.RETRY, reason, request.id, args, kwargs, einfo)
    return Disposition.ACK if request.acks_late else Disposition.NONE
