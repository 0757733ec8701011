"""The task registry of an app, the naming of tasks, and making a task of a function:
``@app.task`` and ``@shared_task`` (whose tasks every app gets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from celeriac.exceptions import NotRegistered
from celeriac.local import current_app_or_none
from celeriac.task import Task as _Task
from celeriac.task import bind_run
from celeriac.task_options import add_autoretry

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["SHARED_TASKS", "TaskRegistry", "create_task", "gen_task_name", "shared_task"]

P = ParamSpec("P")
R = TypeVar("R")


class TaskRegistry(dict[str, _Task[Any, Any]]):
    """Task name -> task. A missing name raises
    :class:`~celeriac.exceptions.NotRegistered` (a ``KeyError``)."""

    def __missing__(self, name: str) -> _Task[Any, Any]:
        raise NotRegistered(name)

    def register(self, task: _Task[Any, Any]) -> None:
        self[str(task.name)] = task

    def unregister(self, name: str | _Task[Any, Any]) -> None:
        key = name if isinstance(name, str) else str(name.name)
        try:
            del self[key]
        except KeyError:
            raise NotRegistered(key) from None


# (function, options) of every @shared_task; each app makes its own task from them.
SHARED_TASKS: list[tuple[Callable[..., Any], dict[str, Any]]] = []


def gen_task_name(app: Celeriac | None, name: str, module: str) -> str:
    """``module.name``; ``__main__`` is replaced by the app's ``main`` when set."""
    if module == "__main__" and app is not None and app.main:
        module = app.main
    return f"{module}.{name}"


def create_task(
    app: Celeriac | None,
    fun: Callable[..., Any],
    base: type[_Task[Any, Any]] | None,
    bind: bool,
    options: dict[str, Any],
) -> _Task[Any, Any]:
    if not callable(fun):
        raise TypeError(f"@task needs a function, got {fun!r}")
    name = options.pop("name", None) or gen_task_name(
        app, getattr(fun, "__name__", "task"), getattr(fun, "__module__", "__main__")
    )
    for ignored in ("shared", "lazy", "filter"):
        options.pop(ignored, None)
    if base is None:
        base = app.Task if app is not None else _Task
    task = base()
    if app is not None:
        object.__setattr__(task, "_app", app)
    task.name = name
    bind_run(task, fun, bind)
    for key, value in options.items():
        setattr(task, key, value)
    task._check_attributes()
    add_autoretry(task)
    return task


@overload
def shared_task(fun: Callable[P, R], /, **options: Any) -> _Task[P, R]: ...
@overload
def shared_task(
    *, bind: Literal[True], **options: Any
) -> Callable[[Callable[Concatenate[Any, P], R]], _Task[P, R]]: ...
@overload
def shared_task(
    *, bind: Literal[False] = False, **options: Any
) -> Callable[[Callable[P, R]], _Task[P, R]]: ...
def shared_task(fun: Any = None, /, **options: Any) -> Any:
    """Like ``@app.task``, for reusable modules: every app gets the task, and the
    returned object sends through the current app."""

    def decorate(fun: Callable[..., Any]) -> _Task[Any, Any]:
        opts = dict(options)
        base = opts.pop("base", None)
        bind = bool(opts.pop("bind", False))
        opts["name"] = opts.get("name") or gen_task_name(
            current_app_or_none(), getattr(fun, "__name__", "task"), getattr(fun, "__module__", "")
        )
        current = current_app_or_none()
        # The current app's task class (Django's has delay_on_commit), not bound to it.
        unbound_base = base or (current._task_cls if current is not None else None)
        task = create_task(None, fun, unbound_base, bind, dict(opts))
        SHARED_TASKS.append((fun, dict(opts, name=task.name, base=base, bind=bind)))
        return task

    if fun is not None:
        return decorate(fun)
    return decorate
