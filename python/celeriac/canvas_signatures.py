"""The canvas's core: signatures, chains and groups, on Celery 5.7's wire (chords:
``celeriac.canvas_chord``; callbacks and errbacks: ``celeriac.canvas_links``).

A :class:`Signature` *is* a dict -- ``{"task", "args", "kwargs", "options",
"subtask_type", "immutable"}`` -- so it travels inside task messages as JSON, and a
signature written by Celery reads back here (and the other way round). Behaviour lives
in small classes per primitive (:class:`chain`, :class:`group`, ``chord``); what a
worker does after a task ends (send the next chain step, the callbacks, the errbacks,
its chord part) is in ``celeriac.worker.canvas_step``.

A chain is sent as ONE message: its first task, carrying the remaining steps in
``embed.chain`` in reverse order (the next step last). Each worker, after its task
succeeds, sends the next step with the return value prepended to its arguments.

map/starmap/chunks: ``celeriac.canvas_map``; ``Task.replace``: ``celeriac.canvas_replace``.
``celeriac.canvas`` gathers the public names of all of them.
"""

from __future__ import annotations

import copy
import functools
import logging
import operator
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from celeriac import states
from celeriac.exceptions import NotRegistered
from celeriac.local import get_current_app, get_current_worker_task
from celeriac.result import AsyncResult as _AsyncResult
from celeriac.result import EagerResult, GroupResult

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.task import Task

__all__ = ["Signature", "chain", "group", "maybe_signature", "signature"]

logger = logging.getLogger("celeriac.canvas")

R = TypeVar("R")
T = TypeVar("T")
SigT = TypeVar("SigT", bound="Signature[Any]")

#: Options a merge never overrides once set (Celery's ``_IMMUTABLE_OPTIONS``).
_IMMUTABLE_OPTIONS = frozenset({"group_id", "stamped_headers"})
_KEYS = ("task", "args", "kwargs", "options", "subtask_type", "immutable")


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


V = TypeVar("V")


def _as_dict(value: Any) -> dict[str, Any]:
    return cast("dict[str, Any]", value)


def _as_name(value: Any) -> str | None:
    return cast("str | None", value)


class _Field(Generic[V]):
    """A key of the signature dict read and written as an attribute (``sig.args``):
    ``read`` converts what is stored, ``write`` what is assigned."""

    def __init__(self, key: str, read: Callable[[Any], V], write: Callable[[Any], Any]) -> None:
        self.key = key
        self.read = read
        self.write = write

    def __get__(self, obj: Any, owner: Any = None) -> V:
        if obj is None:
            return cast(V, self)
        return self.read(obj[self.key])

    def __set__(self, obj: Any, value: Any) -> None:
        obj[self.key] = self.write(value)


def seconds_of(value: Any) -> int:
    """A number of seconds or a timedelta (``result_expires``) as whole seconds."""
    if hasattr(value, "total_seconds"):
        value = value.total_seconds()
    return max(0, int(value or 0))


