"""A worker's settings, read once from the app's configuration and the command line,
and checked: a value that cannot work stops the worker before it starts, with a
message that names the setting (``WorkerError``).

Defaults live in ``celeriac.conf.DEFAULTS`` only; they are read through
``conf.setting``. A command-line option, when given, wins over the setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.app import transport_of
from celeriac.conf import setting
from celeriac.events import HEARTBEAT_FREQ
from celeriac.exceptions import ImproperlyConfigured
from celeriac.serialization import worker_accept_content
from celeriac.worker.options import (
    AUTO_CONCURRENCY,
    POOL_ALIASES,
    POOLS,
    START_METHODS,
    WorkerOptions,
    available_cpus,
)

if TYPE_CHECKING:
    from celeriac.conf import BrokerApp

__all__ = [
    "MAX_PREFETCH",
    "WorkerError",
    "WorkerSettings",
    "optional_count",
    "seconds_or_none",
    "whole_at_least_one",
]

#: Celery sends prefetch counts above this as 0 (unbounded).
MAX_PREFETCH = 65535


class WorkerError(Exception):
    """The worker cannot start with this configuration (message is user-facing)."""


def seconds_or_none(name: str, value: Any) -> float | None:
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


def optional_count(name: str, value: Any) -> int | None:
    """A count setting where None/0 = no limit."""
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise WorkerError(f"{name} must be a whole number, not {value!r}") from None
    if isinstance(value, bool) or number < 0 or number != value:
        raise WorkerError(f"{name} must be a whole number >= 0, not {value!r}")
    return number or None


def whole_at_least_one(name: str, value: Any) -> int:
    """A count setting that must be an int >= 1 (digits in a string are accepted)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkerError(f"{name} must be a whole number >= 1, not {value!r}")
    return value


