"""Settings: Celery's names and defaults, read in one place.

``app.conf`` is a :class:`Settings`: a mapping with attribute access
(``app.conf.task_default_queue``), ``update()``, ``get()``, ``setdefault()``.
Values are checked when they are set, so a wrong type fails at the line that set it
(:class:`~celeriac.exceptions.ImproperlyConfigured`, naming the setting) rather than
in a worker hours later. Names celeriac does not know are stored as given.

Celery's old upper-case names (``BROKER_URL``, ``CELERY_RESULT_BACKEND``,
``CELERYD_PREFETCH_MULTIPLIER``, ...) are accepted for the settings below and mapped
to the new ones.

Broker: with no ``broker_url`` (and no ``CELERY_BROKER_URL`` in the environment)
celeriac uses :data:`DEFAULT_BROKER_URL`, a SQLite file in the current directory, so
the first command works with no server installed (Celery's default is a RabbitMQ on
localhost). Result backend: ``None`` disables results, as in Celery -- except that
when neither a broker nor a backend is configured, results go to the same SQLite file.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import importlib
import os
import re
import sys
import types
import zoneinfo
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Protocol

from celeriac._core import mask_url
from celeriac.exceptions import ImproperlyConfigured

__all__ = [
    "DEFAULTS",
    "DEFAULT_BROKER_URL",
    "OLD_NAMES",
    "BrokerApp",
    "Settings",
    "parse_rate_limit",
    "read_object",
    "setting",
]

#: The broker used when none is configured: the embedded SQLite file, for one machine.
DEFAULT_BROKER_URL = "sqlite://celeriac.sqlite3"

#: Celery's default for every setting celeriac reads.
DEFAULTS: dict[str, Any] = {
    # broker
    "broker_url": None,
    "broker_read_url": None,
    "broker_write_url": None,
    "broker_connection_timeout": 4.0,
    "broker_connection_retry": True,
    "broker_connection_retry_on_startup": True,
    "broker_connection_max_retries": 100,
    "broker_heartbeat": 120,
    "broker_pool_limit": 10,
    "broker_transport_options": {},
    "broker_use_ssl": False,
    "broker_failover_strategy": None,
    # The type of the celery_delayed_* queues of native delayed delivery (quorum queues).
    "broker_native_delayed_delivery_queue_type": "quorum",
    # results
    "result_backend": None,
    "result_backend_transport_options": {},
    "redis_backend_use_ssl": None,
    "result_serializer": "json",
    "result_accept_content": None,
    "result_expires": 86400,
    "result_extended": False,
    "result_persistent": None,
    "result_compression": None,
    "result_cache_max": -1,
    "result_chord_ordered": True,
    "result_chord_join_timeout": 3.0,
    "result_chord_retry_interval": 1.0,
    # tasks
    "task_default_queue": "celery",
    "task_default_exchange": None,
    "task_default_exchange_type": "direct",
    "task_default_routing_key": None,
    "task_default_priority": None,
    "task_default_rate_limit": None,
    "task_default_delivery_mode": 2,
    "task_routes": None,
    "task_annotations": None,
    "task_queues": None,
    "task_queue_max_priority": None,
    "task_default_queue_type": "classic",
    "task_create_missing_queue_type": "classic",
    "task_create_missing_queues": True,
    "task_inherit_parent_priority": False,
    "task_serializer": "json",
    "task_compression": None,
    "task_protocol": 2,
    "accept_content": ["json"],
    "task_ignore_result": False,
    "task_store_errors_even_if_ignored": False,
    "task_acks_late": False,
    "task_acks_on_failure_or_timeout": True,
    "task_reject_on_worker_lost": None,
    "task_track_started": False,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "task_store_eager_result": False,
    "task_send_sent_event": False,
    "task_publish_retry": True,
    "task_remote_tracebacks": False,
    # modules
    "imports": (),
    "include": (),
    # time
    "enable_utc": True,
    "timezone": "UTC",
    # worker
    "worker_concurrency": None,
    "worker_prefetch_multiplier": 4,
    # celeriac: ``async def`` tasks running at once per worker process (and how far
    # the prefetch window grows for them); Celery has no bound.
    "worker_async_concurrency": 100,
    # Revoked task ids each worker process remembers (Celery: 50000, env REVOKES_MAX).
    "worker_revoked_ids_max": 50000,
    "worker_pool": "prefork",
    "worker_pool_start_method": "fork",
    "worker_disable_prefetch": False,
    "worker_max_tasks_per_child": None,
    "worker_max_memory_per_child": None,
    "worker_disable_rate_limits": False,
    "worker_send_task_events": False,
    "worker_enable_remote_control": True,
    "worker_lost_wait": 10.0,
    "worker_proc_alive_timeout": 4.0,
    "worker_hijack_root_logger": True,
    "worker_log_color": None,
    "worker_log_format": "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
    "worker_task_log_format": (
        "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"
    ),
    "worker_redirect_stdouts": True,
    "worker_redirect_stdouts_level": "WARNING",
    "worker_state_db": None,
    "worker_direct": False,
    "worker_eta_task_limit": None,
    "worker_soft_shutdown_timeout": 0.0,
    "worker_cancel_long_running_tasks_on_connection_loss": False,
    # events and remote control
    "event_exchange": "celeryev",
    "event_serializer": "json",
    "event_queue_ttl": 5.0,
    "event_queue_expires": 60.0,
    "control_queue_ttl": 300.0,
    "control_queue_expires": 10.0,
    # beat (periodic tasks)
    "beat_schedule": {},
    "beat_scheduler": "celery.beat:PersistentScheduler",
    "beat_schedule_filename": "celerybeat-schedule",
    "beat_sync_every": 0,
    "beat_max_loop_interval": 0,
    "beat_cron_starting_deadline": None,
}

#: Celery's pre-4.0 names of the settings above.
OLD_NAMES: dict[str, str] = {
    "BROKER_URL": "broker_url",
    "CELERYBEAT_SCHEDULE": "beat_schedule",
    "CELERYBEAT_SCHEDULER": "beat_scheduler",
    "CELERYBEAT_SCHEDULE_FILENAME": "beat_schedule_filename",
    "CELERYBEAT_SYNC_EVERY": "beat_sync_every",
    "CELERYBEAT_MAX_LOOP_INTERVAL": "beat_max_loop_interval",
    "BROKER_READ_URL": "broker_read_url",
    "BROKER_WRITE_URL": "broker_write_url",
    "BROKER_CONNECTION_TIMEOUT": "broker_connection_timeout",
    "BROKER_CONNECTION_RETRY": "broker_connection_retry",
    "BROKER_CONNECTION_RETRY_ON_STARTUP": "broker_connection_retry_on_startup",
    "BROKER_CONNECTION_MAX_RETRIES": "broker_connection_max_retries",
    "BROKER_HEARTBEAT": "broker_heartbeat",
    "BROKER_FAILOVER_STRATEGY": "broker_failover_strategy",
    "BROKER_POOL_LIMIT": "broker_pool_limit",
    "BROKER_TRANSPORT_OPTIONS": "broker_transport_options",
    "BROKER_USE_SSL": "broker_use_ssl",
    "CELERY_RESULT_BACKEND": "result_backend",
    "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS": "result_backend_transport_options",
    "CELERY_REDIS_BACKEND_USE_SSL": "redis_backend_use_ssl",
    "CELERY_RESULT_SERIALIZER": "result_serializer",
    "RESULT_ACCEPT_CONTENT": "result_accept_content",
    "CELERY_TASK_RESULT_EXPIRES": "result_expires",
    "CELERY_RESULT_EXTENDED": "result_extended",
    "CELERY_RESULT_PERSISTENT": "result_persistent",
    "CELERY_DEFAULT_QUEUE": "task_default_queue",
    "CELERY_DEFAULT_EXCHANGE": "task_default_exchange",
    "CELERY_DEFAULT_EXCHANGE_TYPE": "task_default_exchange_type",
    "CELERY_DEFAULT_ROUTING_KEY": "task_default_routing_key",
    "CELERY_DEFAULT_PRIORITY": "task_default_priority",
    "CELERY_DEFAULT_RATE_LIMIT": "task_default_rate_limit",
    "CELERY_DEFAULT_DELIVERY_MODE": "task_default_delivery_mode",
    "CELERY_ROUTES": "task_routes",
    "CELERY_ANNOTATIONS": "task_annotations",
    "CELERY_QUEUES": "task_queues",
    "CELERY_CREATE_MISSING_QUEUES": "task_create_missing_queues",
    "CELERY_INHERIT_PARENT_PRIORITY": "task_inherit_parent_priority",
    "CELERY_TASK_SERIALIZER": "task_serializer",
    "CELERY_MESSAGE_COMPRESSION": "task_compression",
    "CELERY_ACCEPT_CONTENT": "accept_content",
    "CELERY_IGNORE_RESULT": "task_ignore_result",
    "CELERY_STORE_ERRORS_EVEN_IF_IGNORED": "task_store_errors_even_if_ignored",
    "CELERY_ACKS_LATE": "task_acks_late",
    "CELERY_ACKS_ON_FAILURE_OR_TIMEOUT": "task_acks_on_failure_or_timeout",
    "CELERY_REJECT_ON_WORKER_LOST": "task_reject_on_worker_lost",
    "CELERY_TRACK_STARTED": "task_track_started",
    "CELERYD_TASK_TIME_LIMIT": "task_time_limit",
    "CELERYD_TASK_SOFT_TIME_LIMIT": "task_soft_time_limit",
    "CELERY_ALWAYS_EAGER": "task_always_eager",
    "CELERY_EAGER_PROPAGATES_EXCEPTIONS": "task_eager_propagates",
    "CELERY_STORE_EAGER_RESULT": "task_store_eager_result",
    "CELERY_SEND_TASK_SENT_EVENT": "task_send_sent_event",
    "CELERY_IMPORTS": "imports",
    "CELERY_INCLUDE": "include",
    "ENABLE_UTC": "enable_utc",
    "CELERY_ENABLE_UTC": "enable_utc",
    "CELERY_TIMEZONE": "timezone",
    "CELERYD_CONCURRENCY": "worker_concurrency",
    "CELERYD_PREFETCH_MULTIPLIER": "worker_prefetch_multiplier",
    "CELERYD_POOL": "worker_pool",
    "CELERYD_MAX_TASKS_PER_CHILD": "worker_max_tasks_per_child",
    "CELERYD_MAX_MEMORY_PER_CHILD": "worker_max_memory_per_child",
    "CELERY_DISABLE_RATE_LIMITS": "worker_disable_rate_limits",
    "CELERY_SEND_EVENTS": "worker_send_task_events",
    "CELERY_ENABLE_REMOTE_CONTROL": "worker_enable_remote_control",
    "CELERYD_HIJACK_ROOT_LOGGER": "worker_hijack_root_logger",
    "CELERYD_LOG_COLOR": "worker_log_color",
    "CELERYD_LOG_FORMAT": "worker_log_format",
    "CELERYD_TASK_LOG_FORMAT": "worker_task_log_format",
    "CELERY_REDIRECT_STDOUTS": "worker_redirect_stdouts",
    "CELERY_REDIRECT_STDOUTS_LEVEL": "worker_redirect_stdouts_level",
    "CELERYD_STATE_DB": "worker_state_db",
}


# -- value checks --------------------------------------------------------------------


def _bad(name: str, expected: str, value: Any) -> ImproperlyConfigured:
    return ImproperlyConfigured(
        f"setting {name!r} must be {expected}, not {type(value).__name__} {value!r}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_str(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise _bad(name, "a str", value)
    return value


def _check_optional_str(name: str, value: Any) -> Any:
    return None if value is None else _check_str(name, value)


def _check_broker_url(name: str, value: Any) -> Any:
    """A URL, or kombu's failover list: a list (or tuple) of URLs, kept as one str with
    ``;`` between them, the form a URL list also takes in one string."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(entry, str) and entry.strip() for entry in value):
            kinds = ", ".join(type(entry).__name__ for entry in value)
            raise ImproperlyConfigured(
                f"setting {name!r} must be a URL or a non-empty list of URL strings, "
                f"not a {type(value).__name__} of [{kinds}]"
            )
        return ";".join(entry.strip() for entry in value)
    return _check_optional_str(name, value)


