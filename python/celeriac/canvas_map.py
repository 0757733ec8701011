"""``xmap``, ``xstarmap`` and ``chunks``: one task applied to many items, on Celery's wire.

``tsum.map([[1, 2], [3, 4]])`` is ONE message of the built-in task ``celery.map``
(kwargs ``{"task": <tsum signature>, "it": [[1, 2], [3, 4]]}``); the worker calls the
task's function for each item in its own process and returns the list. ``starmap``
(``celery.starmap``) calls it with ``*item``. ``add.chunks(it, n)`` sends a *group* of
``celery.starmap`` messages of ``n`` items each.

:func:`register_builtins` registers the built-in tasks Celery's registry has
(``celery.map``, ``celery.starmap``, ``celery.chunks``, ``celery.accumulate``) on an app,
so a celeriac worker runs what a Celery client sends.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from celeriac.canvas_signatures import Signature, group, signature
from celeriac.exceptions import NotRegistered
from celeriac.result import AsyncResult as _AsyncResult
from celeriac.result import GroupResult

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.task import Task

__all__ = ["chunks", "register_builtins", "xmap", "xstarmap"]


def _map_fields(kwargs: Any, *names: str) -> tuple[Any, ...]:
    """The named fields of a map/chunks signature's kwargs; a missing one is a
    TypeError naming it."""
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"a map/chunks signature needs kwargs as a mapping, not {kwargs!r}")
    missing = [name for name in names if name not in kwargs]
    if missing:
        raise TypeError(f"a map/chunks signature needs kwargs.{missing[0]}: {dict(kwargs)!r}"[:300])
    return tuple(kwargs[name] for name in names)


def _items(it: Any, what: str) -> list[Any]:
    """``it`` as a list; a str, a mapping or a non-iterable is a TypeError."""
    if isinstance(it, (str, bytes, Mapping)) or not isinstance(it, Iterable):
        raise TypeError(f"{what}: 'it' must be a list of items, not {it!r}"[:300])
    return list(it)


class _basemap(Signature[list[Any]]):
    """A task applied to every item of ``it`` in one message (immutable)."""

    _task_name: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celeriac | None = None) -> Signature[Any]:
        task, it = _map_fields(d.get("kwargs"), "task", "it")
        options = d.get("options") or {}
        if not isinstance(options, Mapping):
            raise TypeError(f"{cls._task_name} options must be a mapping, not {options!r}")
        return cls(task, it, app=app, **options)

    def __init__(self, task: Any, it: Iterable[Any], app: Celeriac | None = None, **options: Any):
        if not isinstance(task, Mapping):
            raise TypeError(f"{self._task_name}: 'task' must be a signature, not {task!r}"[:300])
        super().__init__(
            self._task_name,
            (),
            {"task": task, "it": _items(it, self._task_name)},
            immutable=True,
            app=app,
            **options,
        )
        self.subtask_type = type(self).__name__

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        route_name: str | None = None,
        **options: Any,
    ) -> _AsyncResult[list[Any]]:
        # Immutable: extra args are dropped, as Celery drops them.
        options = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        try:
            task = self.type
        except NotRegistered:  # an app made before the built-ins: sent by name
            return self.app.send_task(self._task_name, (), dict(self.kwargs), **options)
        return task.apply_async((), dict(self.kwargs), **options)

    def __repr__(self) -> str:
        task, it = self.kwargs["task"], self.kwargs["it"]
        return f"[{task.get('task')}(x) for x in {it!r}]"


@Signature.register_type()
class xmap(_basemap):
    """``task(item)`` for each item, in one ``celery.map`` message."""

    _task_name = "celery.map"


@Signature.register_type()
class xstarmap(_basemap):
    """``task(*item)`` for each item, in one ``celery.starmap`` message."""

    _task_name = "celery.starmap"


def _parts(items: list[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while part := list(itertools.islice(it, n)):
        yield part


@Signature.register_type()
class chunks(Signature[list[list[Any]]]):
    """``it`` cut into parts of ``n`` items, each part one ``celery.starmap`` message,
    sent together as a group: the result is a :class:`GroupResult` of lists."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celeriac | None = None) -> Signature[Any]:
        task, it, n = _map_fields(d.get("kwargs"), "task", "it", "n")
        options = d.get("options") or {}
        if not isinstance(options, Mapping):
            raise TypeError(f"celery.chunks options must be a mapping, not {options!r}")
        return cls(task, it, n, app=app, **options)

    def __init__(
        self, task: Any, it: Iterable[Any], n: int, app: Celeriac | None = None, **options: Any
    ) -> None:
        if not isinstance(task, Mapping):
            raise TypeError(f"celery.chunks: 'task' must be a signature, not {task!r}"[:300])
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TypeError(f"celery.chunks: 'n' must be a positive int, not {n!r}")
        super().__init__(
            "celery.chunks",
            (),
            {"task": task, "it": _items(it, "celery.chunks"), "n": n},
            immutable=True,
            app=app,
            **options,
        )
        self.subtask_type = "chunks"

    def __call__(self, *args: Any, **options: Any) -> GroupResult:  # type: ignore[override]
        return self.apply_async(**options)

    def group(self) -> group:
        """The ``celery.starmap`` signatures of the parts, as a group."""
        task, it, n = self.kwargs["task"], self.kwargs["it"], self.kwargs["n"]
        return group(
            [xstarmap(task, part, app=self._app) for part in _parts(list(it), n)], app=self._app
        )

    def apply_async(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        route_name: str | None = None,
        **options: Any,
    ) -> GroupResult:
        return self.group().apply_async(**{**self.options, **options})

    def apply(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> GroupResult:
        return self.group().apply(**options)


# -- Task.map / starmap / chunks ------------------------------------------------------


def task_map(task: Task[Any, Any], it: Iterable[Any]) -> xmap:
    return xmap(task.s(), it, app=task._app)


def task_starmap(task: Task[Any, Any], it: Iterable[Any]) -> xstarmap:
    return xstarmap(task.s(), it, app=task._app)


def task_chunks(task: Task[Any, Any], it: Iterable[Any], n: int) -> chunks:
    return chunks(task.s(), it, n, app=task._app)


# -- the built-in tasks ---------------------------------------------------------------


def _local_task(app: Celeriac, name: str, sig: Any) -> Task[Any, Any]:
    if not isinstance(sig, Mapping):
        raise TypeError(f"{name}: 'task' must be a signature dict, not {sig!r}"[:300])
    return signature(sig, app=app).type


def register_builtins(app: Celeriac) -> None:
    """Register Celery's built-in canvas tasks on ``app`` (a worker runs what a Celery
    client sends: ``celery.map``, ``celery.starmap``, ``celery.chunks``,
    ``celery.accumulate``)."""

    @app.task(name="celery.map")
    def run_map(task: Any, it: Any) -> list[Any]:
        function = _local_task(app, "celery.map", task)
        return [function(item) for item in _items(it, "celery.map")]

    @app.task(name="celery.starmap")
    def run_starmap(task: Any, it: Any) -> list[Any]:
        function = _local_task(app, "celery.starmap", task)
        results = []
        for item in _items(it, "celery.starmap"):
            if isinstance(item, (str, bytes, Mapping)) or not isinstance(item, Iterable):
                raise TypeError(f"celery.starmap: each item must be a list of args, not {item!r}")
            results.append(function(*item))
        return results

    @app.task(name="celery.chunks")
    def run_chunks(task: Any, it: Any, n: Any) -> Any:
        # Celery's built-in sends the group and returns nothing a client reads.
        chunks(task, it, n, app=app).apply_async()

    @app.task(name="celery.accumulate", bind=True)
    def accumulate(self: Any, *args: Any, **kwargs: Any) -> Any:
        index = kwargs.get("index")
        return args[index] if index is not None else args

    del run_map, run_starmap, run_chunks, accumulate
