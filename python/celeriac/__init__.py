"""celeriac: Celery's API and wire protocol, with the hot path in Rust.

Change ``from celery import Celery`` to ``from celeriac import Celery``::

    from celeriac import Celeriac

    app = Celeriac("tasks", broker="redis://localhost", backend="redis://localhost")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(2, 2).get(timeout=10)
"""

from __future__ import annotations

from typing import Any, cast

from celeriac import states
from celeriac._core import __version__
from celeriac.app import Celeriac, Celery, shared_task
from celeriac.canvas import (
    Signature,
    chain,
    chord,
    chunks,
    group,
    maybe_signature,
    signature,
    subtask,
    xmap,
    xstarmap,
)
from celeriac.local import Proxy, get_current_app, get_current_task
from celeriac.queues import Exchange, Queue
from celeriac.result import AsyncResult, EagerResult, GroupResult
from celeriac.task import Task

__all__ = [
    "AsyncResult",
    "Celeriac",
    "Celery",
    "EagerResult",
    "Exchange",
    "GroupResult",
    "Queue",
    "Signature",
    "Task",
    "__version__",
    "chain",
    "chord",
    "chunks",
    "current_app",
    "current_task",
    "group",
    "maybe_signature",
    "shared_task",
    "signature",
    "states",
    "subtask",
    "xmap",
    "xstarmap",
]

#: The current app (the last one created), looked up at each use.
current_app: Celeriac = cast(Celeriac, Proxy(get_current_app))
#: The task running in this thread, or a falsy proxy when none is.
current_task: Task[Any, Any] = cast("Task[Any, Any]", Proxy(get_current_task))