#: kombu's failover strategies by name (kombu also takes a callable; celeriac does not).
FAILOVER_STRATEGIES = ("round-robin", "shuffle")


def _check_failover_strategy(name: str, value: Any) -> Any:
    if value is None or value in FAILOVER_STRATEGIES:
        return value
    if callable(value):
        raise ImproperlyConfigured(
            f"setting {name!r}: a callable strategy is not supported; "
            f"use 'round-robin' or 'shuffle'"
        )
    raise _bad(name, "'round-robin' or 'shuffle'", value)


def _check_queue_name(name: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise _bad(name, "a non-empty str", value)
    return value


def _check_bool(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if _is_int(value) and value in (0, 1):
        return bool(value)
    raise _bad(name, "True or False", value)


def _check_optional_bool(name: str, value: Any) -> Any:
    return None if value is None else _check_bool(name, value)


def _check_non_negative_int(name: str, value: Any) -> Any:
    if not _is_int(value) or value < 0:
        raise _bad(name, "an int >= 0", value)
    return value


def _check_positive_int(name: str, value: Any) -> Any:
    if not _is_int(value) or value < 1:
        raise _bad(name, "an int >= 1", value)
    return value


def _check_optional_non_negative_int(name: str, value: Any) -> Any:
    return None if value is None else _check_non_negative_int(name, value)


def _check_concurrency(name: str, value: Any) -> Any:
    """``worker_concurrency``: None or 0 (the default), a whole number, or Celery 5.7's
    ``"auto"`` (any case); a string of digits (from the environment) becomes an int."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit():
            return int(text)
        raise _bad(name, "an int >= 0 or 'auto'", value)
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise _bad(name, "an int >= 0 or 'auto'", value)
    return value


def _check_positive_number(name: str, value: Any) -> Any:
    if not _is_number(value) or value <= 0:
        raise _bad(name, "a number > 0", value)
    return value


def _check_optional_non_negative_number(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not _is_number(value) or value < 0:
        raise _bad(name, "None or a number >= 0", value)
    return value


def _check_expires(name: str, value: Any) -> Any:
    if value is None or isinstance(value, datetime.timedelta):
        return value
    if not _is_number(value) or value < 0:
        raise _bad(name, "None, a number of seconds >= 0 or a timedelta", value)
    return value


def _check_priority(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= 255:
        raise _bad(name, "None or an int from 0 to 255", value)
    return value


def _check_mapping(name: str, value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise _bad(name, "a dict", value)
    return dict(value)


def _check_str_list(name: str, value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)) and all(
        isinstance(item, str) for item in value
    ):
        return list(value)
    raise _bad(name, "a list of str", value)


def _check_optional_str_list(name: str, value: Any) -> Any:
    return None if value is None else _check_str_list(name, value)


def _check_modules(name: str, value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)) and all(
        isinstance(item, str) for item in value
    ):
        return tuple(value)
    raise _bad(name, "a list of module names", value)


def _check_timezone(name: str, value: Any) -> Any:
    if value is None or isinstance(value, datetime.tzinfo):
        return value
    if not isinstance(value, str):
        raise _bad(name, "a time zone name", value)
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ImproperlyConfigured(f"setting {name!r}: unknown time zone {value!r}") from exc
    return value


def _check_routes(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (Mapping, list, tuple, str)) or callable(value):
        return value
    raise _bad(name, "a dict, a list, a router function or its dotted name", value)


def _check_annotations(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (Mapping, list, tuple, str)):
        return value
    if callable(getattr(value, "annotate", None)):
        return value
    raise _bad(name, "a dict, a list of dicts or an object with annotate()", value)


def _check_queues(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (list, tuple, set, frozenset, Mapping)):
        return value
    raise _bad(name, "None or a list of queues", value)


def _check_rate(name: str, value: Any) -> Any:
    try:
        parse_rate_limit(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"setting {name!r}: {exc}") from exc
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "broker_url": _check_broker_url,
    "broker_read_url": _check_broker_url,
    "broker_write_url": _check_broker_url,
    "broker_failover_strategy": _check_failover_strategy,
    "broker_connection_timeout": _check_positive_number,
    "broker_connection_retry": _check_bool,
    "broker_connection_retry_on_startup": _check_optional_bool,
    "broker_connection_max_retries": _check_optional_non_negative_int,
    "broker_transport_options": _check_mapping,
    "result_backend": _check_optional_str,
    "result_backend_transport_options": _check_mapping,
    "result_serializer": _check_str,
    "result_accept_content": _check_optional_str_list,
    "result_expires": _check_expires,
    "result_extended": _check_bool,
    "task_default_queue": _check_queue_name,
    "task_default_exchange": _check_optional_str,
    "task_default_exchange_type": _check_str,
    "task_default_routing_key": _check_optional_str,
    "task_default_priority": _check_priority,
    "task_default_rate_limit": _check_rate,
    "task_routes": _check_routes,
    "task_annotations": _check_annotations,
    "task_queues": _check_queues,
    "task_create_missing_queues": _check_bool,
    "task_inherit_parent_priority": _check_bool,
    "task_serializer": _check_str,
    "accept_content": _check_str_list,
    "task_ignore_result": _check_bool,
    "task_store_errors_even_if_ignored": _check_bool,
    "task_acks_late": _check_bool,
    "task_acks_on_failure_or_timeout": _check_bool,
    "task_reject_on_worker_lost": _check_optional_bool,
    "task_track_started": _check_bool,
    "task_time_limit": _check_optional_non_negative_number,
    "task_soft_time_limit": _check_optional_non_negative_number,
    "task_always_eager": _check_bool,
    "task_eager_propagates": _check_bool,
    "task_store_eager_result": _check_bool,
    "task_send_sent_event": _check_bool,
    "imports": _check_modules,
    "include": _check_modules,
    "enable_utc": _check_bool,
    "timezone": _check_timezone,
    "worker_concurrency": _check_concurrency,
    "worker_prefetch_multiplier": _check_non_negative_int,
    "worker_async_concurrency": _check_positive_int,
    "worker_revoked_ids_max": _check_positive_int,
    "worker_pool": _check_str,
    "worker_max_tasks_per_child": _check_optional_non_negative_int,
    "worker_max_memory_per_child": _check_optional_non_negative_int,
    "worker_disable_rate_limits": _check_bool,
    "worker_send_task_events": _check_bool,
    "worker_enable_remote_control": _check_bool,
    "beat_schedule": _check_mapping,
    "beat_schedule_filename": _check_str,
    "beat_max_loop_interval": _check_optional_non_negative_number,
    "beat_cron_starting_deadline": _check_optional_non_negative_number,
}

_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate_limit(value: Any) -> float:
    """Tokens per second for a Celery rate limit: ``"10/m"``, ``"2.5/s"``, ``"100/h"``,
    ``"5"`` or a number (per second). ``None``, ``0`` and ``""`` mean no limit (0.0).
    Raises ``ValueError`` for anything else."""
    if value is None or value == "":
        return 0.0
    if _is_number(value):
        if value < 0:
            raise ValueError(f"invalid rate limit {value!r}: must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid rate limit {value!r}: expected a str like '10/m'")
    count, _, unit = value.strip().partition("/")
    unit = unit.strip() or "s"
    if unit not in _RATE_UNITS:
        raise ValueError(f"invalid rate limit {value!r}: the unit must be s, m or h")
    try:
        amount = float(count)
    except ValueError:
        raise ValueError(f"invalid rate limit {value!r}: {count!r} is not a number") from None
    if amount < 0 or amount != amount:
        raise ValueError(f"invalid rate limit {value!r}: must be a number >= 0")
    return amount / _RATE_UNITS[unit]


def _setting_name(name: str) -> str:
    return OLD_NAMES.get(name, name)


_SECRET_NAME = re.compile("API|TOKEN|KEY|SECRET|PASS|SIGNATURE|DATABASE", re.IGNORECASE)
_URL_SETTINGS = frozenset({"broker_url", "broker_read_url", "broker_write_url", "result_backend"})


class Settings(MutableMapping[str, Any]):
    """Celery settings: ``conf["name"]``, ``conf.name``, ``conf.update(...)``.

    Every known setting is present with Celery's default. ``broker_url`` and
    ``result_backend`` read as attributes honour the ``CELERY_BROKER_URL`` and
    ``CELERY_RESULT_BACKEND`` environment variables first, as in Celery.
    """

    _data: dict[str, Any]
    _version: int

    def __init__(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        object.__setattr__(self, "_data", copy.deepcopy(DEFAULTS))
        object.__setattr__(self, "_version", 0)
        if values is not None:
            self.update(values)
        if kwargs:
            self.update(kwargs)

    # -- mapping ----------------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        return self._data[_setting_name(name)]

    def __setitem__(self, name: str, value: Any) -> None:
        name = _setting_name(name)
        check = _CHECKS.get(name)
        if check is not None:
            value = check(name, value)
        self._data[name] = value
        object.__setattr__(self, "_version", self._version + 1)

    def __delitem__(self, name: str) -> None:
        name = _setting_name(name)
        if name in DEFAULTS:
            self._data[name] = copy.deepcopy(DEFAULTS[name])
        else:
            del self._data[name]
        object.__setattr__(self, "_version", self._version + 1)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _setting_name(name) in self._data

    # -- attributes -------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._data[_setting_name(name)]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    # -- settings with a computed value ----------------------------------------------

    @property
    def broker_url(self) -> str | None:
        """``CELERY_BROKER_URL`` from the environment, else the setting (None: default)."""
        return os.environ.get("CELERY_BROKER_URL") or self._data["broker_url"]

    @property
    def result_backend(self) -> str | None:
        """``CELERY_RESULT_BACKEND`` from the environment, else the setting."""
        return os.environ.get("CELERY_RESULT_BACKEND") or self._data["result_backend"]

    @property
    def task_default_exchange(self) -> str:
        """The setting, else ``task_default_queue``."""
        return str(self._data["task_default_exchange"] or self._data["task_default_queue"])

    @property
    def task_default_routing_key(self) -> str:
        """The setting, else ``task_default_queue``."""
        return str(self._data["task_default_routing_key"] or self._data["task_default_queue"])

    # -- helpers ----------------------------------------------------------------------

    @property
    def changes(self) -> dict[str, Any]:
        """The settings whose value differs from Celery's default."""
        return {
            name: value
            for name, value in self._data.items()
            if name not in DEFAULTS or value != DEFAULTS[name]
        }

    def table(self, with_defaults: bool = False, censored: bool = True) -> dict[str, Any]:
        """The settings as a plain dict (only changed ones unless ``with_defaults``),
        secrets replaced by ``********`` when ``censored`` (``inspect conf``)."""
        values = dict(self._data) if with_defaults else self.changes
        if not censored:
            return values
        out: dict[str, Any] = {}
        for name, value in values.items():
            if name in _URL_SETTINGS and isinstance(value, str):
                out[name] = mask_url(value).replace(":**@", ":********@")
            elif _SECRET_NAME.search(name):
                out[name] = "********"
            else:
                out[name] = value
        return out

    def copy(self) -> Settings:
        new = Settings()
        new._data.update(copy.deepcopy(self._data))
        return new

    def __repr__(self) -> str:
        return f"<Settings: {len(self._data)} settings, {len(self.changes)} changed>"


# -- reading settings from a module or object ----------------------------------------


def import_object(path: str) -> Any:
    """``"pkg.mod"``, ``"pkg.mod:attr"`` or ``"pkg.mod.attr"``, imported with the
    current directory on ``sys.path`` (as ``celery -A`` and Celery's loader do)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        if ":" in path:
            module_name, _, attr = path.partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        try:
            return importlib.import_module(path)
        except ModuleNotFoundError as exc:
            module_name, _, attr = path.rpartition(".")
            if not module_name or exc.name != path:
                raise
            return getattr(importlib.import_module(module_name), attr)
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _items_of(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        yield from obj.items()
        return
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        if isinstance(value, types.ModuleType):
            continue
        yield name, value


def read_object(obj: Any, namespace: str | None = None) -> dict[str, Any]:
    """The settings in a module (or its dotted name), a class, an object or a mapping.

    Without ``namespace`` only lower-case names (and Celery's old upper-case names)
    are read. With ``namespace="CELERY"`` only ``CELERY_``-prefixed names are read,
    the prefix removed and the rest lower-cased: ``CELERY_BROKER_URL`` -> ``broker_url``.
    """
    if isinstance(obj, str):
        obj = import_object(obj)
    found: dict[str, Any] = {}
    if namespace:
        prefix = namespace if namespace.endswith("_") else namespace + "_"
        for name, value in _items_of(obj):
            if isinstance(name, str) and name.upper().startswith(prefix.upper()):
                found[name[len(prefix) :].lower()] = value
        return found
    for name, value in _items_of(obj):
        if not isinstance(name, str) or name.startswith("_"):
            continue
        if name in OLD_NAMES:
            found.setdefault(OLD_NAMES[name], value)
        elif name.islower():
            found[name] = value
    return found


# -- what code outside the app reads of it -------------------------------------------


def setting(conf: Any, name: str) -> Any:
    """The setting ``name`` of ``conf`` (an app's ``Settings``, or any mapping); its
    default in ``DEFAULTS`` when it is missing or None."""
    try:
        value = conf[name]
    except (KeyError, TypeError):
        value = None
    return DEFAULTS.get(name) if value is None else value


class BrokerApp(Protocol):
    """What the worker, its remote control and its events need of an app, so they
    depend on this shape and not on ``celeriac.app``."""

    @property
    def conf(self) -> Settings: ...

    @property
    def broker_url(self) -> str: ...

    @property
    def queues(self) -> Any: ...

    def transport_options(self) -> dict[str, Any]: ...
