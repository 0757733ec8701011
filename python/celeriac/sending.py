"""The send path of an app: ``send_task`` and what ``apply_async`` calls, from the
task's cached defaults and the options given to the one ``Producer.send`` call (or to a
batch for ``apply_async_many``), and ``task_always_eager``'s run in this process.

Functions of the app (its settings, router and producer): ``Celeriac.send_task`` and
``Task.apply_async`` call them, the latter directly (one call less per message).
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celeriac import signals as _signals
from celeriac._core import DELAYED_DELIVERY_EXCHANGE, SEND_OPTIONS, delayed_routing_key, uuid4
from celeriac.exceptions import AlwaysEagerIgnored, ImproperlyConfigured
from celeriac.local import get_current_worker_task
from celeriac.result import AsyncResult as _AsyncResult
from celeriac.serialization import check_compression, check_serializer
from celeriac.serialization import dumps as _serialize
from celeriac.serialization import loads as _deserialize
from celeriac.task_options import DispatchDefaults
from celeriac.transports import AMQP_SCHEMES, scheme_of
from celeriac.utils.nodenames import client_origin

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.routes import Route
    from celeriac.task import Task as _Task

_UTC = datetime.timezone.utc
logger = logging.getLogger(__name__)

# Send options that apply_async builds itself (dates, routing, limits, links, encodings).
_BUILT_OPTIONS = frozenset(
    {
        "eta", "expires", "expiration", "priority", "exchange", "routing_key", "timelimit",
        "shadow", "ignore_result", "headers", "callbacks", "errbacks", "delivery_mode",
        "serializer", "compression",
    }
)  # fmt: skip
# apply_async option -> Producer.send option: every other send option passes as it is
# (the names are listed once, in src/protocol/send.rs), and Celery's alias group_id.
_PASSED_OPTIONS = {name: name for name in SEND_OPTIONS if name not in _BUILT_OPTIONS}
_PASSED_OPTIONS["group_id"] = "group"
_DELIVERY_MODES = {"persistent": 2, "transient": 1, 1: 1, 2: 2}


def _iso(value: datetime.datetime | str) -> str:
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=_UTC)
    return value.isoformat()


def _parse_iso(value: str) -> datetime.datetime:
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    parsed = datetime.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=_UTC)


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    return float(value)


def _signature_list(name: str, value: Any) -> list[Any] | None:
    items = value if isinstance(value, (list, tuple)) else [value]
    found: list[Any] = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, Mapping):
            found.append(dict(item))
        elif callable(getattr(item, "as_dict", None)):
            found.append(item.as_dict())
        else:
            raise TypeError(f"{name} must be a signature (a dict), not {item!r}")
    return found or None


def send_task(
    app: Celeriac,
    name: str,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> _AsyncResult[Any]:
    """Send a task by name (it need not be registered here); takes the same
    options as ``apply_async``. ``task_always_eager`` does not apply."""
    if args is None:
        args = ()
    elif not isinstance(args, (list, tuple)):
        raise TypeError(f"task args must be a list or tuple, not {type(args).__name__}")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, Mapping):
        raise TypeError(f"task keyword arguments must be a mapping, not {type(kwargs).__name__}")
    if app.conf["task_always_eager"]:
        warnings.warn(
            AlwaysEagerIgnored("task_always_eager has no effect on send_task"), stacklevel=3
        )
    pop = options.pop
    return send_task_message(
        app,
        app.tasks.get(name),
        name,
        args,
        kwargs,
        pop("task_id", None),
        pop("countdown", None),
        pop("eta", None),
        pop("expires", None),
        pop("queue", None),
        pop("priority", None),
        pop("headers", None),
        pop("ignore_result", None),
        pop("routing_key", None),
        pop("exchange", None),
        pop("shadow", None),
        pop("time_limit", None),
        pop("soft_time_limit", None),
        pop("link", None),
        pop("link_error", None),
        options,
        False,
    )


def dispatch_defaults(app: Celeriac, task: _Task[Any, Any] | None, name: str) -> DispatchDefaults:
    conf = app.conf
    app.load_annotations()
    router = app.router
    version = conf._version
    confirm = bool((conf["broker_transport_options"] or {}).get("confirm_publish"))
    if task is None:
        defaults = DispatchDefaults(
            conf,
            version,
            router.for_name(name) if router.static else None,
            None,
            None,
            None,
            False,
            None,
            False,
            confirm,
            check_serializer("task_serializer", conf["task_serializer"]),
            check_compression("task_compression", conf["task_compression"]),
        )
        app.name_defaults[name] = defaults
        return defaults
    route: Route | None = None
    if router.static:
        options = {"queue": task.queue, "exchange": task.exchange}
        options["routing_key"] = task.routing_key
        if any(value is not None for value in options.values()):
            route = router.route(name, options=options, task=task)
        else:
            route = router.for_name(name, task)
    hard = task.time_limit
    soft = task.soft_time_limit
    serializer = check_serializer(
        "serializer" if "serializer" in task.__dict__ else "task_serializer", task.serializer
    )
    defaults = DispatchDefaults(
        conf,
        version,
        route,
        task.priority,
        conf["task_time_limit"] if hard is None else hard,
        conf["task_soft_time_limit"] if soft is None else soft,
        bool(task.ignore_result),
        task.expires,
        bool(conf["task_always_eager"]),
        confirm,
        serializer,
        check_compression("task_compression", conf["task_compression"]),
    )
    object.__setattr__(task, "dispatch_defaults", defaults)
    return defaults


def send_task_message(
    app: Celeriac,
    task: _Task[Any, Any] | None,
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    task_id: str | None,
    countdown: float | None,
    eta: datetime.datetime | str | None,
    expires: Any,
    queue: Any,
    priority: int | None,
    headers: Mapping[str, Any] | None,
    ignore_result: bool | None,
    routing_key: str | None,
    exchange: Any,
    shadow: str | None,
    time_limit: float | None,
    soft_time_limit: float | None,
    link: Any,
    link_error: Any,
    options: dict[str, Any],
    eager_ok: bool = True,
    batch: list[Any] | None = None,
) -> _AsyncResult[Any]:
    """The one path every message takes: route, build the few options that were
    given, and hand everything to ``Producer.send``. With ``batch`` (from
    ``Task.apply_async_many``), nothing is sent: ``(queue, options, static route,
    parent, confirm_publish, ignore_result)`` is appended for the caller to send."""
    conf = app.conf
    defaults = task.dispatch_defaults if task is not None else app.name_defaults.get(name)
    if defaults is None or defaults.version != conf._version or defaults.conf is not conf:
        defaults = dispatch_defaults(app, task, name)
    if defaults.eager and eager_ok and task is not None:
        return _apply_eager(
            task, args, kwargs, task_id, priority, headers, ignore_result,
            time_limit, soft_time_limit, link, link_error, options,
        )  # fmt: skip
    if task_id is None:
        task_id = uuid4()
    opts: dict[str, Any] = {}
    if defaults.serializer != "json":
        opts["serializer"] = defaults.serializer
    if defaults.compression:
        opts["compression"] = defaults.compression

    route = defaults.route
    if route is None or queue is not None or exchange is not None or routing_key is not None:
        route_options: dict[str, Any] = {
            "queue": queue,
            "exchange": exchange,
            "routing_key": routing_key,
            "priority": priority,
        }
        if task is not None:
            for key in ("queue", "exchange", "routing_key"):
                if route_options[key] is None:
                    route_options[key] = getattr(task, key)
        if options:
            route_options.update({k: v for k, v in options.items() if k not in route_options})
        route = app.router.route(name, args, kwargs, route_options, task)
    if route.exchange is not None:
        opts["exchange"] = route.exchange
        opts["routing_key"] = route.routing_key

    if priority is None:
        priority = defaults.priority
        if priority is None:
            priority = route.priority
    if priority is not None:
        opts["priority"] = priority

    if countdown:
        eta = app.now() + datetime.timedelta(seconds=_seconds("countdown", countdown))
    if eta is not None:
        opts["eta"] = _iso(eta)
        if app.router.quorum:
            _delay_natively(app, route, opts, countdown, eta)
    if expires is None:
        expires = defaults.expires
    if expires is not None:
        _set_expires(app, opts, expires)

    if time_limit is None:
        time_limit = defaults.time_limit
    elif isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)):
        raise ValueError(f"time_limit must be a number of seconds, not {time_limit!r}")
    if soft_time_limit is None:
        soft_time_limit = defaults.soft_time_limit
    elif isinstance(soft_time_limit, bool) or not isinstance(soft_time_limit, (int, float)):
        raise ValueError(f"soft_time_limit must be a number of seconds, not {soft_time_limit!r}")
    if time_limit is not None or soft_time_limit is not None:
        if (time_limit is not None and time_limit < 0) or (
            soft_time_limit is not None and soft_time_limit < 0
        ):
            raise ValueError("time limits must not be negative")
        if time_limit and soft_time_limit and soft_time_limit > time_limit:
            raise ValueError("soft_time_limit must be less than or equal to time_limit")
        opts["timelimit"] = (time_limit, soft_time_limit)

    if ignore_result is None:
        ignore_result = defaults.ignore_result
    if ignore_result:
        opts["ignore_result"] = True
    if headers:
        opts["headers"] = dict(headers)
    if shadow:
        opts["shadow"] = shadow
    if link is not None:
        callbacks = _signature_list("link", link)
        if callbacks:
            opts["callbacks"] = callbacks
    if link_error is not None:
        errbacks = _signature_list("link_error", link_error)
        if errbacks:
            opts["errbacks"] = errbacks
    add_to_parent = _extra_options(options, opts) if options else True

    parent = None
    if "parent_id" not in opts or "root_id" not in opts:
        parent = get_current_worker_task()
        if parent is not None:
            request = parent.request
            opts.setdefault("root_id", request.root_id or request.id)
            opts.setdefault("parent_id", request.id)
            if "priority" not in opts and conf["task_inherit_parent_priority"]:
                inherited = (request.delivery_info or {}).get("priority")
                if inherited is not None:
                    opts["priority"] = inherited

    if _signals.before_task_publish.receivers:
        _signals.send_before_publish(app, name, task_id, args, kwargs, route.queue, opts)
    if batch is not None:
        parent = parent if add_to_parent else None
        static = route is defaults.route
        batch.append((route.queue, opts, static, parent, defaults.confirm_publish, ignore_result))
        return _AsyncResult(task_id, app=app, task_name=name)
    producer = app.producer
    producer.send(name, task_id, args, kwargs, route.queue, opts or None)
    declared = app.declared_queues
    if defaults.confirm_publish or (declared is not None and route.queue not in declared):
        # broker_transport_options={"confirm_publish": True}: return only once the
        # broker has the message (OperationalError after broker_connection_timeout).
        # The first message to an AMQP queue too: its declaration is checked then (a
        # queue that exists with other arguments raises ImproperlyConfigured).
        try:
            producer.flush(float(conf["broker_connection_timeout"]))
        except ValueError as exc:  # the queue exists with other arguments
            raise ImproperlyConfigured(str(exc)) from None
        if declared is not None:
            declared.add(route.queue)
    if _signals.after_task_publish.receivers:
        _signals.send_after_publish(name, task_id, args, kwargs, route.queue, opts)
    if conf["task_send_sent_event"]:
        send_sent_event(app, name, task_id, args, kwargs, route.queue, opts)

    result: _AsyncResult[Any] = _AsyncResult(task_id, app=app, task_name=name)
    if ignore_result:
        result.ignored = True
    if parent is not None and add_to_parent:
        parent.add_trail(result)
    return result


def send_sent_event(
    app: Celeriac,
    name: str,
    task_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    queue: str,
    opts: Mapping[str, Any],
) -> None:
    """Celery's ``task-sent`` event (docs/wire.md §5.3), from ``gen<pid>@host``."""
    from celeriac.events import EventDispatcher

    events = app.client_events
    if events is None or events.pid != os.getpid():
        events = app.client_events = EventDispatcher(app, client_origin())
    events.send(
        "task-sent",
        uuid=task_id,
        root_id=opts.get("root_id", task_id),
        parent_id=opts.get("parent_id"),
        name=name,
        args=opts.get("argsrepr") or repr(args)[:1024],
        kwargs=opts.get("kwargsrepr") or repr(kwargs)[:1024],
        retries=opts.get("retries", 0),
        eta=opts.get("eta"),
        expires=opts.get("expires"),
        queue=queue,
        exchange=opts.get("exchange", ""),
        routing_key=opts.get("routing_key", queue),
    )


