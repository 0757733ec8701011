"""Process and thread state: the current app, the running task, and lazy proxies.

``current_app`` is the last app created with ``set_as_current=True`` (process-wide, so
a thread started later sees it too); with none, a default app is made on first use.
The task stack is per thread: the worker pushes a task's request while it runs, so
code inside the task can find it (``current_task``) and messages it sends get its id
as ``parent_id``.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.task import Task

__all__ = [
    "Proxy",
    "current_app_or_none",
    "get_current_app",
    "get_current_task",
    "get_current_worker_task",
    "pop_task",
    "push_task",
    "set_async_task",
    "set_current_app",
    "set_default_app",
    "set_default_app_maker",
]

T = TypeVar("T")


class Proxy(Generic[T]):
    """Forwards everything to the object ``factory()`` returns at the time of use."""

    __slots__ = ("__factory",)
    __factory: Callable[[], T]

    def __init__(self, factory: Callable[[], T]) -> None:
        object.__setattr__(self, "_Proxy__factory", factory)

    def _get_current_object(self) -> T:
        return self.__factory()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get_current_object(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._get_current_object(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._get_current_object(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target: Any = self._get_current_object()
        return target(*args, **kwargs)

    def __getitem__(self, key: Any) -> Any:
        target: Any = self._get_current_object()
        return target[key]

    def __iter__(self) -> Iterator[Any]:
        target: Any = self._get_current_object()
        return iter(target)

    def __contains__(self, item: Any) -> bool:
        target: Any = self._get_current_object()
        return item in target

    def __bool__(self) -> bool:
        return bool(self._get_current_object())

    def __eq__(self, other: object) -> bool:
        return bool(self._get_current_object() == other)

    def __hash__(self) -> int:
        return hash(self._get_current_object())

    def __dir__(self) -> list[str]:
        return dir(self._get_current_object())

    def __repr__(self) -> str:
        return repr(self._get_current_object())

    def __str__(self) -> str:
        return str(self._get_current_object())

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._get_current_object())


# -- current app ----------------------------------------------------------------------

_current_app: Celeriac | None = None
_default_app: Celeriac | None = None
#: Makes the default app; ``celeriac.app`` sets it (this module does not import the app).
_default_app_maker: Callable[[], Celeriac] | None = None
_app_lock = threading.Lock()


def set_default_app_maker(maker: Callable[[], Celeriac]) -> None:
    """How :func:`get_current_app` makes the default app when no app was created."""
    global _default_app_maker
    _default_app_maker = maker


def set_current_app(app: Celeriac) -> None:
    global _current_app
    _current_app = app


def set_default_app(app: Celeriac) -> None:
    """The app used when none is current (Celery's ``app.set_default()``)."""
    global _default_app
    with _app_lock:
        _default_app = app


def current_app_or_none() -> Celeriac | None:
    """The current app, or None when no app was made current (none is made here)."""
    return _current_app


def get_current_app() -> Celeriac:
    """The current app; a default one (``main="default"``) when none was created."""
    global _default_app
    app = _current_app
    if app is not None:
        return app
    with _app_lock:
        if _default_app is None:
            if _default_app_maker is None:
                raise RuntimeError("no celeriac app: import celeriac (or celeriac.app) first")
            _default_app = _default_app_maker()
        return _default_app


# -- running tasks (per thread) -------------------------------------------------------


class _TaskStack(threading.local):
    tasks: list[Task[Any, Any]]

    def __init__(self) -> None:
        self.tasks: list[Task[Any, Any]] = []


_stack = _TaskStack()

#: The task a coroutine (an ``async def`` task on the worker's event loop) runs: many
#: share one thread, so each asyncio task carries its own in its context.
_async_task: contextvars.ContextVar[Task[Any, Any] | None] = contextvars.ContextVar(
    "celeriac_async_task", default=None
)


def set_async_task(task: Task[Any, Any] | None) -> None:
    """Make ``task`` the current task of the running asyncio task (its context)."""
    _async_task.set(task)


def push_task(task: Task[Any, Any]) -> None:
    _stack.tasks.append(task)


def pop_task() -> None:
    tasks = _stack.tasks
    if tasks:
        tasks.pop()


def get_current_task() -> Task[Any, Any] | None:
    """The task running in this thread (called directly or by a worker), if any."""
    tasks: list[Task[Any, Any]] = _stack.tasks
    return tasks[-1] if tasks else _async_task.get()


def get_current_worker_task() -> Task[Any, Any] | None:
    """The innermost task in this thread that a worker (or ``apply``) is executing,
    as opposed to one called as a plain function."""
    tasks: list[Task[Any, Any]] = _stack.tasks
    for task in tasks[::-1]:
        if not task.request.called_directly:
            return task
    return _async_task.get()
