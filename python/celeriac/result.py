"""Task results: :class:`AsyncResult`, :class:`EagerResult`, and the stored meta.

The meta dict and the exception format are Celery's (docs/wire.md §4), so results
written by a Celery worker are read here and the other way round:

``{"status", "result", "traceback", "children", "date_done", ["group_id"],
["parent_id"], "task_id"}``, with an exception stored as
``{"exc_type", "exc_message", "exc_module"}``.
"""

from __future__ import annotations

import datetime
import sys
import threading
from collections.abc import Iterator, Mapping
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from celeriac import exceptions, result_graph, states
from celeriac._core import dumps
from celeriac.local import get_current_app, get_current_worker_task

if TYPE_CHECKING:
    from typing import TypeAlias

    from celeriac.app import Celeriac

    #: A node of the result graph (collect, iterdeps).
    _Node: TypeAlias = "AsyncResult[Any] | GroupResult"

__all__ = [
    "AsyncResult",
    "EagerResult",
    "GroupResult",
    "ResultSet",
    "exception_from_meta",
    "exception_to_meta",
    "meta_for",
    "result_from_tuple",
]

R = TypeVar("R")

# -- exceptions <-> meta ----------------------------------------------------------------


def _peer_tables() -> tuple[
    dict[type[BaseException], tuple[str, str]], dict[tuple[str, str], type[BaseException]]
]:
    names: dict[type[BaseException], tuple[str, str]] = {
        exceptions.CeleriacError: ("celery.exceptions", "CeleryError"),
        exceptions.TimeoutError: ("celery.exceptions", "TimeoutError"),
        exceptions.OperationalError: ("kombu.exceptions", "OperationalError"),
        exceptions.DecodeError: ("kombu.exceptions", "DecodeError"),
    }
    celery_classes: tuple[type[BaseException], ...] = (
        exceptions.ImproperlyConfigured,
        exceptions.SecurityError,
        exceptions.TaskPredicate,
        exceptions.Retry,
        exceptions.Ignore,
        exceptions.Reject,
        exceptions.TaskError,
        exceptions.QueueNotFound,
        exceptions.IncompleteStream,
        exceptions.NotRegistered,
        exceptions.AlreadyRegistered,
        exceptions.MaxRetriesExceededError,
        exceptions.TaskRevokedError,
        exceptions.InvalidTaskError,
        exceptions.ChordError,
        exceptions.BackendError,
        exceptions.WorkerShutdown,
        exceptions.WorkerTerminate,
    )
    billiard_classes: tuple[type[BaseException], ...] = (
        exceptions.SoftTimeLimitExceeded,
        exceptions.TimeLimitExceeded,
        exceptions.WorkerLostError,
        exceptions.Terminated,
    )
    for cls in celery_classes:
        names[cls] = ("celery.exceptions", cls.__name__)
    for cls in billiard_classes:
        names[cls] = ("billiard.exceptions", cls.__name__)
    back: dict[tuple[str, str], type[BaseException]] = {}
    for cls, (module, name) in names.items():
        back[(module, name)] = cls
        # celery.exceptions re-exports billiard's and kombu's classes.
        back[("celery.exceptions", name)] = cls
        back[("celeriac.exceptions", name)] = cls
    back[("celeriac.exceptions", "CeleriacError")] = exceptions.CeleriacError
    return names, back


# Our classes that stand for a Celery, billiard or kombu class: written under that
# module (and name) so a Celery client reads them, and read back from it.
_PEER_NAMES, _FROM_PEER = _peer_tables()

_synthesized: dict[tuple[str, str], type[BaseException]] = {}
_synthesized_lock = threading.Lock()


def _synthesize(module: str, qualname: str) -> type[BaseException]:
    key = (module, qualname)
    with _synthesized_lock:
        cls = _synthesized.get(key)
        if cls is None:
            name = qualname.rpartition(".")[2] or "UnknownError"
            cls = type(name, (Exception,), {"__module__": module, "__qualname__": qualname})
            _synthesized[key] = cls
        return cls


def _json_safe_args(args: tuple[Any, ...]) -> list[Any]:
    try:
        dumps(args)
        return list(args)
    except (TypeError, ValueError):
        pass
    safe: list[Any] = []
    for arg in args:
        try:
            dumps(arg)
            safe.append(arg)
        except (TypeError, ValueError):
            safe.append(repr(arg))
    return safe


