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

import collections
import contextlib
import logging
import os
import queue
import signal
import sys
import time
import urllib.parse
from types import FrameType
from typing import TYPE_CHECKING, Any

from celeriac import _core, signals, states
from celeriac.app import transport_of
from celeriac.conf import parse_rate_limit
from celeriac.events import HEARTBEAT_FREQ, EventDispatcher, Heart
from celeriac.exceptions import (
    ImproperlyConfigured,
    NotRegistered,
    SoftTimeLimitExceeded,
    TaskRevokedError,
)
from celeriac.fixups import run_with_fixups
from celeriac.result import exception_to_meta, meta_for
from celeriac.serialization import worker_accept_content
from celeriac.signals import task_internal_error, task_received
from celeriac.task import is_async_task as _is_async_task
from celeriac.worker import banner as banner_mod
from celeriac.worker import canvas_lost
from celeriac.worker import pool as pool_mod
from celeriac.worker.aio import DEFAULT_ASYNC_CONCURRENCY, AsyncPool
from celeriac.worker.announce import announce_received, prepare_received
from celeriac.worker.eta import EtaSchedule
from celeriac.worker.log import setup_child_logging
from celeriac.worker.node_stats import SlotStats
from celeriac.worker.options import (
    AUTO_CONCURRENCY,
    POOL_ALIASES,
    POOLS,
    START_METHODS,
    WorkerOptions,
    available_cpus,
    expand_nodename,
)
from celeriac.worker.request import (
    Disposition,
    InvalidMessage,
    Request,
    TaskPolicy,
    execute,
    parse_time,
    send_internal_error,
    store_revoked_expired,
    task_policy,
)
from celeriac.worker.revoke import REVOKES_MAX, RevokedSet, parse_signal, store_revoked
from celeriac.worker.slots import Flag, Slot, SlotTable, State

if TYPE_CHECKING:
    from collections.abc import Callable

    from celeriac._core import Backend, Consumer, Delivery
    from celeriac.app import Celeriac

logger = logging.getLogger("celeriac.worker")

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


class _StopFetch(BaseException):
    """Raised by the first shutdown signal when it lands while ``fetch`` waits, so the
    warm shutdown starts at once instead of after the wait."""


class WorkerError(Exception):
    """The worker cannot start with this configuration (message is user-facing)."""


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


def _rss_kib() -> int:
    """This process's resident memory in KiB (0 when unknown)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _positive_number(name: str, value: Any) -> float | None:
    """A time limit setting: None/0 = none; else a number of seconds > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise WorkerError(f"{name} must be a number of seconds, not {value!r}") from None
    if value != value or value < 0:
        raise WorkerError(f"{name} must be a number of seconds >= 0, not {value!r}")
    return float(value) or None


def _optional_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise WorkerError(f"{name} must be a whole number, not {value!r}") from None
    if isinstance(value, bool) or number < 0 or number != value:
        raise WorkerError(f"{name} must be a whole number >= 0, not {value!r}")
    return number or None


