"""The worker: connect, print the banner, take messages, run them, shut down cleanly.

One thread owns the ``Consumer`` (fetch, ack, reject, restore). The pool runs tasks;
``solo`` inline, ``threads`` on a ``ThreadPoolExecutor``. Message bookkeeping:

- ``reserved``: fetched, not started, unacked (they wait for a free pool slot);
- ``eta``: fetched with an ETA in the future, unacked, held until due;
- ``pool.active()``: running.

The three together never exceed the prefetch window (``concurrency *
worker_prefetch_multiplier``; 0 = unbounded). A task is acked just before it starts
(Celery's default) or after it finishes with ``acks_late``.

Shutdown: the first SIGTERM/SIGINT stops fetching, lets running tasks finish, acks them
and puts every fetched-but-not-started message back (``restore_unacked``). A second one
is a cold shutdown: it restores what it can and exits at once with status 1.
"""

from __future__ import annotations

from celeriac.worker.base import (
    BUSY_WAIT,
    EX_FAILURE,
    EX_OK,
    IDLE_WAIT,
    MAX_PREFETCH,
    QUICK_RUN,
    RATE_LIMIT_HOLD,
    RETRY_MAX_INTERVAL,
    UNBOUNDED_BATCH,
    ChildContext,
    ColdShutdown,
    scrub_error,
)
from celeriac.worker.child import ChildMixin
from celeriac.worker.settings import WorkerError, WorkerSettings

__all__ = [
    "BUSY_WAIT",
    "EX_FAILURE",
    "EX_OK",
    "IDLE_WAIT",
    "MAX_PREFETCH",
    "QUICK_RUN",
    "RATE_LIMIT_HOLD",
    "RETRY_MAX_INTERVAL",
    "UNBOUNDED_BATCH",
    "ChildContext",
    "ColdShutdown",
    "Worker",
    "WorkerError",
    "WorkerSettings",
    "scrub_error",
]

#: Old private name, still imported by cli.py.


class Worker(ChildMixin):
    """A worker process for ``app``, configured by ``options``.

    The constructor checks the configuration (``WorkerError``); ``run`` does the work
    and returns the process exit status. Its parts, one concern each: ``base``
    (state), ``execution``, ``held``, ``consume``, ``lifecycle``, ``child``.
    """