def exception_to_meta(exc: BaseException) -> dict[str, Any]:
    """``{"exc_type", "exc_message", "exc_module"}`` for ``exc``, as Celery stores it
    (JSON): the class's qualified name, ``exc.args`` as a list (arguments JSON cannot
    carry become their ``repr``), and the module, Celery's for our mirrored classes."""
    cls = type(exc)
    peer = _PEER_NAMES.get(cls)
    if peer is not None:
        module, name = peer
    else:
        module, name = cls.__module__, getattr(cls, "__qualname__", cls.__name__)
    return {"exc_type": name, "exc_message": _json_safe_args(exc.args), "exc_module": module}


def exception_from_meta(meta: Any) -> BaseException:
    """The exception a stored ``{"exc_type", "exc_message", "exc_module"}`` describes.

    The class is taken from an already imported module (nothing is imported on behalf
    of stored data, as in Celery); only real ``BaseException`` subclasses are used,
    anything else becomes a new ``Exception`` subclass with that name and module.
    Celery's and billiard's classes map to :mod:`celeriac.exceptions`.
    """
    if isinstance(meta, BaseException):
        return meta
    if not isinstance(meta, Mapping):
        return Exception(meta)
    exc_type = meta.get("exc_type")
    if not isinstance(exc_type, str) or not exc_type:
        raise ValueError(f"the stored exception has no exc_type: {meta!r}")
    module = meta.get("exc_module")
    if not isinstance(module, str) or not module:
        module = "celeriac.exceptions"
    cls: Any = _FROM_PEER.get((module, exc_type))
    if cls is None:
        cls = sys.modules.get(module)
        if cls is not None:
            for part in exc_type.split("."):
                cls = getattr(cls, part, None)
                if cls is None:
                    break
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        cls = _synthesize(module, exc_type)
    message = meta.get("exc_message", "")
    try:
        if isinstance(message, (list, tuple)):
            return cast(BaseException, cls(*message))
        return cast(BaseException, cls(message))
    except Exception:
        return Exception(f"{exc_type}({message!r})")


def _field(request: Any, name: str) -> Any:
    if request is None:
        return None
    if isinstance(request, Mapping):
        return request.get(name)
    return getattr(request, name, None)


def _utcnow_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def meta_for(
    task_id: str,
    status: str,
    result: Any,
    traceback: str | None = None,
    request: Any = None,
    *,
    extended: bool = False,
) -> dict[str, Any]:
    """The meta dict to store for a task (docs/wire.md §4.1), in Celery's key order.

    An exception ``result`` in an exception state is stored as
    :func:`exception_to_meta`. ``request`` (a task request or a mapping) supplies
    ``children``, ``group_id`` and ``parent_id``; ``extended`` adds Celery's
    ``result_extended`` fields (``name``, ``args``, ``kwargs``, ``worker``,
    ``retries``, ``queue``).
    """
    if isinstance(result, BaseException):
        result = exception_to_meta(result)
    children = _field(request, "children")
    meta: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [child.as_tuple() for child in children] if children else [],
        "date_done": _utcnow_iso() if status in states.READY_STATES else None,
    }
    group = _field(request, "group")
    if group:
        meta["group_id"] = group
    parent_id = _field(request, "parent_id")
    if parent_id:
        meta["parent_id"] = parent_id
    if extended and request is not None:
        delivery_info = _field(request, "delivery_info") or {}
        meta["name"] = _field(request, "task") or _field(request, "name")
        meta["args"] = _field(request, "args")
        meta["kwargs"] = _field(request, "kwargs")
        meta["worker"] = _field(request, "hostname")
        meta["retries"] = _field(request, "retries")
        meta["queue"] = delivery_info.get("routing_key")
    meta["task_id"] = task_id
    return meta


def result_from_tuple(value: Any, app: Celeriac | None = None) -> AsyncResult[Any] | None:
    """A result from Celery's tuple form: ``[[id, parent], null]`` is a task's,
    ``[[group_id, parent], [child, ...]]`` a group's (:class:`GroupResult`). Nested
    tuples (parents, children) are read without recursion limits of their own."""
    if value is None:
        return None
    if isinstance(value, (AsyncResult, GroupResult)):
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        return AsyncResult(value, app=app)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"not a result tuple: {value!r}")
    head = value[0]
    children = value[1] if len(value) > 1 else None
    if isinstance(head, (list, tuple)):
        task_id, parent = head[0], head[1] if len(head) > 1 else None
    else:
        task_id, parent = head, None
    parent_result = result_from_tuple(parent, app)
    if children is not None:
        if not isinstance(children, (list, tuple)):
            raise ValueError(f"a group's members must be a list, got {children!r:.200}")
        members = [result_from_tuple(child, app) for child in children]
        return GroupResult(  # type: ignore[return-value]
            task_id, [m for m in members if m is not None], parent=parent_result, app=app
        )
    return AsyncResult(task_id, app=app, parent=parent_result)