def _delay_natively(
    app: Celeriac,
    route: Route,
    opts: dict[str, Any],
    countdown: float | None,
    eta: datetime.datetime | str,
) -> None:
    """Celery 5.5+'s native delayed delivery: with a quorum queue among the app's queues
    on RabbitMQ, a task for a queue on a topic or fanout exchange is published to
    ``celery_delayed_27`` with the delay in its routing key, and waits in the broker's
    ``celery_delayed_*`` queues rather than in a worker (docs/wire.md §2.4). The ``eta``
    header is kept: the worker holds the message for what is left of a second."""
    if scheme_of(app.broker_url) not in AMQP_SCHEMES:
        return
    spec = app.router.queues.get(route.queue)
    if spec is None or spec.exchange_type == "direct":
        # Celery's warning, word for word in substance.
        logger.warning(
            "Direct exchanges are not supported with native delayed delivery. %s is a "
            "direct exchange but should be a topic exchange or a fanout exchange in order "
            "for native delayed delivery to work properly. If quorum queues are used, this "
            "task may block the worker process until the ETA arrives.",
            spec.exchange if spec is not None else route.queue,
        )
        return
    if countdown:
        delay = float(countdown)
    else:
        at = _parse_iso(eta) if isinstance(eta, str) else eta
        if at.tzinfo is None:
            at = at.replace(tzinfo=_UTC)
        delay = (at - app.now()).total_seconds()
    # A delay in the past (or none) is sent to the queue at once, as Celery does; so is
    # one under a second (Celery raises ValueError for it: int(delay) is 0).
    if delay < 1:
        return
    opts["exchange"] = DELAYED_DELIVERY_EXCHANGE
    opts["routing_key"] = delayed_routing_key(int(delay), spec.routing_key)


