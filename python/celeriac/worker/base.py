"""The worker's state and the constants its parts share.

What every part of the worker reads and writes (the bookkeeping the module docstring
of ``celeriac.worker.worker`` describes), built by ``WorkerBase.__init__``.
"""

from __future__ import annotations

import collections
import os
import queue
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from celeriac import _core, signals
from celeriac.conf import parse_rate_limit
from celeriac.events import EventDispatcher, Heart
from celeriac.task import is_async_task as _is_async_task
from celeriac.worker import pool as pool_mod
from celeriac.worker.aio import AsyncPool
from celeriac.worker.eta import EtaSchedule
from celeriac.worker.node_stats import SlotStats
from celeriac.worker.options import (
    WorkerOptions,
    expand_nodename,
)
from celeriac.worker.request import (
    Disposition,
    Request,
    TaskPolicy,
)
from celeriac.worker.revoke import RevokedSet
from celeriac.worker.settings import WorkerError, WorkerSettings, seconds_or_none
from celeriac.worker.slots import Flag, Slot, SlotTable, State

if TYPE_CHECKING:
    from celeriac._core import Backend, Consumer
    from celeriac.app import Celeriac
    from celeriac.worker.canvas_step import PendingChordPart
    from celeriac.worker.sigrelay import SignalRelay

EX_OK = 0
EX_FAILURE = 1

#: Longest wait in one ``fetch`` while idle; bounds how late a warm shutdown starts.
IDLE_WAIT = 1.0
#: ``fetch`` wait while thread-pool tasks run, so finished ones are acked promptly.
BUSY_WAIT = 0.1
#: A prefork child gives back the messages it prefetched before it runs a task whose
#: last run took this long or more (seconds), or that it never ran (``-O fair``).
QUICK_RUN = 0.1
#: Most messages taken in one ``fetch`` when the window is unbounded.
UNBOUNDED_BATCH = 100
#: Connection retry backoff: 1, 2, 4, 8, 8, ... seconds.
RETRY_MAX_INTERVAL = 8.0
#: Celery sends prefetch counts above this as 0 (unbounded).
MAX_PREFETCH = 65535
#: Most messages held for their rate limit that widen the prefetch window (each held
#: one takes an extra slot, so other tasks keep flowing); past it they use the window.
RATE_LIMIT_HOLD = 64


class ColdShutdown(BaseException):
    """Raised in the main thread by the second shutdown signal."""


class StopFetch(BaseException):
    """Raised by the first shutdown signal when it lands while ``fetch`` waits, so the
    warm shutdown starts at once instead of after the wait."""


def scrub_error(text: str, url: str, masked: str) -> str:
    """Remove the URL's passwords (every entry's, for a ``;``-separated failover list)
    from an error text, whatever its origin, and the ``cannot connect to <url>:``
    prefix the core adds (the log line names the URL)."""
    text = text.replace(url, masked)
    prefix = f"cannot connect to {masked}: "
    if text.lower().startswith(prefix.lower()):
        text = text[len(prefix) :]
    for entry in url.split(";"):
        entry = entry.strip()
        try:
            password = urllib.parse.urlsplit(entry).password
        except ValueError:
            password = None
        if password:
            text = text.replace(f":{password}@", ":**@")
            if len(password) >= 4:
                text = text.replace(password, "**")
    return text


class ChildContext:
    """What a prefork child knows about its place in the supervisor's table."""

    def __init__(
        self,
        index: int,
        number: int,
        table: SlotTable,
        parent_pid: int,
        pending: list[tuple[str, bool]],
    ) -> None:
        self.index = index
        self.number = number
        self.table = table
        self.parent_pid = parent_pid
        #: ``(delivery_tag, requeue)`` for messages of dead children: ack or requeue.
        self.pending = pending
        self.tasks_done = 0
        self.retiring = False

    def publish(self, state: State, request: Request | None = None, hard: float = 0.0) -> None:
        # Written twice per task: plain ints for the flags (enum.Flag's | is slow).
        if request is None:
            slot = Slot(pid=os.getpid(), state=state)
        else:
            delivery = request.delivery
            slot = Slot(
                pid=os.getpid(),
                state=state,
                flags=Flag(
                    (Flag.ACKS_LATE.value if request.acks_late else 0)
                    | (Flag.REJECT_ON_WORKER_LOST.value if request.reject_on_worker_lost else 0)
                    | (Flag.IGNORE_RESULT.value if request.ignore_result else 0)
                    | (Flag.ACKS_ON_FAILURE.value if request.acks_on_failure else 0)
                ),
                started=time.time(),
                hard=hard,
                task_id=request.id,
                delivery_tag=delivery.delivery_tag,
                name=request.name,
                reply_to=delivery.reply_to or "",
                correlation_id=delivery.correlation_id or "",
            )
        self.table.write(self.index, slot)