def _children_from_meta(task_id: str, children: Any, app: Celeriac | None) -> list[Any]:
    """The stored ``children`` of ``task_id`` as results; a ValueError naming the task
    and the entry when it is not Celery's list of result tuples."""
    if not isinstance(children, (list, tuple)):
        raise ValueError(
            f"result {task_id}: stored children must be a list of result tuples, "
            f"got {type(children).__name__}: {children!r:.200}"
        )
    found: list[Any] = []
    for index, entry in enumerate(children):
        try:
            if isinstance(entry, str):
                raise ValueError("a bare string, not [[id, parent], members]")
            child = result_from_tuple(entry, app)
            if isinstance(child, GroupResult) and not isinstance(child.id, str):
                raise ValueError(f"group id {child.id!r} is not a string")
        except (ValueError, TypeError, IndexError) as exc:
            raise ValueError(
                f"result {task_id}: stored children[{index}] is not a result tuple "
                f"({exc}): {entry!r:.200}"
            ) from exc
        if child is not None:
            found.append(child)
    return found


# -- results ----------------------------------------------------------------------------

_NO_BACKEND = (
    "No result backend is configured, so task results cannot be read. "
    "Set one with Celeriac(backend='redis://...') or the result_backend setting."
)


def _assert_will_not_block() -> None:
    task = get_current_worker_task()
    if task is not None and not task.request.is_eager:
        raise RuntimeError(
            "Never call result.get() within a task: a worker waiting for another task "
            "can deadlock the pool. Chain the tasks instead, or pass "
            "disable_sync_subtasks=False if you accept the risk."
        )


def _parse_date(value: Any) -> datetime.datetime | None:
    if value is None or isinstance(value, datetime.datetime):
        return value
    if isinstance(value, str):
        text = value[:-1] + "+00:00" if value.endswith("Z") else value
        try:
            return datetime.datetime.fromisoformat(text)
        except ValueError:
            return None
    return None


def _revoke(
    app: Celeriac | None,
    ids: str | list[str],
    terminate: bool,
    signal: str | int | None,
    wait: bool,
    timeout: float | None,
) -> None:
    (app or get_current_app()).control.revoke(
        ids,
        terminate=terminate,
        signal=signal or "SIGTERM",
        reply=wait,
        timeout=1.0 if timeout is None else float(timeout),
    )