def copy_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of execution options that shares nothing mutable (link lists...)."""
    return {
        key: copy.deepcopy(value) if isinstance(value, (dict, list)) else value
        for key, value in options.items()
    }


def _check_fields(sig: dict[str, Any]) -> None:
    """A signature's fields must have Celery's shapes; a bad one is a clear TypeError
    (at the call site, or logged by the worker for an incoming message)."""
    name = sig.get("task")
    if not isinstance(name, str) or not name:
        raise TypeError(f"a signature needs a task name (a str), not {name!r}")
    args = sig.get("args")
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise TypeError(f"signature {name}: args must be a list or tuple, not {args!r}")
    if not isinstance(sig.get("kwargs"), Mapping):
        raise TypeError(f"signature {name}: kwargs must be a mapping, not {sig.get('kwargs')!r}")
    if not isinstance(sig.get("options"), Mapping):
        raise TypeError(f"signature {name}: options must be a mapping, not {sig.get('options')!r}")


class Signature(dict[str, Any], Generic[R]):
    """One task call with its arguments and execution options, as data.

    ``add.s(2, 2)`` is ``{"task": "tasks.add", "args": (2, 2), "kwargs": {},
    "options": {}, "subtask_type": None, "immutable": False}``. Calling
    ``apply_async``/``delay`` with more arguments puts them *in front of* the stored
    ones (a partial), unless the signature is immutable (``si``). ``R`` is the task's
    return type: ``add.s(1, 2).delay()`` is an ``_AsyncResult[int]``.
    """

    #: ``subtask_type`` -> class, for :meth:`from_dict`.
    TYPES: ClassVar[dict[str, type[Signature[Any]]]] = {}

    _app: Celeriac | None = None
    _type: Task[Any, Any] | None = None

    @classmethod
    def register_type(cls, name: str | None = None) -> Callable[[type[SigT]], type[SigT]]:
        def register(subclass: type[SigT]) -> type[SigT]:
            cls.TYPES[name or subclass.__name__] = subclass
            return subclass

        return register

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celeriac | None = None) -> Signature[Any]:
        """The signature a dict describes: its ``subtask_type`` picks the class
        (unknown or absent: a plain signature)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a signature must be a dict, not {type(d).__name__}")
        kind = d.get("subtask_type")
        if kind:
            target = cls.TYPES.get(kind) if isinstance(kind, str) else None
            if target is not None and target is not cls:
                return target.from_dict(d, app=app)
        return Signature(d, app=app)

    def __init__(
        self,
        task: Any = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        type: Any = None,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Celeriac | None = None,
        **ex: Any,
    ) -> None:
        self._app = app
        if isinstance(task, Mapping):
            super().__init__(task)
            self.setdefault("args", ())
            self.setdefault("kwargs", {})
            self.setdefault("options", {})
            self.setdefault("subtask_type", None)
            self.setdefault("immutable", False)
        else:
            name = task if isinstance(task, str) or task is None else getattr(task, "name", task)
            if task is not None and not isinstance(task, str):
                self._type = task
                if app is None:
                    self._app = getattr(task, "_app", None)
            if isinstance(args, (str, bytes)):
                raise TypeError(f"signature args must be a list or tuple, not {args!r}")
            super().__init__(
                task=name,
                args=tuple(args or ()),
                kwargs=dict(kwargs or {}),
                options=dict(options or {}, **ex),
                subtask_type=subtask_type,
                immutable=immutable,
            )
        _check_fields(self)

    # -- the dict's fields ----------------------------------------------------------

    task = _Field("task", str, str)
    name = task
    args = _Field("args", tuple, tuple)
    kwargs = _Field("kwargs", _as_dict, dict)
    options = _Field("options", _as_dict, dict)
    subtask_type = _Field("subtask_type", _as_name, _as_name)
    immutable = _Field("immutable", bool, bool)

    @property
    def id(self) -> str | None:
        """The task id, once frozen (``options["task_id"]``)."""
        return cast("str | None", self.options.get("task_id"))

    @id.setter
    def id(self, value: str | None) -> None:
        self.options["task_id"] = value

    @property
    def parent_id(self) -> str | None:
        return cast("str | None", self.options.get("parent_id"))

    @property
    def root_id(self) -> str | None:
        return cast("str | None", self.options.get("root_id"))

    @property
    def app(self) -> Celeriac:
        return self._app if self._app is not None else get_current_app()

    @property
    def type(self) -> Task[Any, R]:
        """The registered task (``NotRegistered`` when this process does not know it)."""
        if self._type is not None:
            return cast("Task[Any, R]", self._type)
        return cast("Task[Any, R]", self.app.tasks[self.task])

    def AsyncResult(self, task_id: str) -> _AsyncResult[R]:
        return _AsyncResult(task_id, app=self.app, task_name=self.task)

    # -- calling --------------------------------------------------------------------

    def __call__(self, *partial_args: Any, **partial_kwargs: Any) -> R:
        """Run the task body here, now (not a message)."""
        args, kwargs, _ = self._merge(partial_args, partial_kwargs, None)
        return self.type(*args, **kwargs)

    def delay(self, *partial_args: Any, **partial_kwargs: Any) -> _AsyncResult[R]:
        return self.apply_async(partial_args, partial_kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        route_name: str | None = None,
        **options: Any,
    ) -> _AsyncResult[R]:
        """Send it: ``args`` go in front of the stored ones, ``kwargs`` and
        ``options`` are merged over them (an immutable signature keeps its own)."""
        options = {key: value for key, value in options.items() if value is not None}
        if args or kwargs or options:
            args, kwargs, options = self._merge(args, kwargs, options)
        else:
            args, kwargs, options = self.args, self.kwargs, self.options
        try:
            task = self.type
        except NotRegistered:  # sent by name: another process knows the task
            return self.app.send_task(self.task, args, kwargs, **options)
        return task.apply_async(args, kwargs, **options)

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> EagerResult[R]:
        """Run it here, as a worker would (``Task.apply``)."""
        options = {key: value for key, value in options.items() if value is not None}
        args, kwargs, options = self._merge(args, kwargs, options)
        return self.type.apply(args, kwargs, **options)

    def _merge(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        """``(args, kwargs, options)`` of a call with these partial arguments."""
        if options is not None:
            own = self.options
            merged = {
                **own,
                **{k: v for k, v in options.items() if k not in _IMMUTABLE_OPTIONS or k not in own},
            }
        else:
            merged = self.options
        if self.immutable and not force:
            return self.args, self.kwargs, merged
        return (
            tuple(args) + self.args if args else self.args,
            {**self.kwargs, **kwargs} if kwargs else self.kwargs,
            merged,
        )

    # -- copies and options ---------------------------------------------------------

    def clone(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **opts: Any,
    ) -> Signature[R]:
        """A copy, with ``args``/``kwargs``/``opts`` merged in as a call would."""
        if args or kwargs or opts:
            new_args, new_kwargs, new_opts = self._merge(args, kwargs, opts)
        else:
            new_args, new_kwargs, new_opts = self.args, self.kwargs, self.options
        fields = {
            "task": self.task,
            "args": tuple(new_args),
            "kwargs": dict(new_kwargs),
            "options": copy_options(new_opts),
            "subtask_type": self.subtask_type,
            "immutable": self.immutable,
        }
        if fields["subtask_type"] is None:
            sig: Signature[Any] = Signature.__new__(Signature)
            dict.__init__(sig, fields)  # already checked: no need to read it again
            sig._app = self._app
        else:
            sig = Signature.from_dict(fields, app=self._app)
        sig._type = self._type
        return cast("Signature[R]", sig)

    partial = clone

    def replace(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Signature[R]:
        """A copy with args, kwargs or options replaced (those not None)."""
        sig = self.clone()
        if args is not None:
            sig.args = args
        if kwargs is not None:
            sig.kwargs = kwargs
        if options is not None:
            sig.options = options
        return sig

    def set(self, immutable: bool | None = None, **options: Any) -> Signature[R]:
        """Update the execution options in place; returns this signature."""
        if immutable is not None:
            self.set_immutable(immutable)
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self.immutable = immutable

    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Any = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> _AsyncResult[R]:
        """Give it its task id (kept if it has one) and these routing fields now;
        returns the result it will have."""
        opts = self.options
        tid = opts.get("task_id")
        if not tid:
            tid = opts["task_id"] = _id or str(uuid.uuid4())
        if root_id:
            opts["root_id"] = root_id
        if parent_id:
            opts["parent_id"] = parent_id
        if "reply_to" not in opts:
            # The rpc:// backend answers to this process's reply queue.
            opts["reply_to"] = self.app.process_oid
        if group_id and "group_id" not in opts:
            opts["group_id"] = group_id
        if chord:
            opts["chord"] = chord
        if group_index is not None:
            opts["group_index"] = group_index
        return self.AsyncResult(tid)

    def append_to_list_option(self, key: str, value: T) -> T:
        items = self.options.get(key)
        if not isinstance(items, list):
            items = self.options[key] = as_list(items)
        if value not in items:
            items.append(value)
        return value

    def extend_list_option(self, key: str, value: Any) -> None:
        items = self.options.get(key)
        if not isinstance(items, list):
            items = self.options[key] = as_list(items)
        items.extend(as_list(value))

    def link(self, callback: SigT) -> SigT:
        """Send ``callback`` with this task's return value when it succeeds; returns
        the callback."""
        return self.append_to_list_option("link", callback)

    def link_error(self, errback: SigT) -> SigT:
        """Call ``errback`` when this task fails; returns the errback."""
        return self.append_to_list_option("link_error", errback)

    def on_error(self, errback: Signature[Any]) -> Signature[R]:
        """``link_error`` that returns this signature (for chaining calls)."""
        self.link_error(errback)
        return self

    def flatten_links(self) -> list[Signature[Any]]:
        """This signature and every callback below it, depth first."""
        found: list[Signature[Any]] = []
        pending: list[Signature[Any]] = [self]
        while pending:
            sig = pending.pop()
            found.append(sig)
            links = [
                maybe_signature(link, app=self._app) for link in as_list(sig.options.get("link"))
            ]
            pending.extend(reversed([link for link in links if link is not None]))
        return found

    # -- composition ----------------------------------------------------------------

    def __or__(self, other: Signature[T]) -> _chain[T]:  # type: ignore[override]
        if isinstance(other, _chain):
            return _chain(self, *other.unchain_tasks(), app=self._app)
        if isinstance(other, group):
            return _chain(self, maybe_unroll_group(other), app=self._app)
        if isinstance(other, Signature):
            return _chain(self, other, app=self._app)
        return NotImplemented

    def __ror__(self, other: Signature[Any]) -> _chain[R]:  # type: ignore[override]
        if isinstance(other, Signature):
            return cast("_chain[R]", other.__or__(self))
        return NotImplemented

    def __ior__(self, other: Signature[T]) -> _chain[T]:  # type: ignore[override]
        return self.__or__(other)

    def __invert__(self) -> R:
        return self.apply_async().get()

    # -- identity -------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> Signature[R]:
        sig = Signature.from_dict(
            {key: copy.deepcopy(value, memo) for key, value in dict(self).items()}, app=self._app
        )
        sig._type = self._type
        return cast("Signature[R]", sig)

    def __reduce__(self) -> tuple[Any, ...]:
        return signature, (dict(self),)

    def __json__(self) -> dict[str, Any]:
        return dict(self)

    def reprcall(self, *args: Any, **kwargs: Any) -> str:
        args, kwargs, _ = self._merge(args, kwargs, {}, force=True)
        parts = [repr(arg) for arg in args] + [f"{key}={value!r}" for key, value in kwargs.items()]
        return f"{self.task}({', '.join(parts)})"

    def __repr__(self) -> str:
        return self.reprcall()


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature[Any]:
    """A signature: from a task (or its name) and arguments, or a copy of a
    signature dict (``signature(add.s(2))``, ``signature({"task": ...})``)."""
    app = kwargs.get("app")
    if isinstance(varies, Mapping):
        if isinstance(varies, Signature):
            return varies.clone()
        return Signature.from_dict(varies, app=app)
    return Signature(varies, *args, **kwargs)


subtask = signature


def maybe_signature(
    d: Any, app: Celeriac | None = None, clone: bool = False
) -> Signature[Any] | None:
    """``d`` as a signature: None stays None, a signature is kept (or cloned),
    a dict is read with :meth:`Signature.from_dict`."""
    if d is None:
        return None
    if isinstance(d, Signature):
        if clone:
            d = d.clone()
    elif isinstance(d, Mapping):
        d = Signature.from_dict(d, app=app)
    else:
        raise TypeError(f"a signature must be a dict, not {type(d).__name__}")
    sig = cast("Signature[Any]", d)
    if app is not None and sig._app is None:
        sig._app = app
    return sig


def as_signature(d: Any, app: Celeriac | None) -> Signature[Any]:
    sig = maybe_signature(d, app=app)
    if sig is None:
        raise TypeError("a signature must be a dict, not None")
    return sig


# -- chain --------------------------------------------------------------------------


class _Composite(Signature[R]):
    """A signature made of others (``kwargs.tasks``): a chain or a group."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celeriac | None = None) -> Signature[Any]:
        kwargs = d.get("kwargs")
        tasks = kwargs.get("tasks") if isinstance(kwargs, Mapping) else None
        if not isinstance(tasks, (list, tuple)):
            raise TypeError(
                f"a {cls.__name__} signature needs a list in kwargs.tasks, not {tasks!r}"
            )
        options = d.get("options") or {}
        if not isinstance(options, Mapping):
            raise TypeError(f"{cls.__name__} options must be a mapping, not {options!r}")
        return cls([as_signature(task, app) for task in tasks], app=app, **options)

    @property
    def tasks(self) -> list[Signature[Any]]:
        return cast("list[Signature[Any]]", self.kwargs["tasks"])

    @tasks.setter
    def tasks(self, value: Iterable[Any]) -> None:
        self.kwargs["tasks"] = list(value)

    @property
    def app(self) -> Celeriac:
        if self._app is not None:
            return self._app
        for task in self.tasks[:1]:
            if task._app is not None:
                return task._app
        return get_current_app()

    def clone(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **opts: Any,
    ) -> Signature[R]:
        sig = cast("_Composite[R]", super().clone(args, kwargs, **opts))
        sig.tasks = [task.clone() for task in self.tasks]
        return sig


@Signature.register_type(name="chain")
class _chain(_Composite[R]):
    """Tasks run one after another, each getting the previous one's return value."""

    def __init__(self, *tasks: Any, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Mapping) and isinstance(tasks[0], Iterable):
            tasks = tuple(tasks[0])
        app = options.pop("app", None)
        steps = [as_signature(task, app) for task in tasks]
        super().__init__("celery.chain", (), {"tasks": steps}, app=app, **options)
        self.subtask_type = "chain"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.tasks:
            return self.apply_async(args, kwargs)
        return None

    def __or__(self, other: Signature[T]) -> _chain[T]:  # type: ignore[override]
        if isinstance(other, group):
            unrolled = maybe_unroll_group(other)
            if not isinstance(unrolled, group):
                return self.__or__(unrolled)
            return cast("_chain[T]", type(self)(*self.unchain_tasks(), unrolled, app=self._app))
        if isinstance(other, _chain):
            return cast("_chain[T]", functools.reduce(operator.or_, other.unchain_tasks(), self))
        if isinstance(other, Signature):
            tasks = self.unchain_tasks()
            if tasks and isinstance(tasks[-1], group):  # group | task: a chord
                tasks[-1] = _chord(tasks[-1], body=other, app=self._app)
                return cast("_chain[T]", type(self)(*tasks, app=self._app))
            return cast("_chain[T]", type(self)(*self.unchain_tasks(), other, app=self._app))
        return NotImplemented

    def unchain_tasks(self) -> list[Signature[Any]]:
        """Copies of the steps; the chain's ``link`` goes on the last one and its
        ``link_error`` on every one."""
        tasks = [task.clone() for task in self.tasks]
        for callback in as_list(self.options.get("link")):
            tasks[-1].link(callback)
        for errback in as_list(self.options.get("link_error")):
            for task in tasks:
                task.link_error(errback)
        return tasks

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        route_name: str | None = None,
        **options: Any,
    ) -> _AsyncResult[R]:
        """Send the first step with the rest in ``embed.chain``; returns the LAST
        step's result (its ``parent`` is the step before, and so on)."""
        app = self.app
        if app.conf["task_always_eager"]:
            return self.apply(args, kwargs, **options)
        return self.run(args, kwargs, app=app, **{**self.options, **options})

    def run(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        group_id: str | None = None,
        chord: Any = None,
        task_id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        publisher: Any = None,
        producer: Any = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        app: Celeriac | None = None,
        group_index: int | None = None,
        **options: Any,
    ) -> _AsyncResult[R]:
        app = app or self.app
        args = tuple(args) + self.args if args and not self.immutable else self.args
        tasks, results = self.prepare_steps(
            args, kwargs or {}, self.tasks, root_id, link_error, app, task_id, group_id,
            chord, group_index,
        )  # fmt: skip
        if not results:
            raise ValueError("an empty chain has nothing to send")
        if link:
            tasks[0].extend_list_option("link", link)
        first = tasks.pop()
        # The rest travels in the first message, next step last (as Celery sends it).
        options["chain"] = [*(options.get("chain") or []), *tasks] if "chain" in options else tasks
        sent = first.apply_async(**options)
        return sent if not tasks else cast("_AsyncResult[R]", results[0])

    def prepare_steps(
        self,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        tasks: Sequence[Any],
        root_id: str | None = None,
        link_error: Any = None,
        app: Celeriac | None = None,
        last_task_id: str | None = None,
        group_id: str | None = None,
        chord_body: Any = None,
        group_index: int | None = None,
        clone: bool = True,
    ) -> tuple[list[Signature[Any]], list[_AsyncResult[Any]]]:
        """Freeze every step (last first): nested chains are spliced in, the first
        step gets the partial arguments, each result's ``parent`` is the step before.
        Returns the steps and their results, both LAST step first."""
        app = app or self.app
        steps: deque[Any] = deque(tasks)
        prepared: list[Signature[Any]] = []
        results: list[_AsyncResult[Any]] = []
        prev_res: _AsyncResult[Any] | None = None
        while steps:
            task = as_signature(steps.pop(), app)
            # The first step is the one left when the queue is empty; a nested chain
            # in front is spliced in first so its own first step gets the arguments.
            if not steps and isinstance(task, _chain):
                steps.extend(task.tasks)
                continue
            is_first, is_last = not steps, not prepared
            if isinstance(task, group):
                task = maybe_unroll_group(task)
            if clone:
                task = task.clone(args, kwargs) if is_first else task.clone()
            elif is_first:
                task.args = tuple(args) + task.args
            if isinstance(task, _chain):
                steps.extend(task.tasks)
                continue
            if isinstance(task, group) and prepared:
                # group | task is a chord (Celery's upgrade): the next step is its body,
                # the steps after that follow the body (the worker puts them in the
                # body's chain when it runs the chord).
                body = prepared.pop()
                results.pop()
                task = _chord(task, body=body, app=app)
                is_last = not prepared
            if is_last:
                res = task.freeze(
                    last_task_id, root_id=root_id, group_id=group_id, chord=chord_body,
                    group_index=group_index,
                )  # fmt: skip
            else:
                res = task.freeze(root_id=root_id)
            if prev_res is not None and prev_res.parent is None:
                prev_res.parent = res
            for errback in as_list(link_error):
                task.link_error(errback)
            prepared.append(task)
            results.append(res)
            prev_res = res
            while prev_res.parent is not None:  # a chord: the step before is its header's parent
                prev_res = prev_res.parent
        if results:
            self.options["task_id"] = results[0].id
        return prepared, results

    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Any = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> _AsyncResult[R]:
        _, results = self.prepare_steps(
            self.args, self.kwargs, self.tasks, root_id, None, self.app, _id, group_id, chord,
            group_index, clone=False,
        )  # fmt: skip
        return cast("_AsyncResult[R]", results[0])

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> EagerResult[R]:
        """Run every step here, in order, each with the previous return value."""
        task_options = {**self.options, **options}
        link = task_options.pop("link", None)
        last_id = task_options.pop("task_id", None)
        steps = _flatten_chain(self.tasks, self._app)
        last: EagerResult[Any] | None = None
        first_args: tuple[Any, ...] = tuple(args or ())
        first_kwargs: dict[str, Any] = dict(kwargs or {})
        for index, step in enumerate(steps):
            step = step.clone()
            is_last = index == len(steps) - 1
            if link and is_last:
                step.extend_list_option("link", link)
            step_options = dict(task_options)
            if is_last and last_id:
                step_options["task_id"] = last_id
            if last is None:
                res = step.apply(first_args, first_kwargs, **step_options)
            else:
                res = step.apply((last.get(disable_sync_subtasks=False),), **step_options)
            res.parent = last
            last = res
            if res.state in (states.IGNORED, states.REJECTED):
                break
        if last is None:
            raise ValueError("an empty chain has nothing to run")
        return cast("EagerResult[R]", last)

    def __repr__(self) -> str:
        if not self.tasks:
            return f"<{type(self).__name__}: empty>"
        return " | ".join(repr(task) for task in self.tasks)


def _flatten_chain(tasks: Iterable[Any], app: Celeriac | None) -> list[Signature[Any]]:
    """The steps of a chain with nested chains spliced in (no recursion)."""
    flat: list[Signature[Any]] = []
    pending: deque[Any] = deque(tasks)
    while pending:
        task = as_signature(pending.popleft(), app)
        if isinstance(task, _chain):
            pending.extendleft(reversed(task.tasks))
        else:
            flat.append(task)
    return flat


class chain(_chain[Any]):
    """``chain(add.s(2, 2), add.s(4), add.s(8))`` (the same as ``a | b | c``):
    ``((2 + 2) + 4) + 8``. Called or sent, it returns the last step's result.
    One argument that is an iterable of signatures is the list of steps."""

    def __new__(cls, *tasks: Any, **kwargs: Any) -> chain:
        if not kwargs and tasks and (len(tasks) != 1 or isinstance(tasks[0], (list, tuple))):
            steps = tasks[0] if len(tasks) == 1 else tasks
            if all(type(step) is Signature for step in steps):
                # What reducing with '|' gives, without copying the chain at each step.
                return chain(*(step.clone() for step in steps), app=None)
            reduced: chain = functools.reduce(operator.or_, steps, chain())
            return reduced
        return super().__new__(cls)

    def __init__(self, *tasks: Any, **options: Any) -> None:
        if getattr(self, "_initialised", False):
            return  # __new__ built it by reducing '|'
        self._initialised = True
        super().__init__(*tasks, **options)


# -- group --------------------------------------------------------------------------


@Signature.register_type()
class group(_Composite[list[Any]]):
    """Tasks sent together, run in parallel; the result is a :class:`GroupResult`.
    Every member carries the group's id (``group`` header) and its index in it."""

    def __init__(self, *tasks: Any, **options: Any) -> None:
        members: Iterable[Any] = tasks
        if len(tasks) == 1:
            only = tasks[0]
            if isinstance(only, group):
                members = only.tasks
            elif isinstance(only, Mapping):
                members = [as_signature(only, options.get("app")).clone()]
            elif isinstance(only, Iterable):
                members = only
        app = options.pop("app", None)
        super().__init__(
            "celery.group",
            (),
            {"tasks": [as_signature(t, app) for t in members]},
            app=app,
            **options,
        )
        self.subtask_type = "group"

    def __call__(self, *partial_args: Any, **options: Any) -> Any:
        return self.apply_async(partial_args, **options)

    def __or__(self, other: Signature[T]) -> _chain[T]:  # type: ignore[override]
        if isinstance(other, group) and not other.tasks:
            return cast("_chain[T]", self)
        return cast("_chain[T]", _chord(self, body=other, app=self._app))

    def link(self, callback: SigT) -> SigT:
        """Celery's rule: the callback goes (immutable) on the FIRST member only -- it
        does not wait for the others; use a chord for that."""
        return self.tasks[0].link(cast("SigT", callback.clone().set(immutable=True)))

    def link_error(self, errback: SigT) -> SigT:
        for task in self.tasks:
            task.link_error(errback.clone())
        return errback

    def set_immutable(self, immutable: bool) -> None:
        for task in self.tasks:
            task.set_immutable(immutable)

    def _freeze_gid(self, options: Mapping[str, Any]) -> tuple[dict[str, Any], str, str | None]:
        own = self.options
        merged = {
            **own,
            **{k: v for k, v in options.items() if k not in _IMMUTABLE_OPTIONS or k not in own},
        }
        group_id = merged.pop("task_id", None) or str(uuid.uuid4())
        merged["group_id"] = group_id
        return merged, group_id, merged.get("root_id")

    def _prepared(
        self, group_id: str, root_id: str | None, app: Celeriac, freeze: bool = True
    ) -> Iterator[tuple[Signature[Any], _AsyncResult[Any] | None]]:
        """The members with nested groups flattened, each frozen with the group id
        and its index."""
        pending: deque[tuple[int, Any]] = deque(enumerate(self.tasks))
        while pending:
            index, task = pending.popleft()
            sig = as_signature(task, app).clone()
            if isinstance(sig, group):
                pending.extendleft(reversed(list(enumerate(sig.tasks))))
                continue
            if isinstance(sig, _chain) and not sig.tasks:
                continue
            result = (
                sig.freeze(group_id=group_id, root_id=root_id, group_index=index)
                if freeze
                else None
            )
            yield sig, result

    def apply_async(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        add_to_parent: bool = True,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        **options: Any,
    ) -> GroupResult:
        if link is not None:
            raise TypeError("Cannot add link to group: use a chord")
        if link_error is not None:
            raise TypeError("Cannot add link to group: do that on individual tasks")
        app = self.app
        if app.conf["task_always_eager"]:
            return self.apply(args, kwargs, **options)
        merged, group_id, root_id = self._freeze_gid(options)
        results: list[_AsyncResult[Any]] = []
        members = list(self._prepared(group_id, root_id, app))
        if merged.get("chord") is not None:
            # A chord's header: its size is written before any part can end (Celery
            # writes it before the last one), so a backend that cannot join chords
            # fails here, before anything is sent.
            expires = app.conf.get("result_chord_expires") or app.conf["result_expires"]
            app.taskset_backend.chord_set_size(group_id, len(members), seconds_of(expires))
        for sig, result in members:
            sig.apply_async(args, kwargs, add_to_parent=False, **merged)
            results.append(cast("_AsyncResult[Any]", result))
        outcome = GroupResult(group_id, results, app=app)
        parent = get_current_worker_task()
        if add_to_parent and parent is not None:
            parent.add_trail(cast("Any", outcome))
        return outcome

    def apply(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> GroupResult:
        """Run every member here, in order."""
        app = self.app
        merged, group_id, root_id = self._freeze_gid(options)
        merged.pop("reply_to", None)
        results: list[_AsyncResult[Any]] = []
        for sig, _ in self._prepared(group_id, root_id, app, freeze=False):
            results.append(sig.apply(args, kwargs, **merged))
        return GroupResult(group_id, results, app=app)

    def freeze(  # type: ignore[override]
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Any = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> GroupResult:
        opts = self.options
        gid = opts.get("task_id") or _id or str(uuid.uuid4())
        opts["task_id"] = gid
        results: list[_AsyncResult[Any]] = []
        frozen: list[Signature[Any]] = []
        for sig, result in self._prepared(gid, root_id, self.app):
            frozen.append(sig)
            results.append(cast("_AsyncResult[Any]", result))
        self.tasks = frozen
        return GroupResult(gid, results, app=self.app)

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(task) for task in self.tasks)}])"


def maybe_unroll_group(sig: Signature[Any]) -> Signature[Any]:
    """A group of one task is that task."""
    if isinstance(sig, group) and len(sig.tasks) == 1:
        return sig.tasks[0].clone()
    return sig


def _chord(header: Signature[Any], body: Signature[Any], app: Any) -> Signature[Any]:
    """A chord, made through the type registry: ``celeriac.canvas_chord`` registers it
    (this module is below that one and does not import it)."""
    return Signature.TYPES["chord"](header, body=body, app=app)
