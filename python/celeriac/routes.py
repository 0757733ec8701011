"""Task routing: which queue a task message goes to (Celery's ``task_routes``).

``task_routes`` is a dict, or a list whose items are dicts, lists of ``(pattern,
route)`` pairs, router functions or their dotted names. A pattern is an exact task
name, a glob (``"feed.tasks.*"``) or a compiled regex; a route is a queue name or a
dict with ``queue``, ``exchange``, ``routing_key``, ``priority``. A router function is
called as ``router(name, args, kwargs, options, task=task)`` and returns a route or
None to let the next router decide. The first route found wins; explicit
``apply_async`` options (``queue=``, ``exchange=``, ``routing_key=``, ``priority=``)
override it, and with no route the task goes to ``task_default_queue``.

As in Celery, a queue on a direct exchange is published through the default exchange
``""`` with the queue name as routing key unless both an exchange and a routing key
were given. :class:`Route` reports that case as ``exchange=None, routing_key=None``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from celeriac.conf import Settings, import_object
from celeriac.exceptions import ImproperlyConfigured, QueueNotFound
from celeriac.queues import declared_arguments

__all__ = ["MapRoute", "QueueSpec", "Route", "Router", "queue_table"]


class Route(NamedTuple):
    """Where one message goes. ``exchange``/``routing_key`` None: the default exchange
    with the queue name as routing key."""

    queue: str
    exchange: str | None = None
    routing_key: str | None = None
    priority: int | None = None


class QueueSpec(NamedTuple):
    """A queue from ``task_queues`` (or created on demand): what is declared."""

    name: str
    exchange: str
    exchange_type: str
    routing_key: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    #: ``queue_arguments`` plus kombu's shorthands (``max_priority``...); None: none.
    arguments: Mapping[str, Any] | None = None
    exchange_durable: bool = True
    exchange_auto_delete: bool = False

    def declaration(self) -> dict[str, Any]:
        """The declaration handed to the transport (``queues`` transport option)."""
        declaration: dict[str, Any] = {
            "exchange": self.exchange,
            "exchange_type": self.exchange_type,
            "routing_key": self.routing_key,
            "durable": self.durable,
            "exclusive": self.exclusive,
            "auto_delete": self.auto_delete,
            "exchange_durable": self.exchange_durable,
            "exchange_auto_delete": self.exchange_auto_delete,
        }
        if self.arguments:
            declaration["queue_arguments"] = dict(self.arguments)
        return declaration


class MapRoute:
    """A router made from a mapping (or pairs) of name/glob/regex -> route."""

    def __init__(self, routes: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> None:
        items = routes.items() if isinstance(routes, Mapping) else routes
        self.names: dict[str, Any] = {}
        self.patterns: list[tuple[re.Pattern[str], Any]] = []
        for key, route in items:
            if isinstance(key, re.Pattern):
                self.patterns.append((key, route))
            elif isinstance(key, str) and "*" in key:
                self.patterns.append((re.compile(fnmatch.translate(key)), route))
            elif isinstance(key, str):
                self.names[key] = route
            else:
                raise ImproperlyConfigured(
                    f"task_routes: a key must be a task name, a glob or a regex, not {key!r}"
                )

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.names[name]
        except KeyError:
            pass
        for pattern, route in self.patterns:
            if pattern.match(name):
                return route
        return None


def _prepare(routes: Any) -> list[Any]:
    if routes is None:
        return []
    if isinstance(routes, Mapping) or not isinstance(routes, (list, tuple)):
        routes = [routes]
    prepared: list[Any] = []
    for item in routes:
        if isinstance(item, (Mapping, list, tuple)):
            prepared.append(MapRoute(item))
        elif isinstance(item, str):
            prepared.append(_load_router(item))
        elif callable(item) or hasattr(item, "route_for_task"):
            prepared.append(item)
        else:
            raise ImproperlyConfigured(f"task_routes: cannot route with {item!r}")
    return prepared


def _load_router(path: str) -> Any:
    try:
        router = import_object(path)
    except (ImportError, AttributeError) as exc:
        raise ImproperlyConfigured(f"task_routes: cannot import router {path!r}: {exc}") from exc
    if isinstance(router, type) and hasattr(router, "route_for_task"):
        router = router()
    return router


def _name_of(entity: Any) -> str | None:
    if entity is None or isinstance(entity, str):
        return entity
    return getattr(entity, "name", None)


#: kombu ``Queue`` attributes celeriac cannot honour: refused unless empty/default.
_QUEUE_UNSUPPORTED = ("bindings", "binding_arguments", "consumer_arguments", "no_ack", "no_declare")
_EXCHANGE_UNSUPPORTED = ("arguments", "passive", "no_declare")


def _refuse_unsupported(name: str, item: Any, get: Callable[[str], Any]) -> None:
    for attribute in _QUEUE_UNSUPPORTED:
        if get(attribute):
            raise ImproperlyConfigured(
                f"task_queues: queue {name!r} sets {attribute}={get(attribute)!r}, which "
                "celeriac does not support (one binding per queue, no binding or consumer "
                "arguments, no no_ack/no_declare); remove it"
            )
    exchange = get("exchange")
    if exchange is not None and not isinstance(exchange, str):
        for attribute in _EXCHANGE_UNSUPPORTED:
            if getattr(exchange, attribute, None):
                raise ImproperlyConfigured(
                    f"task_queues: queue {name!r}: its exchange sets {attribute}="
                    f"{getattr(exchange, attribute)!r}, which celeriac does not support"
                )


def _flag(name: str, key: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ImproperlyConfigured(
            f"task_queues: queue {name!r}: {key} must be True or False, not {value!r}"
        )
    return value


def _queue_spec(item: Any, default_type: str) -> QueueSpec:
    if isinstance(item, str):
        return QueueSpec(item, item, default_type, item)
    get: Callable[[str], Any]
    if isinstance(item, Mapping):
        name = item.get("name") or item.get("queue")
        get = item.get
        exchange_type = item.get("exchange_type")
    elif hasattr(item, "name") and hasattr(item, "routing_key"):
        name = getattr(item, "name", None)

        def get(key: str) -> Any:
            return getattr(item, key, None)

        exchange_type = None
    else:
        raise ImproperlyConfigured(
            f"task_queues: {item!r} is not a queue (a name, a dict or a Queue)"
        )
    if not isinstance(name, str) or not name:
        raise ImproperlyConfigured(f"task_queues: a queue needs a name: {item!r}")
    exchange: Any = get("exchange")
    routing_key = get("routing_key")
    _refuse_unsupported(name, item, get)
    exchange_durable = get("exchange_durable")
    exchange_auto_delete = get("exchange_auto_delete")
    if exchange is not None and not isinstance(exchange, str):
        exchange_type = exchange_type or getattr(exchange, "type", None)
        exchange_durable = getattr(exchange, "durable", None)
        exchange_auto_delete = getattr(exchange, "auto_delete", None)
    exchange_name = _name_of(exchange)
    try:
        arguments = declared_arguments(item)
    except TypeError as exc:
        raise ImproperlyConfigured(f"task_queues: queue {name!r}: {exc}") from None
    exclusive = _flag(name, "exclusive", get("exclusive"), False)
    return QueueSpec(
        name,
        name if exchange_name is None else exchange_name,
        exchange_type or default_type,
        routing_key or name,
        durable=_flag(name, "durable", get("durable"), True),
        exclusive=exclusive,
        auto_delete=_flag(name, "auto_delete", get("auto_delete"), False) or exclusive,
        arguments=arguments or None,
        exchange_durable=_flag(name, "exchange durable", exchange_durable, True),
        exchange_auto_delete=_flag(name, "exchange auto_delete", exchange_auto_delete, False),
    )


def queue_table(conf: Settings) -> dict[str, QueueSpec]:
    """The queues of ``task_queues`` by name; with none configured, the default queue
    (``task_default_queue`` on ``task_default_exchange`` with
    ``task_default_routing_key``)."""
    default_type = conf["task_default_exchange_type"]
    queues = conf["task_queues"]
    if not queues:
        name = conf["task_default_queue"]
        return {
            name: QueueSpec(
                name, conf.task_default_exchange, default_type, conf.task_default_routing_key
            )
        }
    if isinstance(queues, Mapping):
        items: Iterable[Any] = [
            {"name": name, **dict(options or {})} for name, options in queues.items()
        ]
    else:
        items = queues
    table: dict[str, QueueSpec] = {}
    for item in items:
        spec = _queue_spec(item, default_type)
        table[spec.name] = spec
    return table


RouterFunc = Callable[..., Any]


class Router:
    """Routes task names to :class:`Route` using one app's settings."""

    def __init__(self, conf: Settings) -> None:
        self.routers = _prepare(conf["task_routes"])
        self.queues = queue_table(conf)
        #: A quorum queue is configured: ETA tasks use Celery's native delayed delivery.
        self.quorum = any(
            (spec.arguments or {}).get("x-queue-type") == "quorum" for spec in self.queues.values()
        ) or (
            conf.get("task_default_queue_type") == "quorum"
            and conf["task_default_queue"] in self.queues
        )
        self.create_missing: bool = conf["task_create_missing_queues"]
        self.default_queue: str = conf["task_default_queue"]
        #: True when the route depends only on the task name (no router functions).
        self.static = all(isinstance(router, MapRoute) for router in self.routers)
        self._cache: dict[str, Route] = {}

    def queue(self, name: str) -> QueueSpec:
        """The queue called ``name``; created on demand with
        ``task_create_missing_queues`` (a direct exchange of the same name)."""
        spec = self.queues.get(name)
        if spec is None:
            if not self.create_missing:
                raise QueueNotFound(f"Queue {name!r} missing from task_queues")
            spec = QueueSpec(name, name, "direct", name)
        return spec

    def for_name(self, name: str, task: Any = None) -> Route:
        """The route of ``name`` with no call options; cached when :attr:`static`."""
        route = self._cache.get(name)
        if route is None:
            route = self.route(name, task=task)
            if self.static:
                self._cache[name] = route
        return route

    def lookup(
        self,
        name: str,
        args: Any = (),
        kwargs: Any = None,
        options: Mapping[str, Any] | None = None,
        task: Any = None,
    ) -> dict[str, Any]:
        """The first route the routers give, as a dict (``{}`` when none)."""
        for router in self.routers:
            if isinstance(router, MapRoute):
                found = router(name)
            elif hasattr(router, "route_for_task"):
                found = router.route_for_task(name, args, kwargs)
            else:
                found = router(name, args, kwargs or {}, dict(options or {}), task=task)
            if found is not None:
                if isinstance(found, str):
                    return {"queue": found}
                if isinstance(found, Mapping):
                    return dict(found)
                if _name_of(found):
                    return {"queue": found}
                raise ImproperlyConfigured(f"task_routes: bad route {found!r} for {name!r}")
        return {}

    def route(
        self,
        name: str,
        args: Any = (),
        kwargs: Any = None,
        options: Mapping[str, Any] | None = None,
        task: Any = None,
    ) -> Route:
        """Where ``name`` goes. ``options`` (``queue``, ``exchange``, ``routing_key``,
        ``priority``) override what the routers say."""
        found = self.lookup(name, args, kwargs, options, task) if self.routers else {}
        if options:
            for key in ("queue", "exchange", "routing_key", "priority"):
                value = options.get(key)
                if value is not None:
                    found[key] = value
        queue = found.get("queue") or self.default_queue
        queue_name = _name_of(queue)
        if not queue_name:
            raise ImproperlyConfigured(f"task_routes: bad queue {queue!r} for {name!r}")
        spec = self.queue(queue_name) if isinstance(queue, str) else _queue_spec(queue, "direct")
        exchange = _name_of(found.get("exchange"))
        routing_key = found.get("routing_key")
        exchange_type = spec.exchange_type
        priority = found.get("priority")
        if (not exchange or not routing_key) and exchange_type == "direct":
            return Route(queue_name, None, None, priority)
        if exchange is None:
            exchange = spec.exchange
            routing_key = routing_key or spec.routing_key
        return Route(queue_name, exchange, routing_key or "", priority)