class AsyncResult(Generic[R]):
    """The result of a task that was sent: its state, and its value once ready."""

    app: Celeriac | None
    parent: AsyncResult[Any] | None
    ignored: bool

    def __init__(
        self,
        id: str,
        backend: Any = None,
        task_name: str | None = None,
        app: Celeriac | None = None,
        parent: AsyncResult[Any] | None = None,
    ) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError(f"AsyncResult needs a task id, got {id!r}")
        self.id = id
        self.app = app
        self._backend = backend
        self.name = task_name
        self.parent = parent
        self.ignored = False
        self._cache: dict[str, Any] | None = None

    # -- identity -------------------------------------------------------------------

    @property
    def task_id(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return bool(other.id == self.id)
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.id, None, self.name, None, self.parent)

    def as_tuple(self) -> tuple[Any, ...]:
        """Celery's tuple form, stored in a parent's ``children``."""
        parent = self.parent
        return ((self.id, parent.as_tuple() if parent is not None else None), None)

    # -- backend --------------------------------------------------------------------

    @property
    def backend(self) -> Any:
        """The result store (``celeriac._core.Backend``), or None when disabled."""
        if self._backend is not None:
            return self._backend
        app = self.app if self.app is not None else get_current_app()
        return app.backend

    def _require_backend(self) -> Any:
        backend = self.backend
        if backend is None:
            raise NotImplementedError(_NO_BACKEND)
        return backend

    def _decode(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        decoded = dict(meta)
        status = decoded.get("status") or states.PENDING
        decoded["status"] = status
        if status in states.EXCEPTION_STATES:
            value = decoded.get("result")
            if value is not None:
                decoded["result"] = exception_from_meta(value)
        if status in states.READY_STATES:
            self._cache = decoded
        return decoded

    def _get_task_meta(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        meta = self._require_backend().get_meta(self.id)
        if meta is None:
            return {"status": states.PENDING, "result": None, "traceback": None, "children": []}
        return self._decode(meta)

    # -- state ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``PENDING`` until the store knows the task, then its stored state."""
        return str(self._get_task_meta()["status"])

    status = state

    @property
    def result(self) -> Any:
        """The return value, or the exception for a failed/retried/revoked task."""
        return self._get_task_meta().get("result")

    info = result

    @property
    def traceback(self) -> str | None:
        return cast("str | None", self._get_task_meta().get("traceback"))

    @property
    def date_done(self) -> datetime.datetime | None:
        return _parse_date(self._get_task_meta().get("date_done"))

    @property
    def children(self) -> list[AsyncResult[Any]] | None:
        """The results this task left behind (``children`` of its stored meta)."""
        children = self._get_task_meta().get("children")
        if children is None:
            return None
        return _children_from_meta(self.id, children, self.app)

    @property
    def args(self) -> Any:
        return self._get_task_meta().get("args")

    @property
    def kwargs(self) -> Any:
        return self._get_task_meta().get("kwargs")

    @property
    def worker(self) -> Any:
        return self._get_task_meta().get("worker")

    @property
    def retries(self) -> Any:
        return self._get_task_meta().get("retries")

    @property
    def queue(self) -> Any:
        return self._get_task_meta().get("queue")

    def ready(self) -> bool:
        """True once the task succeeded, failed or was revoked."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    # -- waiting --------------------------------------------------------------------

    def _value(self, meta: Mapping[str, Any], propagate: bool) -> Any:
        value = meta.get("result")
        status = meta.get("status")
        if propagate and status in states.PROPAGATE_STATES:
            if isinstance(value, BaseException):
                raise value
            if status == states.REVOKED:
                raise exceptions.TaskRevokedError(value)
            raise Exception(value)
        return value

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        disable_sync_subtasks: bool = True,
        **kwargs: Any,
    ) -> R:
        """Wait for the task and return its value; re-raise its exception when it
        failed (``propagate=False`` returns the exception instead). Raises
        :class:`~celeriac.exceptions.TimeoutError` after ``timeout`` seconds."""
        if self.ignored:
            return cast(R, None)
        if disable_sync_subtasks:
            _assert_will_not_block()
        meta = self._cache
        if meta is None and propagate and kwargs.get("follow_parents", True) and self.parent:
            meta = _wait_raising_parent_errors(self, timeout, interval)
        if meta is None:
            meta = self._decode(self._require_backend().wait(self.id, timeout))
        return cast(R, self._value(meta, propagate))

    wait = get

    # -- the graph of results under this one (result_graph) ---------------------------

    def iterdeps(self, intermediate: bool = False) -> Iterator[tuple[_Node | None, _Node]]:
        """``(parent, result)`` for this result and every result under it, in Celery's
        order; :class:`~celeriac.exceptions.IncompleteStream` at a result not ready,
        unless ``intermediate``."""
        walk = result_graph.iterdeps(self, intermediate=intermediate)
        return cast("Iterator[tuple[_Node | None, _Node]]", walk)

    def collect(self, intermediate: bool = False, **kwargs: Any) -> Iterator[tuple[_Node, Any]]:
        """``(result, value)`` for this result and every result under it (tasks it
        sent, its chain's next step, groups it sent and their members), waiting for
        each with ``get(**kwargs)``."""
        pairs = result_graph.collect(self, intermediate=intermediate, **kwargs)
        return cast("Iterator[tuple[_Node, Any]]", pairs)

    def get_leaf(self) -> Any:
        """The value of the last result of :meth:`iterdeps`."""
        return result_graph.get_leaf(self)

    def maybe_throw(self, propagate: bool = True, callback: Any = None) -> Any:
        """Raise the task's exception if it failed or was revoked; else its value."""
        meta = self._get_task_meta()
        value = self._value(meta, propagate)
        if callback is not None:
            callback(self.id, value)
        return value

    maybe_reraise = maybe_throw

    def forget(self) -> None:
        """Remove the stored result."""
        self._cache = None
        self._require_backend().forget(self.id)

    def revoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: str | int | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Tell every worker to discard this task (remote control's ``revoke``); with
        ``terminate`` a running one is stopped with ``signal`` (default SIGTERM).
        ``wait`` waits up to ``timeout`` seconds (default 1) for the workers' replies."""
        _revoke(self.app, self.id, terminate, signal, wait, timeout)


class EagerResult(AsyncResult[R]):
    """The result of a task run locally (``apply`` / ``task_always_eager``)."""

    def __init__(
        self,
        id: str,
        ret_value: Any,
        state: str,
        traceback: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(id, task_name=name)
        self._cache = {
            "status": state,
            "result": ret_value,
            "traceback": traceback,
            "children": [],
            "date_done": _utcnow_iso() if state in states.READY_STATES else None,
            "task_id": id,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        meta = cast(dict[str, Any], self._cache)
        return type(self), (self.id, meta["result"], meta["status"], meta["traceback"], self.name)

    def _get_task_meta(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._cache)

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        disable_sync_subtasks: bool = True,
        **kwargs: Any,
    ) -> R:
        if disable_sync_subtasks:
            _assert_will_not_block()
        return cast(R, self._value(self._get_task_meta(), propagate))

    wait = get

    def forget(self) -> None:
        pass

    def revoke(self, *args: Any, **kwargs: Any) -> None:
        meta = self._get_task_meta()
        meta["status"] = states.REVOKED


def _raise_parent_errors(result: AsyncResult[Any]) -> None:
    """Re-raise the error of a failed parent, the first step first (Celery's
    ``_maybe_reraise_parent_error``; ready parents keep their meta, so each is read
    until it is ready)."""
    parents: list[Any] = []
    node = result.parent
    while node is not None:
        parents.append(node)
        node = getattr(node, "parent", None)
    for node in reversed(parents):
        node.maybe_throw()
        if not node.ready():
            break  # a step not done yet: the ones after it have not run (or failed) either


def _wait_raising_parent_errors(
    result: AsyncResult[Any], timeout: float | None, interval: float
) -> dict[str, Any]:
    """Wait for ``result``'s meta, checking its parents first and every ``interval``
    seconds: a failed step of a chain (or a chord's header task) raises its own error,
    as Celery's ``get()`` does, without waiting for the step that will never run."""
    deadline = None if timeout is None else _monotonic() + timeout
    backend = result._require_backend()
    slice_ = max(0.05, float(interval or 0.5))
    while True:
        _raise_parent_errors(result)
        left = None if deadline is None else deadline - _monotonic()
        if left is not None and left <= 0:
            raise exceptions.TimeoutError("The operation timed out.")
        try:
            meta = result._decode(
                backend.wait(result.id, slice_ if left is None else min(slice_, left))
            )
        except (exceptions.TimeoutError, TimeoutError):
            # A chord's parent is its whole header (one read per unfinished task): the
            # worker fails the body of a failed header anyway, so look less and less often.
            slice_ = min(slice_ * 2, 5.0)
            continue
        if meta.get("status") in states.PROPAGATE_STATES:
            # Failed because a parent failed (a chord's body): the parent's error first.
            _raise_parent_errors(result)
        return meta


class ResultSet:
    """Several results, waited for together (Celery's ``ResultSet``)."""

    def __init__(
        self,
        results: list[AsyncResult[Any]] | None = None,
        app: Celeriac | None = None,
        **kwargs: Any,
    ) -> None:
        self.results: list[AsyncResult[Any]] = list(results or [])
        self.app = app

    def add(self, result: AsyncResult[Any]) -> None:
        if result not in self.results:
            self.results.append(result)

    def remove(self, result: AsyncResult[Any] | str) -> None:
        if isinstance(result, str):
            result = AsyncResult(result, app=self.app)
        self.results.remove(result)

    def discard(self, result: AsyncResult[Any] | str) -> None:
        if result in self.results:
            self.remove(result)

    def update(self, results: list[AsyncResult[Any]]) -> None:
        self.results.extend(r for r in results if r not in self.results)

    def clear(self) -> None:
        self.results[:] = []

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Any:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult[Any]:
        return self.results[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResultSet):
            return other.results == self.results
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(r.id for r in self.results))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: [{', '.join(r.id for r in self.results)}]>"

    # -- state ----------------------------------------------------------------------

    def successful(self) -> bool:
        """True when every result is SUCCESS."""
        return all(result.successful() for result in self.results)

    def failed(self) -> bool:
        """True when any result is FAILURE."""
        return any(result.failed() for result in self.results)

    def ready(self) -> bool:
        """True when every result is ready (succeeded, failed or revoked)."""
        return all(result.ready() for result in self.results)

    def waiting(self) -> bool:
        """True while any result is not ready yet."""
        return any(not result.ready() for result in self.results)

    def completed_count(self) -> int:
        """How many results are SUCCESS (Celery counts successes, not failures)."""
        return sum(int(result.successful()) for result in self.results)

    def maybe_throw(self, callback: Any = None, propagate: bool = True) -> None:
        for result in self.results:
            value = result.maybe_throw(propagate=propagate)
            if callback is not None:
                callback(result.id, value)

    maybe_reraise = maybe_throw

    def forget(self) -> None:
        for result in self.results:
            result.forget()

    def revoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: str | int | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Revoke every result's task, in one broadcast."""
        ids = [result.id for result in self.results]
        _revoke(self.app, ids, terminate, signal, wait, timeout)

    # -- waiting --------------------------------------------------------------------

    def join(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        callback: Any = None,
        no_ack: bool = True,
        on_message: Any = None,
        disable_sync_subtasks: bool = True,
        on_interval: Any = None,
    ) -> list[Any]:
        """Wait for each result in turn and return their values in order; the first
        failure is raised (``propagate``). ``timeout`` is for the whole set:
        :class:`~celeriac.exceptions.TimeoutError` when it passes."""
        if disable_sync_subtasks:
            _assert_will_not_block()
        deadline = None if timeout is None else _monotonic() + timeout
        values: list[Any] = []
        for result in self.results:
            remaining = None
            if deadline is not None:
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise exceptions.TimeoutError("The operation timed out.")
            value = result.get(timeout=remaining, propagate=propagate, disable_sync_subtasks=False)
            if callback is not None:
                callback(result.id, value)
            else:
                values.append(value)
        return values

    #: The values, in the order of the results.
    get = join

    def join_native(self, *args: Any, **kwargs: Any) -> list[Any]:
        return self.join(*args, **kwargs)

    def supports_native_join(self) -> bool:
        return False


class GroupResult(ResultSet):
    """The result of a group: its id and its members' results, in order.

    ``save()`` stores it in the result backend under Celery's
    ``celery-taskset-meta-<id>`` key, so ``GroupResult.restore(id)`` rebuilds it in
    any process -- Celery's too."""

    def __init__(
        self,
        id: str | None = None,
        results: list[AsyncResult[Any]] | None = None,
        parent: AsyncResult[Any] | None = None,
        app: Celeriac | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(results, app=app)
        self.id = id
        self.parent = parent

    @property
    def children(self) -> list[AsyncResult[Any]]:
        return self.results

    def as_tuple(self) -> tuple[Any, ...]:
        parent = self.parent
        return (
            (self.id, parent.as_tuple() if parent is not None else None),
            [result.as_tuple() for result in self.results],
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return other.id == self.id and other.results == self.results
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __str__(self) -> str:
        return str(self.id)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.id, self.results, self.parent)

    # -- the backend ----------------------------------------------------------------

    def _store(self, backend: Any) -> Any:
        app = self.app or get_current_app()
        if backend is not None:
            return backend
        return app.taskset_backend

    def save(self, backend: Any = None) -> GroupResult:
        """Store the group (its id and its members' ids) for ``restore``."""
        if not self.id:
            raise ValueError("a GroupResult needs an id to be saved")
        store = self._store(backend)
        store.store(self.id, {"result": self.as_tuple()})
        store.flush()
        return self

    def delete(self, backend: Any = None) -> None:
        """Remove the saved group."""
        if self.id:
            self._store(backend).forget(self.id)

    @classmethod
    def restore(
        cls, id: str, backend: Any = None, app: Celeriac | None = None
    ) -> GroupResult | None:
        """The group saved under ``id`` (by celeriac or Celery), or None."""
        app = app or get_current_app()
        store = backend if backend is not None else app.taskset_backend
        meta = store.get_meta(id)
        if meta is None:
            return None
        restored = result_from_tuple(meta.get("result"), app)
        if not isinstance(restored, GroupResult):
            raise ValueError(f"the saved group {id!r} is not a group tuple")
        return restored