def _whole_at_least_one(name: str, value: Any) -> int:
    """A count setting that must be an int >= 1 (digits in a string are accepted)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkerError(f"{name} must be a whole number >= 1, not {value!r}")
    return value


def _setting(app: Celeriac, name: str, default: Any) -> Any:
    try:
        value = app.conf[name]
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def _say(text: str) -> None:
    """Write straight to stdout: safe inside a signal handler."""
    with contextlib.suppress(OSError):
        os.write(sys.__stdout__.fileno() if sys.__stdout__ else 1, f"\n{text}\n".encode())


def _scrub(text: str, url: str, masked: str) -> str:
    """Remove the URL's password from an error text, whatever its origin, and the
    ``cannot connect to <url>:`` prefix the core adds (the log line names the URL)."""
    text = text.replace(url, masked)
    prefix = f"cannot connect to {masked}: "
    if text.lower().startswith(prefix.lower()):
        text = text[len(prefix) :]
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(f":{password}@", ":**@")
        if len(password) >= 4:
            text = text.replace(password, "**")
    return text


class Worker:
    """A worker process for ``app``, configured by ``options``.

    The constructor checks the configuration (``WorkerError``); ``run`` does the work
    and returns the process exit status.
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

        pool = options.pool
        if pool is None:
            configured = _setting(app, "worker_pool", None)
            configured = POOL_ALIASES.get(configured, configured)
            pool = configured if configured in POOLS else "prefork"
        pool = POOL_ALIASES.get(pool, pool)
        if pool not in POOLS:
            raise WorkerError(f"pool {pool!r} is not available (choose from {', '.join(POOLS)})")
        self.pool_name: str = pool
        start_method, source = options.pool_start_method, "--pool-start-method"
        if start_method is None:
            start_method = _setting(app, "worker_pool_start_method", "fork")
            source = "worker_pool_start_method"
        if start_method not in START_METHODS:
            raise WorkerError(f"{source} must be 'fork' or 'spawn', not {start_method!r}")
        if start_method == "spawn" and pool == "prefork":
            raise WorkerError(
                f"{source} spawn is not supported by celeriac yet: its prefork children "
                "are forked (leave it out, or give fork)"
            )

        concurrency = options.concurrency
        if isinstance(concurrency, str):  # -c auto (Celery 5.7): the CPUs we may use
            if concurrency.strip().lower() != AUTO_CONCURRENCY:
                raise WorkerError(f"concurrency must be a number or 'auto', not {concurrency!r}")
            concurrency = 1 if pool == "solo" else available_cpus()
        if concurrency is None:
            configured = _setting(app, "worker_concurrency", None)
            if configured not in (None, "", "auto", 0):
                try:
                    concurrency = int(configured)
                except (TypeError, ValueError):
                    raise WorkerError(
                        f"worker_concurrency must be a positive integer, not {configured!r}"
                    ) from None
            else:
                concurrency = 1 if pool == "solo" else available_cpus()
        if concurrency < 1:
            raise WorkerError(f"concurrency must be at least 1, not {concurrency}")
        self.concurrency: int = concurrency

        multiplier = options.prefetch_multiplier
        if multiplier is None:
            multiplier = _setting(app, "worker_prefetch_multiplier", 4)
        try:
            multiplier = int(multiplier)
        except (TypeError, ValueError):
            raise WorkerError(
                f"worker_prefetch_multiplier must be an integer, not {multiplier!r}"
            ) from None
        if multiplier < 0:
            raise WorkerError(f"the prefetch multiplier must be 0 or more, not {multiplier}")
        disable_prefetch = options.disable_prefetch
        if disable_prefetch is None:
            disable_prefetch = _setting(app, "worker_disable_prefetch", False)
        if not isinstance(disable_prefetch, bool):
            raise WorkerError(
                f"worker_disable_prefetch must be True or False, not {disable_prefetch!r}"
            )
        #: ``--disable-prefetch`` was asked for on a broker other than Redis: ignored
        #: (the command line warns), as Celery ignores it there.
        self.disable_prefetch_ignored = False
        if disable_prefetch and transport_of(app.broker_url) != "redis":
            disable_prefetch, self.disable_prefetch_ignored = False, True
        #: Celery's ``--disable-prefetch`` (Redis): a message is taken only when a pool
        #: slot is free to run it: a multiplier of 1, and a running task keeps its slot
        #: of the consumer's window after its early ack (``_slots_held``).
        self.disable_prefetch: bool = disable_prefetch
        if disable_prefetch:
            multiplier = 1
        #: Window slots held back for running early-acked tasks (``--disable-prefetch``).
        self._slots_held = 0
        #: ``async def`` tasks run on an event loop per process, this many at once.
        self.async_concurrency = _whole_at_least_one(
            "worker_async_concurrency",
            _setting(app, "worker_async_concurrency", DEFAULT_ASYNC_CONCURRENCY),
        )
        # A prefork child consumes for itself: its window is its own share.
        window = (1 if pool == "prefork" else concurrency) * multiplier
        #: Most messages fetched and not finished; 0 = unbounded.
        self.window: int = 0 if window > MAX_PREFETCH else window

        queues = list(options.queues) or [str(_setting(app, "task_default_queue", "celery"))]
        queues = [q for q in queues if q not in options.exclude_queues]
        if not queues:
            raise WorkerError("every queue was excluded (-X): nothing to consume from")
        if options.queues and not _setting(app, "task_create_missing_queues", True):
            try:
                known = set(app.queues)
            except Exception as exc:
                raise WorkerError(f"task_queues: {exc}") from None
            for name in queues:
                if name not in known:
                    raise WorkerError(
                        f"queue {name!r} is not defined in task_queues "
                        "(and task_create_missing_queues is False)"
                    )
        self.queues: list[str] = queues
        try:
            #: ``accept_content``, checked at start (serializer names, pickle as root).
            self.accept_content = worker_accept_content(_setting(app, "accept_content", ["json"]))
        except ImproperlyConfigured as exc:
            raise WorkerError(str(exc)) from None

        self.max_tasks_per_child = _optional_count(
            "--max-tasks-per-child",
            options.max_tasks_per_child
            if options.max_tasks_per_child is not None
            else _setting(app, "worker_max_tasks_per_child", None),
        )
        self.max_memory_per_child = _optional_count(
            "--max-memory-per-child",
            options.max_memory_per_child
            if options.max_memory_per_child is not None
            else _setting(app, "worker_max_memory_per_child", None),
        )
        self.eta_task_limit = _optional_count(
            "worker_eta_task_limit", _setting(app, "worker_eta_task_limit", None)
        )
        self.time_limit = _positive_number(
            "time limit",
            options.time_limit
            if options.time_limit is not None
            else _setting(app, "task_time_limit", None),
        )
        self.soft_time_limit = _positive_number(
            "soft time limit",
            options.soft_time_limit
            if options.soft_time_limit is not None
            else _setting(app, "task_soft_time_limit", None),
        )
        try:
            tasks = dict(app.tasks.items())  # applies task_annotations
        except (ValueError, TypeError) as exc:
            raise WorkerError(f"task_annotations: {exc}") from None
        self.rate_limits_enabled = not _setting(app, "worker_disable_rate_limits", False)
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
                _positive_number(f"task {name}: {attr}", getattr(task, attr, None))
        #: Names of the ``async def`` tasks. The first one this process receives widens
        #: the prefetch window by ``worker_async_concurrency`` so the event loop is kept
        #: full; a process that only ever gets sync tasks keeps Celery's window (a wider
        #: one would let a few prefork children hoard the queue).
        self.async_tasks = frozenset(n for n, t in tasks.items() if _is_async_task(t))
        self._async_window_open = False
        #: Ids revoked by remote control (``revoke``), remembered per process.
        self.revoked = RevokedSet(
            _whole_at_least_one(
                "worker_revoked_ids_max", _setting(app, "worker_revoked_ids_max", REVOKES_MAX)
            )
        )
        #: The prefork supervisor, in the supervisor's process.
        self.supervisor: Any = None
        self.task_events = options.task_events or bool(
            _setting(app, "worker_send_task_events", False)
        )
        #: This process's event dispatcher (task events only with ``-E``).
        self.events: EventDispatcher | None = None
        #: Sends worker-online/heartbeat/offline (the supervisor does it in prefork);
        #: none with ``--without-heartbeat``, as Celery sends none then.
        self.heart: Heart | None = None
        self.heartbeat_interval = (
            _positive_number("--heartbeat-interval", options.heartbeat_interval) or HEARTBEAT_FREQ
        )
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
        self._stop_requested = False
        self._signals_seen = 0
        self._in_fetch = False
        self._previous_handlers: dict[int, Any] = {}
        signals.worker_init.send(sender=self)

    @property
    def hostname(self) -> str:
        """The node name (Celery's ``WorkController.hostname``)."""
        return self.nodename

    # -- setup ---------------------------------------------------------------------

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

    # -- revoke --------------------------------------------------------------------

    def is_revoked(self, task_id: str) -> bool:
        revoked = self.revoked
        return bool(revoked.ids) and task_id in revoked

    def revoke(self, task_ids: Any, terminate: bool = False, signal_: Any = None) -> dict[str, str]:
        """Remote control's ``revoke``: remember ``task_ids`` (a task id or a list of
        them) so their messages are discarded, and with ``terminate`` stop the ones
        running here (prefork: the supervisor signals the child of a sync task; an
        ``async def`` task's coroutine is cancelled). Celery's reply text."""
        if isinstance(task_ids, str):
            ids = [task_ids]
        elif isinstance(task_ids, (list, tuple)) and all(isinstance(i, str) for i in task_ids):
            ids = list(dict.fromkeys(task_ids))
        else:
            return {"error": f"task_id must be a task id or a list of them, not {task_ids!r}"}
        ids = [i for i in ids if i]
        signum = 0
        if terminate:
            try:
                signum = parse_signal(signal_)
            except ValueError as exc:
                return {"error": str(exc)}
        self.revoked.add(ids, signum)
        self._take_out_revoked(ids)
        if self.child is None:  # the process that speaks for the node
            self._store_revoked(ids)
        if not terminate:
            logger.info("Tasks flagged as revoked: %s", ", ".join(ids))
            shown = "{" + ", ".join(repr(i) for i in ids) + "}" if ids else "set()"
            return {"ok": f"tasks {shown} flagged as revoked"}  # Celery prints the set
        terminated: list[str] = []
        if self.supervisor is not None:
            terminated = list(self.supervisor.terminate(ids, signum))
        coroutines = self._async_pool()
        if coroutines is not None:
            terminated += [i for i in ids if coroutines.terminate(i, signum)]
        if self.child is None and self.supervisor is None:
            stuck = [r.id for r in list(self.running) if r.id in ids and r.id not in terminated]
            if stuck:
                logger.warning(
                    "Cannot terminate running task(s) %s: the %s pool runs them in this "
                    "process (revoked: a redelivery will not run)",
                    ", ".join(stuck),
                    self.pool_name,
                )
        if not terminated:
            return {"ok": "terminate: tasks unknown"}
        return {"ok": "terminate: " + ", ".join(terminated)}

    def _take_out_revoked(self, ids: list[str]) -> None:
        """Take the revoked messages held here for their ETA or rate limit out of the
        timer at once (``inspect scheduled`` stops listing them), and have the worker
        loop settle them and drop revoked ones from ``reserved``: it owns the consumer
        and ``reserved``, while this runs on the remote-control thread."""
        if not ids:
            return
        wanted = set(ids)
        if len(self.eta):
            self._revoked_held.extend(self.eta.remove(lambda request: request.id in wanted))
        self._revoke_pending = True  # after the extend: the loop sees what was taken

    def _settle_revoked(self, consumer: Consumer) -> None:
        """In the worker loop, after a revoke: discard the revoked messages held or
        reserved here as Celery discards a revoked message (``task-revoked``, REVOKED
        stored, acked), and give back the extra window slot a held one took."""
        self._revoke_pending = False
        gone: list[Request] = []
        while self._revoked_held:
            gone.append(self._revoked_held.popleft())
        revoked = self.revoked
        if revoked.ids:
            if len(self.eta):  # held after revoke looked (it raced the arrival check)
                gone += self.eta.remove(lambda request: request.id in revoked)
            if self.reserved:
                kept: list[Request] = []
                dropped: list[Request] = []
                for request in self.reserved:  # one look each: the set may change meanwhile
                    (dropped if request.id in revoked else kept).append(request)
                if dropped:
                    self.reserved.clear()
                    self.reserved.extend(kept)
                    gone += dropped
        if not gone:
            return
        self._unhold(consumer, gone)
        for request in gone:
            store_revoked(self.backend, request)
        consumer.ack([request.delivery_tag for request in gone])

    def _store_revoked(self, ids: list[str]) -> None:
        """REVOKED for each id that has no result yet and does not run here (Celery
        5.7 writes it when the command arrives)."""
        try:
            backend = self.app.backend
        except Exception:
            return
        if backend is None:
            return
        running = {r.id for r in list(self.running)}
        if self.supervisor is not None:
            children = self.supervisor.running_ids()
            if children is None:
                return  # not sure what runs: the messages are discarded when they come
            running |= set(children)
        reason = exception_to_meta(TaskRevokedError("revoked"))
        for task_id in ids:
            if task_id in running:
                continue
            try:
                stored = backend.get_meta(task_id)
                status = stored.get("status") if isinstance(stored, dict) else None
                if status not in (None, states.PENDING, "RECEIVED", states.RETRY, "REJECTED"):
                    continue
                backend.store(task_id, meta_for(task_id, states.REVOKED, reason, None, None))
            except Exception as exc:
                logger.warning("Failed to mark task %s as revoked in the backend: %s", task_id, exc)

    def banner(self) -> str:
        app = self.app
        version = getattr(sys.modules.get("celeriac"), "__version__", None) or _core.__version__
        info = banner_mod.BannerInfo(
            nodename=self.nodename,
            version=str(version),
            app=f"{app.main or '__main__'}:{id(app):#x}",
            transport=app.broker_url_masked,
            results=app.backend_url_masked,
            concurrency=self.concurrency,
            pool=self.pool_name,
            task_events=self.task_events,
            queues=[self._queue_info(q) for q in self.queues],
            tasks=list(app.tasks),
        )
        return banner_mod.render(info, self.loglevel)

    def _queue_info(self, name: str) -> banner_mod.QueueInfo:
        try:
            spec = self.app.queues.get(name)
        except Exception:  # a bad task_queues setting is reported where it is used
            spec = None
        if spec is None:
            return banner_mod.QueueInfo(name, name, "direct", name)
        return banner_mod.QueueInfo(name, spec.exchange, spec.exchange_type, spec.routing_key)

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

    def _consumer_factory(self) -> Callable[[], Consumer]:
        app = self.app
        timeout = float(_setting(app, "broker_connection_timeout", 4.0))
        options = app.transport_options()
        accept = self.accept_content
        return lambda: _core.Consumer(
            app.broker_url,
            self.queues,
            prefetch_count=self.window,
            transport_options=options,
            connect_timeout=timeout,
            accept_content=accept,
        )

    def _probe_factory(self) -> Callable[[], Any]:
        """The supervisor checks the broker with a producer: it consumes nothing."""
        app = self.app
        timeout = float(_setting(app, "broker_connection_timeout", 4.0))
        options = _setting(app, "broker_transport_options", {}) or {}
        return lambda: _core.Producer(
            app.broker_url,
            origin=self.nodename,
            transport_options=options,
            connect_timeout=timeout,
        )

    def _connect(self, factory: Callable[[], Any] | None = None) -> Any:
        """The consumer, retrying per ``broker_connection_*``; None after giving up."""
        if factory is None:
            factory = self._consumer_factory()
        app = self.app
        url = app.broker_url
        masked = app.broker_url_masked
        retry = _setting(app, "broker_connection_retry_on_startup", None)
        if retry is None:
            retry = _setting(app, "broker_connection_retry", True)
        max_retries = _setting(app, "broker_connection_max_retries", 100) or 0
        attempt = 0
        while not self._stop_requested:
            try:
                return factory()
            except ValueError as exc:
                reason = _scrub(str(exc), url, masked)
                logger.error("consumer: Cannot connect to %s: %s", masked, reason)
                return None
            except _core.OperationalError as exc:
                attempt += 1
                reason = _scrub(str(exc), url, masked)
                if not retry:
                    logger.error(
                        "consumer: Cannot connect to %s: %s. Not retrying "
                        "(broker_connection_retry_on_startup is off).",
                        masked,
                        reason,
                    )
                    return None
                if max_retries and attempt > max_retries:
                    logger.error(
                        "consumer: Cannot connect to %s: %s. Giving up after %d retries.",
                        masked,
                        reason,
                        max_retries,
                    )
                    return None
                delay = min(2.0 ** (attempt - 1), RETRY_MAX_INTERVAL)
                limit = max_retries if max_retries else "unlimited"
                logger.error(
                    "consumer: Cannot connect to %s: %s. Trying again in %.2f seconds... (%d/%s)",
                    masked,
                    reason,
                    delay,
                    attempt,
                    limit,
                )
                self._sleep(delay)
        return None

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when a shutdown is requested."""
        deadline = time.monotonic() + seconds
        while not self._stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    # -- signals -------------------------------------------------------------------

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        child = self.child
        if child is not None:
            wanted, task_id = child.table.terminate_request(child.index)
            if wanted == signum:
                # The supervisor stops the running task (revoke, terminate=True):
                # die by the signal if that task still runs, else ignore it.
                child.table.request_terminate(child.index, "", 0)
                if task_id and child.table.read(child.index).task_id == task_id:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                return
        self._signals_seen += 1
        if signum == signal.SIGQUIT or self._signals_seen >= 2:
            if self._signals_seen >= 3:
                os._exit(EX_FAILURE)
            if self.child is None:
                _say("worker: Cold shutdown (MainProcess)")
                signals.shutting_down(self.nodename, signum, cold=True)
            raise ColdShutdown()
        if self.child is None:
            _say("worker: Warm shutdown (MainProcess)")
            signals.shutting_down(self.nodename, signum, cold=False)
        self._stop_requested = True
        if self._in_fetch:
            raise _StopFetch()

    def _on_soft_limit(self, signum: int, frame: FrameType | None) -> None:
        """SIGALRM in a prefork child: the running task's soft time limit passed."""
        if self._in_task:
            self._in_task = False  # raise once
            logger.warning("Soft time limit exceeded for the running task")
            raise SoftTimeLimitExceeded()

    # -- main ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until told to stop; the process exit status."""
        if self.child is None:
            for fixup in self.app._fixups:
                fixup.on_worker_init(self)
        if self.pool_name == "prefork" and self.child is None:
            from celeriac.worker.prefork import Supervisor

            return Supervisor(self).run()
        self._install_signals()
        try:
            return self._run()
        except ColdShutdown:
            self._cold_shutdown()
            return EX_FAILURE  # not reached
        finally:
            self._restore_signals()

    def _run(self) -> int:
        print(self.banner(), file=sys.__stdout__, flush=True)
        self.warn_task_events()
        if self.pool_name == "solo":  # as Celery's solo pool: this process runs tasks
            signals.worker_process_init.send(sender=self.nodename)
        return self._serve()

    def warn_task_events(self) -> None:
        """Kept for callers; events are sent now (``start_events``)."""

    def start_events(self, counts: Callable[[], tuple[int, int]] | None = None) -> None:
        """This process's dispatcher; with ``counts`` (the process that speaks for
        the node) also the heart: worker-online now, a heartbeat every 2 s."""
        if self.events is not None and self.events.pid != os.getpid():
            self.events = self.heart = None  # inherited through fork: not ours
        if self.events is None:
            self.events = EventDispatcher(self.app, self.nodename, enabled=self.task_events)
        if counts is not None and self.heart is None and self.options.heartbeat:
            self.heart = Heart(self.events, counts, self.heartbeat_interval)
            self.heart.start()

    def stop_events(self) -> None:
        """worker-offline (from the heart's owner), then send what is buffered."""
        events, heart = self.events, self.heart
        self.events = self.heart = None
        if events is None or events.pid != os.getpid():
            return
        try:
            if heart is not None:
                heart.stop()
            events.close()
        except Exception as exc:
            logger.warning("Could not send the last events: %s", exc)

    def run_child(self, ctx: ChildContext) -> int:
        """The body of a prefork child, right after the fork; its exit status."""
        self.child = ctx
        self.slot_stats = ctx.table.stats.for_slot(ctx.index)
        self.supervisor = None  # the fork copied the supervisor's: not ours to drive
        _die_with_parent(ctx.parent_pid)
        import multiprocessing

        multiprocessing.current_process().name = f"ForkPoolWorker-{ctx.number}"
        # -f with %i/%I: this child's own file (Celery numbers children from 1).
        setup_child_logging(self.loglevel, self.options.logfile, self.nodename, ctx.index + 1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
        signal.signal(signal.SIGALRM, self._on_soft_limit)
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        signals.worker_process_init.send(sender=self.nodename)
        ctx.publish(State.STARTING)
        status = EX_FAILURE
        try:
            status = self._serve()
            return status
        except ColdShutdown:
            self._cold_shutdown()
            return EX_FAILURE  # not reached
        finally:
            signals.worker_process_shutdown.send(
                sender=self.nodename, pid=os.getpid(), exitcode=status
            )

    def _serve(self) -> int:
        self.consumer = self._connect()
        if self.consumer is None:
            return EX_OK if self._stop_requested else EX_FAILURE
        if self.child is None:
            logger.info("Connected to %s", self.app.broker_url_masked)
        try:
            self.backend = self.app.backend
        except Exception as exc:
            logger.error("Cannot use the result backend %s: %s", self.app.backend_url_masked, exc)
            self.consumer.close()
            return EX_FAILURE
        if self.child is not None:
            self.start_events()
            self._settle_inherited(self.consumer, self.child)
            self.child.publish(State.IDLE)
        else:
            self.start_events(lambda: (self.pool.active(), self.processed))
            from celeriac.control import Pidbox

            self.pidbox = Pidbox(self)
            self.pidbox.start()
            signals.worker_ready.send(sender=self)
            logger.info("%s ready.", self.nodename)
        try:
            self._loop(self.consumer)
        except _StopFetch:
            pass  # the signal landed at the edge of a fetch: shut down as asked
        except _core.OperationalError as exc:
            logger.critical("consumer: %s; stopping.", exc)
            self._warm_shutdown(self.consumer)
            return EX_FAILURE
        return self._warm_shutdown(self.consumer)

    def _settle_inherited(self, consumer: Consumer, ctx: ChildContext) -> None:
        """Ack or requeue the messages of tasks whose child died (the supervisor has
        no broker connection of its own)."""
        for tag, requeue in ctx.pending:
            try:
                if requeue:
                    consumer.reject(tag, True)
                else:
                    consumer.ack([tag])
            except Exception as exc:
                logger.error("Could not settle message %s of a lost worker: %s", tag, exc)
        ctx.pending = []

    def _loop(self, consumer: Consumer) -> None:
        child = self.child
        while not self._stop_requested:
            if child is not None:
                if os.getppid() != child.parent_pid:
                    logger.error("The supervisor is gone; stopping.")
                    raise ColdShutdown()
                if child.retiring:
                    break
            self._finish(consumer, self.pool.completed())
            if self._revoke_pending:
                self._settle_revoked(consumer)
            self._release_due_eta(consumer)
            self._dispatch(consumer)
            if self.events is not None:
                self.events.flush()
            if self._stop_requested:
                break
            wait = self._wait_budget()
            busy = bool(self.reserved) and self.pool.free_slots() == 0
            room = self._room()
            if not busy and room > 0:
                if self.pool.active():
                    wait = min(wait, BUSY_WAIT)
                for delivery in self._fetch(consumer, room, wait):
                    self._on_delivery(consumer, delivery)
            elif self.pool.active():
                self._finish(consumer, self.pool.completed(timeout=wait))
            else:
                self._sleep(wait)

    def _fetch(self, consumer: Consumer, count: int, wait: float) -> list[Delivery]:
        """A batch of deliveries; a lost connection is logged and retried (the consumer
        reconnects by itself), a closed consumer ends the worker."""
        try:
            self._in_fetch = True
            if self._stop_requested:
                return []
            return consumer.fetch(count, wait)
        except _StopFetch:
            return []  # deliveries not handed over stay in the consumer; restored
        except _core.OperationalError as exc:
            self._in_fetch = False
            if "closed" in str(exc):
                raise
            logger.error(
                "consumer: %s. Trying to re-establish the connection...",
                _scrub(str(exc), self.app.broker_url, self.app.broker_url_masked),
            )
            self._sleep(IDLE_WAIT)
            return []
        finally:
            self._in_fetch = False

    def _room(self) -> int:
        # Held messages that widened the window do not take a slot of it. Those revoke
        # took out of ``eta`` are still fetched (and counted in the extras) until
        # ``_settle_revoked`` acks them.
        held_in_window = (
            len(self.eta) + len(self._revoked_held) - self._eta_extra - self._rate_extra
        )
        held = len(self.reserved) + self.pool.active() + held_in_window
        if self.window == 0:
            return max(0, UNBOUNDED_BATCH - len(self.reserved))
        return max(0, self.window - held)

    def _wait_budget(self) -> float:
        due = self.eta.next_due()
        if due is None:
            return IDLE_WAIT
        return max(0.0, min(IDLE_WAIT, due - time.time()))

    # -- messages ------------------------------------------------------------------

    def _on_delivery(self, consumer: Consumer, delivery: Delivery) -> None:
        tag = delivery.delivery_tag
        if delivery.error is not None:
            logger.error(
                "Received invalid task message: %s. The message has been dropped. "
                "[delivery_tag=%s%s]",
                delivery.error.rstrip(". "),
                tag,
                f" content_type={delivery.content_type}" if delivery.content_type else "",
            )
            # Rejected, not acked: a RabbitMQ queue with a dead-letter exchange keeps it.
            consumer.reject(tag, False)
            signals.task_rejected.send(
                sender=self, message=delivery, exc=InvalidMessage(delivery.error)
            )
            return
        name = delivery.task or ""
        try:
            task = self.app.tasks[name]
        except KeyError:
            self._on_unregistered(consumer, delivery, name)
            return
        try:
            request = Request.from_delivery(
                delivery, task, self.app.conf, self.nodename, self._policy(name, task)
            )
        except InvalidMessage as exc:
            logger.error(
                "Received invalid task message: %s. The message has been dropped. "
                "[task=%s delivery_tag=%s]",
                str(exc).rstrip(". "),
                name,
                tag,
            )
            consumer.reject(tag, False)
            signals.task_rejected.send(sender=self, message=delivery, exc=exc)
            return
        logger.info("Task %s[%s] received", request.name, request.id)
        if self.events is not None and self.events.enabled:
            prepare_received(request, self.events)
            if not self._gives_back():  # else announced once kept (announce.py)
                announce_received(request)
        if request.expired():
            announce_received(request)
            store_revoked_expired(self.backend, request)
            consumer.ack([tag])
            return
        if self.revoked.ids and request.id in self.revoked:
            announce_received(request)
            store_revoked(self.backend, request)
            consumer.ack([tag])
            return
        if task_received.receivers:
            if self._gives_back():
                request.received_by = self  # sent once kept, as task-received is
            else:
                task_received.send(sender=self, request=request)
        if not self._async_window_open and name in self.async_tasks:
            self._open_async_window(consumer)
        if request.eta is not None and request.eta.timestamp() > time.time():
            self._hold(consumer, request, request.eta.timestamp(), rate=False)
            return
        self.reserved.append(request)

    def _open_async_window(self, consumer: Consumer) -> None:
        """Widen the prefetch window for coroutines, once per process (a consumer made
        after a reconnect starts with the widened window)."""
        self._async_window_open = True
        if self.window:
            extra = min(MAX_PREFETCH, self.window + self.async_concurrency) - self.window
            self.window += extra
            consumer.extend_window(extra)

    def _policy(self, name: str, task: Any) -> TaskPolicy:
        """The task's acking/result policy, read once per task (not per message)."""
        policy = self._policies.get(name)
        if policy is None or policy.task is not task:
            policy = self._policies[name] = task_policy(task, self.app.conf)
        return policy

    def _hold(self, consumer: Consumer, request: Request, due: float, *, rate: bool) -> None:
        """Keep ``request`` (unacked) until ``due``, widening the prefetch window by one
        so it does not starve other messages (Celery raises QoS the same way), up to
        ``worker_eta_task_limit`` for ETA messages and ``RATE_LIMIT_HOLD`` for
        rate-limited ones."""
        announce_received(request)  # kept here: never given back
        if self.window:
            if rate:
                if self._rate_extra < RATE_LIMIT_HOLD:
                    request.extra_slot = True
                    self._rate_extra += 1
            elif self.eta_task_limit is None or self._eta_extra < self.eta_task_limit:
                request.extra_slot = True
                self._eta_extra += 1
            if request.extra_slot:
                consumer.extend_window(1)
        request.rate_held = rate
        self.eta.push(due, request)

    def _unhold(self, consumer: Consumer, requests: list[Request]) -> None:
        shrink = 0
        for request in requests:
            if request.extra_slot:
                request.extra_slot = False
                shrink += 1
                if request.rate_held:
                    self._rate_extra -= 1
                else:
                    self._eta_extra -= 1
        if shrink:
            consumer.extend_window(-shrink)

    def _run_in_child(self, consumer: Consumer, request: Request) -> None:
        """Run a sync task inline in a prefork child. Unless the task is known to be
        quick, the child first gives back what it prefetched (``_make_way``), and takes
        its window up again once the task is done."""
        name = request.task.name or ""
        narrowed = 0 if self._quick.get(name) else self._make_way(consumer)
        if self.events is not None:
            # Out before the task can send its retry: a sibling announces that one, and
            # a monitor must not get this delivery's task-received after it.
            self.events.flush()
        started = time.monotonic()
        try:
            self.pool.submit(request)
        finally:
            self._quick[name] = time.monotonic() - started < QUICK_RUN
            if narrowed:
                self._take_up(consumer, narrowed)

    def _gives_back(self) -> bool:
        """Whether this process may give back messages it fetched (``_make_way``)."""
        return self.child is not None and self.concurrency >= 2 and bool(self.window)

    def _make_way(self, consumer: Consumer) -> int:
        """Celery's ``-O fair``: its parent hands a message only to an idle child. Here
        each child prefetches its own, so before a task that may be long the child puts
        back the messages it holds and has not started (at the front of the queue) and
        closes its window while the task runs: an idle sibling takes them instead of
        them waiting behind this task. Returns how far the window was narrowed."""
        if self.concurrency < 2 or not self.window:
            return 0
        # One past its expiry is settled here (REVOKED, acked), not given back: Celery
        # sends ``expires`` to RabbitMQ as a TTL too, and the broker drops a message it
        # gets back past its TTL, without the worker's record.
        tags: list[str] = []
        for request in self.reserved:
            if request.expired():
                store_revoked_expired(self.backend, request)
                consumer.ack([request.delivery_tag])
            else:
                tags.append(request.delivery_tag)
        self.reserved.clear()
        try:
            # Stop the deliveries themselves while the task runs: a window narrowed to
            # nothing would still let a fetch in flight (a blocked BRPOP, RabbitMQ's
            # basic.qos, which cannot be 0) bring one more message to wait behind it.
            self._paused = [q for q in self.queues if consumer.cancel_queue(q)]
            consumer.extend_window(-self.window)
            # Messages the consumer fetched that Python has not seen yet go back too.
            for delivery in consumer.fetch(MAX_PREFETCH, 0.0):
                try:
                    expires = parse_time(delivery.headers.get("expires"), "expires")
                except InvalidMessage:
                    expires = None  # the sibling that takes it reports the bad header
                if expires is not None and expires.timestamp() <= time.time():
                    self._on_delivery(consumer, delivery)  # REVOKED and acked
                else:
                    tags.append(delivery.delivery_tag)
            if tags:
                consumer.give_back(tags)
        except Exception as exc:  # the broker requeues them when the connection ends
            logger.warning("Could not give back %d prefetched message(s): %s", len(tags), exc)
        return self.window

    def _take_up(self, consumer: Consumer, narrowed: int) -> None:
        """Undo ``_make_way`` once the long task is done."""
        paused, self._paused = self._paused, []
        try:
            consumer.extend_window(narrowed)
            for queue in paused:
                if queue in self.queues:  # not cancelled by remote control meanwhile
                    consumer.add_queue(queue)
        except Exception as exc:
            logger.error("Could not resume consuming after a long task: %s", exc)
            raise _core.OperationalError(f"could not resume consuming: {exc}") from exc

    def _on_unregistered(self, consumer: Consumer, delivery: Delivery, name: str) -> None:
        logger.error(
            "Received unregistered task of type %r.\n"
            "The message has been ignored and discarded.\n\n"
            "Did you remember to import the module containing this task?\n"
            "Or maybe you're using relative imports?",
            name,
        )
        task_id = delivery.id
        if self.events is not None and self.events.enabled and task_id:
            self.events.send_task(
                "task-failed",
                uuid=task_id,
                exception=repr(NotRegistered(name)),
                traceback=None,
            )
        if self.backend is not None and task_id:
            reason = exception_to_meta(NotRegistered(name))
            meta = meta_for(task_id, states.FAILURE, reason, None, delivery.headers)
            try:
                # rpc:// answers the sender's reply queue, as for any other result.
                self.backend.store(
                    task_id,
                    meta,
                    reply_to=delivery.reply_to,
                    correlation_id=delivery.correlation_id or task_id,
                )
            except Exception as exc:
                logger.error("Could not store the failure of task %s: %s", task_id, exc)
        consumer.reject(delivery.delivery_tag, False)
        signals.task_unknown.send(
            sender=self, message=delivery, exc=NotRegistered(name), name=name, id=task_id
        )

    def _release_due_eta(self, consumer: Consumer) -> None:
        if len(self.eta):
            due = self.eta.pop_due(time.time())
            if due:
                self._unhold(consumer, due)
                self.reserved.extend(due)

    def _dispatch(self, consumer: Consumer) -> None:
        """Start reserved requests whose kind (sync, ``async def``) has a free slot in
        the pool, so each one starts as it is submitted and an early ack lands just
        before it runs. A request of a full kind stays reserved (unacked, in its place)
        and does not hold up the other kind.

        In a prefork child each task counts toward ``--max-tasks-per-child`` here, as
        it is handed over (coroutines too); the last one retires the child: it takes
        nothing more, lets what runs finish and gives the rest back."""
        pool = self.pool
        if isinstance(pool, pool_mod.SoloPool):
            return self._dispatch_inline(consumer)
        child = self.child
        while self.reserved and not self._stop_requested:
            room = pool.free_slots()
            if room <= 0:
                return
            free: dict[str, int] = {}  # slots left per kind in this batch
            batch: list[Request] = []
            sync: list[Request] = []  # submitted last: solo runs it inline
            kept: list[Request] = []  # of a full kind: they stay reserved
            while self.reserved and room > 0:
                request = self.reserved.popleft()
                kind = pool.kind(request)
                left = free.get(kind)
                if left is None:
                    left = free[kind] = pool.free_slots_for(kind)
                if left <= 0:
                    kept.append(request)
                    continue
                announce_received(request)
                if not self._may_start(consumer, request):
                    continue
                free[kind] = left - 1
                room -= 1
                (sync if kind == pool_mod.SYNC else batch).append(request)
                if self._count_for_child(request):
                    break
            if kept:
                self.reserved.extendleft(reversed(kept))
            batch += sync
            if not batch:
                return  # every kind with room was looked at: nothing can start now
            self.processed += len(batch)
            early = [r.delivery_tag for r in batch if not r.acks_late]
            if early:
                if self.disable_prefetch:  # the slots stay taken while they run
                    self._slots_held += len(early)
                    consumer.extend_window(-len(early))
                consumer.ack(early)
            for request in batch:
                if child is not None and pool.kind(request) == pool_mod.SYNC:
                    self._run_in_child(consumer, request)
                else:
                    pool.submit(request)
            if pool.name == "solo":  # also each prefork child: ack at once
                self._finish(consumer, pool.completed())

    def _count_for_child(self, request: Request) -> bool:
        """Count a task handed over in a prefork child toward ``--max-tasks-per-child``
        (sync or coroutine; not a revoked one). True when it is the child's last: the
        child then takes nothing more, lets what runs finish and gives the rest back."""
        child, most = self.child, self.max_tasks_per_child
        if child is None or most is None or self.is_revoked(request.id):
            return False
        child.tasks_done += 1
        if child.tasks_done < most:
            return False
        child.retiring = True  # the supervisor starts the replacement now
        self._stop_requested = True
        child.publish(State.RETIRING)
        return True

    def _may_start(self, consumer: Consumer, request: Request) -> bool:
        """False for a request that expired (REVOKED stored, acked) or must wait for
        its rate limit (held, unacked); True when it may start now."""
        if request.expires is not None and request.expired():
            store_revoked_expired(self.backend, request)
            consumer.ack([request.delivery_tag])
            return False
        if self.rate_limits_enabled:
            wait = self._rate_wait(request)
            if wait > 0:
                self._hold(consumer, request, time.time() + wait, rate=True)
                return False
        return True

    def _dispatch_inline(self, consumer: Consumer) -> None:
        """``_dispatch`` for a process that runs every task in this thread (``solo``,
        a prefork child without coroutines): one task at a time, each early ack just
        before its task; late acks go in one call once the reserved ones are done."""
        child = self.child
        reserved = self.reserved
        while reserved and not self._stop_requested:
            request = reserved.popleft()
            announce_received(request)
            if not self._may_start(consumer, request):
                continue
            self._count_for_child(request)
            self.processed += 1
            if not request.acks_late:
                if self.disable_prefetch:  # the slot stays taken while it runs
                    self._slots_held += 1
                    consumer.extend_window(-1)
                consumer.ack([request.delivery_tag])
            if child is not None:
                self._run_in_child(consumer, request)
            else:
                self.pool.submit(request)
        self._finish(consumer, self.pool.completed())

    def _rate_wait(self, request: Request) -> float:
        """0 when ``request`` may start now under its task's rate limit (a token is
        taken), else the seconds to hold it."""
        task = request.task
        name = task.name or ""
        value = getattr(task, "rate_limit", None)
        if value != self._rate_of.get(name):
            try:
                self._rate_for(name, task)  # picks up a changed rate_limit
            except WorkerError as exc:
                logger.error("%s; running without a rate limit", exc)
                return 0.0
        if not value:
            return 0.0  # no limit: no token to take
        return float(self.rate_limiter.acquire(name))

    def _time_limits(self, request: Request) -> tuple[float | None, float | None]:
        """``(hard, soft)``: the message's ``timelimit`` header, else the task's
        attributes, else ``task_time_limit``/``task_soft_time_limit``."""
        header = request.delivery.headers.get("timelimit")
        hard_h = soft_h = None
        if isinstance(header, (list, tuple)) and len(header) == 2:
            hard_h, soft_h = header
        task = request.task
        limits: list[float | None] = []
        for from_header, attr, default in (
            (hard_h, "time_limit", self.time_limit),
            (soft_h, "soft_time_limit", self.soft_time_limit),
        ):
            value: Any = from_header
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                value = getattr(task, attr, None)
            if value is None:
                limits.append(default)
                continue
            try:
                limits.append(_positive_number(attr, value) or default)
            except WorkerError:
                limits.append(default)
        return limits[0], limits[1]

    def _job(self, request: Request) -> Disposition:
        """Runs in the pool. Never raises: a failure here is the worker's, not the task's."""
        if self.revoked.ids and request.id in self.revoked:  # revoked while it waited
            store_revoked(self.backend, request)
            return Disposition.ACK if request.acks_late else Disposition.NONE
        child = self.child
        if child is None:
            return self._execute(request)
        hard, soft = self._time_limits(request)
        # Counted toward --max-tasks-per-child (and the child retired) by _dispatch.
        child.publish(State.RETIRING if child.retiring else State.RUNNING, request, hard or 0.0)
        canvas_lost.record(child, request)  # errbacks/chord part if this child is lost
        guard = None
        if soft:
            limit = soft

            def guard(entering: bool) -> None:
                self._in_task = entering
                signal.setitimer(signal.ITIMER_REAL, limit if entering else 0)

        try:
            return self._execute(request, guard)
        finally:
            self._in_task = False
            self._check_memory()
            child.publish(State.RETIRING if child.retiring else State.IDLE)
            canvas_lost.task_done()

    def _check_memory(self) -> None:
        """``--max-memory-per-child`` in a prefork child, after a task ended (a sync
        one in ``_job``, coroutines when the main thread collects them): over the
        limit, the child retires as ``_count_for_child`` retires it: it takes nothing
        more, lets what runs finish and gives the rest back; the supervisor starts its
        replacement. Main thread only (it writes the child's slot)."""
        child, most = self.child, self.max_memory_per_child
        if child is None or most is None or child.retiring or self._stop_requested:
            return
        used = _rss_kib()
        if used <= most:
            return
        logger.warning(
            "Memory usage %d KiB is over --max-memory-per-child (%d KiB): replacing this process.",
            used,
            most,
        )
        child.retiring = True
        self._stop_requested = True
        child.publish(State.RETIRING)

    def _execute(
        self, request: Request, guard: Callable[[bool], None] | None = None
    ) -> Disposition:
        self.running.append(request)
        self.totals[request.name] += 1
        stats = self.slot_stats
        if stats is not None:
            stats.began()
        try:
            if self.app._fixups:  # Django's: database connections closed around the task
                return run_with_fixups(self.app._fixups, execute, request, self.backend, guard)
            return execute(request, self.backend, guard)
        except ColdShutdown:
            raise
        except BaseException as exc:
            logger.critical(
                "Task %s[%s] INTERNAL ERROR: %r", request.name, request.id, exc, exc_info=True
            )
            if task_internal_error.receivers:
                send_internal_error(request, exc)
            return Disposition.ACK if request.acks_late else Disposition.NONE
        finally:
            with contextlib.suppress(ValueError):
                self.running.remove(request)
            if stats is not None:
                stats.ended()

    def _finish(self, consumer: Consumer, done: list[tuple[Request, Disposition]]) -> None:
        acks: list[str] = []
        for request, disposition in done:
            if disposition is Disposition.ACK:
                acks.append(request.delivery_tag)
            elif disposition is Disposition.REJECT:
                consumer.reject(request.delivery_tag, False)
            elif disposition is Disposition.REQUEUE:
                consumer.reject(request.delivery_tag, True)
        if acks:
            consumer.ack(acks)
        if self._slots_held:  # --disable-prefetch: the early-acked ones' slots are free
            freed = min(self._slots_held, sum(1 for request, _ in done if not request.acks_late))
            if freed:
                self._slots_held -= freed
                consumer.extend_window(freed)

    # -- shutdown ------------------------------------------------------------------

    def _warm_shutdown(self, consumer: Consumer) -> int:
        running = self.pool.active()
        if running:
            logger.info("Waiting for %d running task(s) to finish...", running)
        self.pool.join()
        self._finish(consumer, self.pool.completed())
        held = len(self.reserved) + len(self.eta)
        self.reserved.clear()
        self._unhold(consumer, self.eta.clear())
        status = EX_OK
        if self.pidbox is not None:
            self.pidbox.stop()
            self.pidbox = None
        self.stop_events()
        try:
            restored = consumer.restore_unacked()
            if restored or held:
                logger.info("Restored %d unacknowledged message(s) to the queue.", restored)
        except Exception as exc:
            logger.error("Could not restore %d unacknowledged message(s): %s", held, exc)
            status = EX_FAILURE
        try:
            self.app.close()  # flushes results and messages sent by tasks
        except Exception as exc:
            logger.error("Could not write every result or message: %s", exc)
            status = EX_FAILURE
        try:
            consumer.close()
        except Exception as exc:
            logger.warning("Error closing the broker connection: %s", exc)
        logger.info("%s stopped.", self.nodename)
        if self.child is None:
            signals.worker_shutdown.send(sender=self)
        return status

    def _cold_shutdown(self) -> None:
        """Put back what we can, then leave without waiting for running tasks."""
        consumer = self.consumer
        if consumer is not None:
            try:
                consumer.restore_unacked()
            except BaseException as exc:
                logger.error("Cold shutdown: could not restore unacked messages: %s", exc)
        if self.backend is not None:
            try:  # results of tasks that did finish
                self.backend.flush(2.0)
            except BaseException as exc:
                logger.error("Cold shutdown: results may not have been stored: %s", exc)
        if self.pidfile is not None:
            self.pidfile.release()  # only the process that wrote it removes it
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EX_FAILURE)


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so a
    supervisor killed with SIGKILL leaves no orphan consuming messages."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(EX_FAILURE)