def _given(option: Any, app: BrokerApp, name: str) -> Any:
    """The command-line ``option`` when given, else the setting ``name``."""
    return option if option is not None else setting(app.conf, name)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker reads from its configuration, checked (``build``)."""

    pool: str
    pool_start_method: str
    concurrency: int
    prefetch_multiplier: int
    #: Most messages fetched and not finished; 0 = unbounded.
    window: int
    #: Celery's ``--disable-prefetch`` (Redis only).
    disable_prefetch: bool
    #: ``--disable-prefetch`` was asked for on a broker other than Redis: ignored.
    disable_prefetch_ignored: bool
    async_concurrency: int
    queues: tuple[str, ...]
    accept_content: tuple[str, ...]
    max_tasks_per_child: int | None
    max_memory_per_child: int | None
    eta_task_limit: int | None
    time_limit: float | None
    soft_time_limit: float | None
    rate_limits_enabled: bool
    revoked_ids_max: int
    task_events: bool
    heartbeat_interval: float

    @classmethod
    def build(cls, app: BrokerApp, options: WorkerOptions) -> WorkerSettings:
        """Read and check the settings of ``app`` for a worker started with ``options``."""
        pool = _pool(app, options)
        concurrency = _concurrency(app, options, pool)
        multiplier = _prefetch_multiplier(app, options)
        disable_prefetch = _given(options.disable_prefetch, app, "worker_disable_prefetch")
        if not isinstance(disable_prefetch, bool):
            raise WorkerError(
                f"worker_disable_prefetch must be True or False, not {disable_prefetch!r}"
            )
        # Celery ignores it on brokers other than Redis (the command line warns).
        ignored = disable_prefetch and transport_of(app.broker_url) != "redis"
        if ignored:
            disable_prefetch = False
        if disable_prefetch:
            multiplier = 1
        # A prefork child consumes for itself: its window is its own share.
        window = (1 if pool == "prefork" else concurrency) * multiplier
        try:
            accept_content = worker_accept_content(setting(app.conf, "accept_content"))
        except ImproperlyConfigured as exc:
            raise WorkerError(str(exc)) from None
        return cls(
            pool=pool,
            pool_start_method=_start_method(app, options, pool),
            concurrency=concurrency,
            prefetch_multiplier=multiplier,
            window=0 if window > MAX_PREFETCH else window,
            disable_prefetch=disable_prefetch,
            disable_prefetch_ignored=ignored,
            async_concurrency=whole_at_least_one(
                "worker_async_concurrency", setting(app.conf, "worker_async_concurrency")
            ),
            queues=_queues(app, options),
            accept_content=tuple(accept_content),
            max_tasks_per_child=optional_count(
                "--max-tasks-per-child",
                _given(options.max_tasks_per_child, app, "worker_max_tasks_per_child"),
            ),
            max_memory_per_child=optional_count(
                "--max-memory-per-child",
                _given(options.max_memory_per_child, app, "worker_max_memory_per_child"),
            ),
            eta_task_limit=optional_count(
                "worker_eta_task_limit", setting(app.conf, "worker_eta_task_limit")
            ),
            time_limit=seconds_or_none(
                "time limit", _given(options.time_limit, app, "task_time_limit")
            ),
            soft_time_limit=seconds_or_none(
                "soft time limit", _given(options.soft_time_limit, app, "task_soft_time_limit")
            ),
            rate_limits_enabled=not setting(app.conf, "worker_disable_rate_limits"),
            revoked_ids_max=whole_at_least_one(
                "worker_revoked_ids_max", setting(app.conf, "worker_revoked_ids_max")
            ),
            task_events=options.task_events or bool(setting(app.conf, "worker_send_task_events")),
            heartbeat_interval=(
                seconds_or_none("--heartbeat-interval", options.heartbeat_interval)
                or HEARTBEAT_FREQ
            ),
        )


def _pool(app: BrokerApp, options: WorkerOptions) -> str:
    pool = options.pool
    if pool is None:
        configured = setting(app.conf, "worker_pool")
        configured = POOL_ALIASES.get(configured, configured)
        pool = configured if configured in POOLS else "prefork"
    pool = POOL_ALIASES.get(pool, pool)
    if pool not in POOLS:
        raise WorkerError(f"pool {pool!r} is not available (choose from {', '.join(POOLS)})")
    return pool


def _start_method(app: BrokerApp, options: WorkerOptions, pool: str) -> str:
    start_method, source = options.pool_start_method, "--pool-start-method"
    if start_method is None:
        start_method = setting(app.conf, "worker_pool_start_method")
        source = "worker_pool_start_method"
    if start_method not in START_METHODS:
        raise WorkerError(f"{source} must be 'fork' or 'spawn', not {start_method!r}")
    if start_method == "spawn" and pool == "prefork":
        raise WorkerError(
            f"{source} spawn is not supported by celeriac yet: its prefork children "
            "are forked (leave it out, or give fork)"
        )
    return str(start_method)


def _concurrency(app: BrokerApp, options: WorkerOptions, pool: str) -> int:
    concurrency = options.concurrency
    if isinstance(concurrency, str):  # -c auto (Celery 5.7): the CPUs we may use
        if concurrency.strip().lower() != AUTO_CONCURRENCY:
            raise WorkerError(f"concurrency must be a number or 'auto', not {concurrency!r}")
        concurrency = 1 if pool == "solo" else available_cpus()
    if concurrency is None:
        configured = setting(app.conf, "worker_concurrency")
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
    return concurrency


def _prefetch_multiplier(app: BrokerApp, options: WorkerOptions) -> int:
    multiplier = _given(options.prefetch_multiplier, app, "worker_prefetch_multiplier")
    try:
        multiplier = int(multiplier)
    except (TypeError, ValueError):
        raise WorkerError(
            f"worker_prefetch_multiplier must be an integer, not {multiplier!r}"
        ) from None
    if multiplier < 0:
        raise WorkerError(f"the prefetch multiplier must be 0 or more, not {multiplier}")
    return multiplier


def _queues(app: BrokerApp, options: WorkerOptions) -> tuple[str, ...]:
    """``-Q`` minus ``-X``; without ``-Q``, as Celery: every queue of ``task_queues``
    (the default queue when it is unset)."""
    try:
        known = list(app.queues)
    except Exception as exc:
        raise WorkerError(f"task_queues: {exc}") from None
    queues = list(options.queues) or known
    queues = [q for q in queues if q not in options.exclude_queues]
    if not queues:
        raise WorkerError("every queue was excluded (-X): nothing to consume from")
    if options.queues and not setting(app.conf, "task_create_missing_queues"):
        for name in queues:
            if name not in known:
                raise WorkerError(
                    f"queue {name!r} is not defined in task_queues "
                    "(and task_create_missing_queues is False)"
                )
    return tuple(queues)