def _set_expires(app: Celeriac, opts: dict[str, Any], expires: Any) -> None:
    now = app.now()
    if isinstance(expires, datetime.datetime):
        at = expires if expires.tzinfo is not None else expires.replace(tzinfo=_UTC)
    elif isinstance(expires, str):
        try:
            at = _parse_iso(expires)
        except ValueError:
            raise ValueError(f"expires {expires!r} is not an ISO-8601 date") from None
    else:
        at = now + datetime.timedelta(seconds=_seconds("expires", expires))
    opts["expires"] = at.isoformat()
    opts["expiration"] = max(0, int((at - now).total_seconds() * 1000))


def _extra_options(options: Mapping[str, Any], opts: dict[str, Any]) -> bool:
    """Copy the less common ``apply_async`` options into ``opts``; returns
    ``add_to_parent``."""
    add_to_parent = True
    for key, value in options.items():
        target = _PASSED_OPTIONS.get(key)
        if target is not None:
            if value is not None:
                opts[target] = value
        elif key == "add_to_parent":
            add_to_parent = bool(value)
        elif key == "delivery_mode":
            if value is not None:
                try:
                    opts["delivery_mode"] = _DELIVERY_MODES[value]
                except (KeyError, TypeError):
                    raise ValueError(
                        f"delivery_mode must be 1, 2, 'transient' or 'persistent', not {value!r}"
                    ) from None
        elif key == "serializer":
            if value is not None:
                # JSON is the producer's default: the option is left out for it.
                opts["serializer"] = check_serializer(key, value)
                if opts["serializer"] == "json":
                    del opts["serializer"]
        elif key == "compression" and value:
            opts["compression"] = check_compression(key, value)
        # Anything else (retry, retry_policy, producer, connection, mandatory...)
        # is a kombu publishing knob with no meaning here, ignored as Celery would.
    return add_to_parent


def _apply_eager(
    task: _Task[Any, Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    task_id: str | None,
    priority: int | None,
    headers: Mapping[str, Any] | None,
    ignore_result: bool | None,
    time_limit: float | None,
    soft_time_limit: float | None,
    link: Any,
    link_error: Any,
    options: dict[str, Any],
) -> _AsyncResult[Any]:
    # Round-trip the arguments through the serializer, as a worker would get them.
    serializer = check_serializer(
        "serializer", options.get("serializer") or task.serializer or "json"
    )
    args, kwargs = _deserialize(serializer, _serialize(serializer, [list(args), dict(kwargs)]))
    extra = {
        key: value
        for key, value in options.items()
        if key in ("group_id", "group_index", "root_id", "parent_id")
    }
    return task.apply(
        args,
        kwargs,
        link=link,
        link_error=link_error,
        task_id=task_id,
        headers=dict(headers) if headers else None,
        priority=priority,
        ignore_result=ignore_result,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        **extra,
    )