class WorkerBase:
    """A worker's state: its settings (checked once), pool, queues and bookkeeping.

    The behaviour is added by one mixin per concern (``execution``, ``held``,
    ``consume``, ``lifecycle``, ``child``); ``celeriac.worker.worker.Worker`` joins them.
    The constructor checks the configuration (``WorkerError``).
    """

    def __init__(self, app: Celeriac, options: WorkerOptions) -> None:
        self.app = app
        self.options = options
        self.loglevel = options.loglevel
        try:
            self.nodename = expand_nodename(options.hostname)
        except ValueError as exc:
            raise WorkerError(str(exc)) from None
        # Before the settings are read: a receiver may change them for this node.
        signals.celeryd_init.send(
            sender=self.nodename, instance=self, conf=app.conf, options=vars(options)
        )

        #: Every setting the worker reads, checked once.
        self.settings = settings = WorkerSettings.build(app, options)
        pool = settings.pool
        self.pool_name: str = pool
        self.concurrency: int = settings.concurrency
        self.disable_prefetch_ignored = settings.disable_prefetch_ignored
        #: Celery's ``--disable-prefetch`` (Redis): a message is taken only when a pool
        #: slot is free to run it: a multiplier of 1, and a running task keeps its slot
        #: of the consumer's window after its early ack (``_slots_held``).
        self.disable_prefetch: bool = settings.disable_prefetch
        #: Window slots held back for running early-acked tasks (``--disable-prefetch``).
        self._slots_held = 0
        #: Chord parts of early-acked tasks sent and not settled yet (``_settle_joins``).
        self.joins_in_flight: list[PendingChordPart] = []
        #: ``async def`` tasks run on an event loop per process, this many at once.
        self.async_concurrency = settings.async_concurrency
        #: Most messages fetched and not finished; 0 = unbounded.
        self.window: int = settings.window
        self.queues: list[str] = list(settings.queues)
        #: ``accept_content``, checked at start (serializer names, pickle as root).
        self.accept_content = list(settings.accept_content)
        self.max_tasks_per_child = settings.max_tasks_per_child
        self.max_memory_per_child = settings.max_memory_per_child
        self.eta_task_limit = settings.eta_task_limit
        self.time_limit = settings.time_limit
        self.soft_time_limit = settings.soft_time_limit
        try:
            tasks = dict(app.tasks.items())  # applies task_annotations
        except (ValueError, TypeError) as exc:
            raise WorkerError(f"task_annotations: {exc}") from None
        self.rate_limits_enabled = settings.rate_limits_enabled
        # A prefork node's children share one set of buckets: a limit holds per node.
        self.rate_limiter: _core.RateLimiter | _core.SharedRateLimiter = (
            _core.SharedRateLimiter(len(tasks)) if pool == "prefork" else _core.RateLimiter()
        )
        self._rate_of: dict[str, Any] = {}
        self._policies: dict[str, TaskPolicy] = {}
        if self.rate_limits_enabled:
            for name, task in tasks.items():
                self._rate_for(name, task)
        for name, task in tasks.items():
            for attr in ("time_limit", "soft_time_limit"):
                seconds_or_none(f"task {name}: {attr}", getattr(task, attr, None))
        #: Names of the ``async def`` tasks. The first one this process receives widens
        #: the prefetch window by ``worker_async_concurrency`` so the event loop is kept
        #: full; a process that only ever gets sync tasks keeps Celery's window (a wider
        #: one would let a few prefork children hoard the queue).
        self.async_tasks = frozenset(n for n, t in tasks.items() if _is_async_task(t))
        self._async_window_open = False
        #: Ids revoked by remote control (``revoke``), remembered per process.
        self.revoked = RevokedSet(settings.revoked_ids_max)
        #: The prefork supervisor, in the supervisor's process.
        self.supervisor: Any = None
        self.task_events = settings.task_events
        #: This process's event dispatcher (task events only with ``-E``).
        self.events: EventDispatcher | None = None
        #: Sends worker-online/heartbeat/offline (the supervisor does it in prefork);
        #: none with ``--without-heartbeat``, as Celery sends none then.
        self.heart: Heart | None = None
        self.heartbeat_interval = settings.heartbeat_interval
        #: The pidfile this process wrote (``--pidfile``; set by the command line).
        self.pidfile: Any = None
        #: Tasks handed to the pool so far (``processed`` in heartbeats).
        self.processed = 0
        #: Requests running now and tasks run per name (``inspect active``/``stats``).
        self.running: list[Request] = []
        self.totals: collections.Counter[str] = collections.Counter()
        #: Answers remote control (solo/threads; in prefork the supervisor holds it).
        self.pidbox: Any = None

        self.consumer: Consumer | None = None
        self.backend: Backend | None = None
        #: Per task name: whether its last run in this process was quick (``QUICK_RUN``).
        self._quick: dict[str, bool] = {}
        #: Queues ``_make_way`` stopped consuming while a long task runs.
        self._paused: list[str] = []
        # Each prefork child runs its tasks one at a time, in its own main thread.
        self.pool: pool_mod.Pool[Request, Disposition] = self._make_pool(pool)
        self.reserved: collections.deque[Request] = collections.deque()
        self.eta: EtaSchedule[Request] = EtaSchedule()
        #: Held requests (ETA or rate limit) that took an extra window slot each.
        self._eta_extra = 0
        self._rate_extra = 0
        #: Revoked requests ``revoke`` took out of ``eta`` (from the remote-control
        #: thread); the loop settles them (``_settle_revoked``) when this is set.
        self._revoked_held: collections.deque[Request] = collections.deque()
        self._revoke_pending = False
        self.child: ChildContext | None = None
        #: A prefork child's counts of tasks started and running, for the node's heartbeat.
        self.slot_stats: SlotStats | None = None
        self._in_task = False
        self.stop_requested = False
        self._signals_seen = 0
        self._in_fetch = False
        self._previous_handlers: dict[int, Any] = {}
        #: Has the main thread act on a shutdown signal at once (``sigrelay``).
        self._relay: SignalRelay | None = None
        signals.worker_init.send(sender=self)

    @property
    def hostname(self) -> str:
        """The node name (Celery's ``WorkController.hostname``)."""
        return self.nodename

    def _make_pool(self, pool: str) -> pool_mod.Pool[Request, Disposition]:
        """The sync pool; beside it an event loop pool when the app has ``async def``
        tasks (started on the first one, so after a prefork child's fork)."""
        kind = "solo" if pool == "prefork" else pool
        if not self.async_tasks:
            return pool_mod.create(kind, self._job, self.concurrency)
        wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()

        def wake() -> None:
            wakeups.put(None)

        names = self.async_tasks
        return pool_mod.HybridPool(
            pool_mod.create(kind, self._job, self.concurrency, wake),
            AsyncPool(self, self.async_concurrency, wake),
            lambda request: request.task.name in names,
            wakeups,
        )

    def _async_pool(self) -> AsyncPool | None:
        pool = self.pool
        if isinstance(pool, pool_mod.HybridPool) and isinstance(pool.coroutines, AsyncPool):
            return pool.coroutines
        return None

    def _rate_for(self, name: str, task: Any) -> float:
        """The task's rate limit in tasks per second (0 = none), given to the limiter.
        ``WorkerError`` for a rate string that cannot be read."""
        value = getattr(task, "rate_limit", None)
        try:
            rate = parse_rate_limit(value)
        except ValueError as exc:
            raise WorkerError(f"task {name}: {exc}") from None
        if self._rate_of.get(name) != value:
            self._rate_of[name] = value
            self.rate_limiter.set(name, rate)
        return rate

    def refresh_rate_limit(self, name: str, task: Any) -> None:
        """Apply a ``rate_limit`` changed by remote control."""
        if self.rate_limits_enabled:
            self._rate_for(name, task)

    def _job(self, request: Request) -> Disposition:
        """Run one request in this process (``ExecutionMixin``)."""
        raise NotImplementedError
