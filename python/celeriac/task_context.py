"""What a running task knows about itself: its :class:`Request` (``task.request``), the
request of the ``async def`` execution an asyncio task is, and running a coroutine to
its end from synchronous code."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celeriac.result import AsyncResult as _AsyncResult

__all__ = ["DEFAULT_REQUEST", "Request", "is_async_task", "run_coroutine"]


class Request:
    """What a running task knows about its message (``task.request``).

    The worker creates one per execution with :meth:`Task.push_request`. Fields not
    given keep the defaults below; unknown fields are kept as attributes.
    """

    id: str | None = None
    task: str | None = None
    args: Sequence[Any] | None = None
    kwargs: Mapping[str, Any] | None = None
    retries: int = 0
    delivery_info: dict[str, Any] | None = None
    hostname: str | None = None
    is_eager: bool = False
    called_directly: bool = True
    correlation_id: str | None = None
    reply_to: str | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    eta: str | None = None
    expires: str | None = None
    headers: dict[str, Any] | None = None
    ignore_result: bool = False
    timelimit: Sequence[float | None] | None = None
    origin: str | None = None
    shadow: str | None = None
    callbacks: list[Any] | None = None
    errbacks: list[Any] | None = None
    chain: list[Any] | None = None
    chord: Any = None
    stamps: dict[str, Any] | None = None
    stamped_headers: list[str] | None = None
    replaced_task_nesting: int = 0
    properties: dict[str, Any] | None = None
    loglevel: Any = None
    logfile: Any = None
    utc: bool | None = None
    children: list[_AsyncResult[Any]]

    def __init__(self, **fields: Any) -> None:
        self.children = []
        self.__dict__.update(fields)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def as_execution_options(self) -> dict[str, Any]:
        """The ``apply_async`` options that send this message again (``retry``)."""
        hard, soft = self.timelimit or (None, None)
        return {
            "task_id": self.id,
            "root_id": self.root_id,
            "parent_id": self.parent_id,
            "group_id": self.group,
            "group_index": self.group_index,
            "shadow": self.shadow,
            "chord": self.chord,
            "chain": self.chain,
            "link": self.callbacks,
            "link_error": self.errbacks,
            "expires": self.expires,
            "soft_time_limit": soft,
            "time_limit": hard,
            "headers": self.headers,
            "retries": self.retries,
            "reply_to": self.reply_to,
            "replaced_task_nesting": self.replaced_task_nesting,
            "origin": self.origin,
            "stamps": self.stamps,
            "stamped_headers": self.stamped_headers,
        }

    def __repr__(self) -> str:
        return f"<Request: {vars(self)!r}>"


DEFAULT_REQUEST = Request()

#: ``(task, request)`` of the ``async def`` execution the running asyncio task is: the
#: worker's event loop runs many in one thread, so a thread-local stack cannot tell them
#: apart; each asyncio task has a context of its own.
ASYNC_REQUEST: contextvars.ContextVar[tuple[Any, Request] | None] = contextvars.ContextVar(
    "celeriac_async_request", default=None
)


def is_async_task(task: Any) -> bool:
    """Whether ``task``'s body is an ``async def`` (a coroutine function)."""
    run = task.__dict__.get("_orig_run") or getattr(task, "run", None)
    return inspect.iscoroutinefunction(run) or inspect.iscoroutinefunction(
        getattr(run, "__wrapped__", None)
    )


def run_coroutine(awaitable: Any) -> Any:
    """Run a coroutine to its end from synchronous code (eager ``apply``): in this
    thread when no event loop runs here, else in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(awaitable)
    outcome: list[Any] = []
    context = contextvars.copy_context()

    def target() -> None:
        try:
            outcome.append((True, context.run(asyncio.run, awaitable)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="celeriac-eager-async")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
