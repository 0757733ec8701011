"""Remote control, the worker's end: the command table and its handlers.

Commands live in one table, ``COMMANDS``: add one with the ``@command`` decorator
(a function of the node's ``Pidbox`` and the request's arguments). In a prefork
worker the supervisor holds the mailbox and answers once for the node; each command's
``scope`` says what its children do:

- ``node``: the supervisor answers alone (``ping``, ``registered``, ``shutdown``...);
- ``all``: the supervisor applies it (so children forked later inherit it) and so does
  every child; the reply is the supervisor's, or ``merge(own, children's)``;
- ``merge``: every child answers and ``merge(own, children's)`` makes the reply
  (default: the lists joined, as ``active``/``reserved``).

The mailbox that receives them is ``celeriac.worker.pidbox``; the client that sends
them is ``celeriac.control``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from celeriac import _core
from celeriac.conf import DEFAULTS, parse_rate_limit, setting
from celeriac.control import node_clock

if TYPE_CHECKING:
    from celeriac.worker.pidbox import Pidbox
    from celeriac.worker.worker import Worker

__all__ = ["COMMANDS", "NO_REPLY", "Command", "command", "run_handler", "visible"]

logger = logging.getLogger("celeriac.control")

# -- the command table ----------------------------------------------------------------

Handler = Callable[["Pidbox", dict[str, Any]], Any]
Merge = Callable[[Any, list[Any]], Any]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    #: ``inspect`` (asks) or ``control`` (changes something): for the CLI.
    kind: str = "control"
    #: What a prefork worker's children do (see the module docstring).
    scope: str = "node"
    merge: Merge | None = None


#: Every command a celeriac worker answers, by name.
COMMANDS: dict[str, Command] = {}


def command(
    name: str | None = None,
    *,
    kind: str = "control",
    scope: str = "node",
    merge: Merge | None = None,
) -> Callable[[Handler], Handler]:
    """Register a remote-control command (``@command(kind="inspect", scope="merge")``)."""

    def register(handler: Handler) -> Handler:
        key = name or handler.__name__
        COMMANDS[key] = Command(key, handler, kind, scope, merge)
        return handler

    return register


def ok(text: str) -> dict[str, str]:
    return {"ok": text}


def nok(text: str) -> dict[str, str]:
    return {"error": text}


def join_lists(own: Any, children: list[Any]) -> Any:
    """Merge for list replies: every child's items in turn."""
    joined: list[Any] = []
    for part in children:
        if isinstance(part, list):
            joined.extend(part)
    return joined


def union_dicts(own: Any, children: list[Any]) -> Any:
    """Merge for dict replies keyed by task id (``query_task``)."""
    merged: dict[str, Any] = {}
    for part in children:
        if isinstance(part, dict):
            merged.update(part)
    return merged


#: A handler's result when no reply must be sent (``shutdown``).
NO_REPLY: Any = object()


def run_handler(found: Command, box: Pidbox, arguments: dict[str, Any]) -> Any:
    try:
        return found.handler(box, arguments)
    except Exception as exc:
        logger.error("pidbox command error: %r", exc, exc_info=True)
        return nok(repr(exc))


# -- commands ---------------------------------------------------------------------------


@command(kind="inspect")
def ping(box: Pidbox, args: dict[str, Any]) -> Any:
    return ok("pong")


@command(kind="inspect")
def clock(box: Pidbox, args: dict[str, Any]) -> Any:
    return {"clock": next(node_clock)}


DEFAULT_TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")


@command(kind="inspect")
def registered(box: Pidbox, args: dict[str, Any]) -> Any:
    items = args.get("taskinfoitems") or DEFAULT_TASK_INFO_ITEMS
    if isinstance(items, str):
        items = [items]
    items = [item for item in items if isinstance(item, str) and not item.startswith("_")]
    tasks = box.worker.app.tasks
    names = []
    for name in sorted(tasks):
        if name.startswith("celery.") and not args.get("builtins"):
            continue
        task = tasks[name]
        fields = [
            f"{item}={getattr(task, item)}"
            for item in items
            if getattr(task, item, None) is not None
        ]
        names.append(f"{name} [{' '.join(fields)}]" if fields else name)
    return names


def _info(request: Any, hostname: str, safe: bool = False) -> dict[str, Any]:
    delivery = request.delivery
    args, kwargs = delivery.args, delivery.kwargs
    if safe:
        args, kwargs = repr(args), repr(kwargs)
    return {
        "id": request.id,
        "name": request.name,
        "args": args,
        "kwargs": kwargs,
        "type": request.name,
        "hostname": hostname,
        "time_start": request.time_start,
        "acknowledged": not request.acks_late,
        "delivery_info": {
            "exchange": delivery.exchange,
            "routing_key": delivery.routing_key,
            "priority": delivery.priority,
            "redelivered": delivery.redelivered,
        },
        "worker_pid": os.getpid(),
    }


def _running(worker: Worker) -> list[Any]:
    return list(getattr(worker, "running", []))


def _reserved(worker: Worker) -> list[Any]:
    return list(getattr(worker, "reserved", []))


def _scheduled(worker: Worker) -> list[Any]:
    """Requests held for their ETA (not those held for a rate limit)."""
    held = getattr(worker, "eta", None)
    items = held.items() if held is not None and hasattr(held, "items") else []
    return [request for request in items if not getattr(request, "rate_held", False)]


@command(kind="inspect", scope="merge")
def active(box: Pidbox, args: dict[str, Any]) -> Any:
    safe = bool(args.get("safe"))
    return [_info(request, box.nodename, safe) for request in _running(box.worker)]


@command(kind="inspect", scope="merge")
def reserved(box: Pidbox, args: dict[str, Any]) -> Any:
    # Celery's "reserved" are the prefetched requests not yet running, including those
    # held for a rate limit.
    held = getattr(box.worker, "eta", None)
    rate_held = [
        request
        for request in (held.items() if held is not None and hasattr(held, "items") else [])
        if getattr(request, "rate_held", False)
    ]
    return [_info(request, box.nodename) for request in _reserved(box.worker) + rate_held]


@command(kind="inspect", scope="merge")
def scheduled(box: Pidbox, args: dict[str, Any]) -> Any:
    return [
        {
            "eta": request.eta.isoformat() if request.eta else None,
            "priority": request.delivery.priority or 0,
            "request": _info(request, box.nodename),
        }
        for request in _scheduled(box.worker)
    ]


@command(kind="inspect", scope="merge", merge=union_dicts)
def query_task(box: Pidbox, args: dict[str, Any]) -> Any:
    ids = args.get("ids") or []
    if isinstance(ids, str):
        ids = [ids]
    wanted = {str(task_id) for task_id in ids}
    found: dict[str, Any] = {}
    worker = box.worker
    for state, requests in (
        ("active", _running(worker)),
        ("reserved", _reserved(worker)),
        ("scheduled", _scheduled(worker)),
    ):
        for request in requests:
            if request.id in wanted and request.id not in found:
                found[request.id] = [state, _info(request, box.nodename)]
    return found


_RUSAGE_FIELDS = (
    *("utime", "stime", "maxrss", "ixrss", "idrss", "isrss", "minflt", "majflt"),
    *("nswap", "inblock", "oublock", "msgsnd", "msgrcv", "nsignals", "nvcsw", "nivcsw"),
)


def _rusage() -> dict[str, Any]:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    names = _RUSAGE_FIELDS
    return {name: getattr(usage, f"ru_{name}") for name in names}


def _broker_info(app: Any) -> dict[str, Any]:
    """Celery's ``stats()["broker"]``: the connection's parameters, no password. For a
    failover list, the first host's, and every entry masked in ``alternates`` (kombu
    lists them with their passwords)."""
    entries = [entry.strip() for entry in str(app.broker_url).split(";")]
    url = entries[0]
    parts = urlsplit(url)
    scheme = parts.scheme or url.split(":", 1)[0]
    transport = {"pyamqp": "amqp", "amqps": "amqp", "rediss": "redis"}.get(scheme, scheme)
    try:
        port = parts.port
    except ValueError:
        port = None
    vhost = unquote(parts.path[1:]) if parts.path.startswith("/") else parts.path
    options = _censored(dict(setting(app.conf, "broker_transport_options") or {}))
    return {
        "hostname": parts.hostname,
        "userid": unquote(parts.username) if parts.username else None,
        "virtual_host": vhost or ("/" if transport == "amqp" else "0"),
        "port": port,
        "insist": False,
        "ssl": scheme in ("amqps", "rediss"),
        "transport": transport,
        "connect_timeout": setting(app.conf, "broker_connection_timeout"),
        "transport_options": options,
        "login_method": "PLAIN" if transport == "amqp" else None,
        "uri_prefix": None,
        "heartbeat": setting(app.conf, "broker_heartbeat") if transport == "amqp" else 0,
        "failover_strategy": setting(app.conf, "broker_failover_strategy") or "round-robin",
        "alternates": [_core.mask_url(entry) for entry in entries] if len(entries) > 1 else [],
    }


def _sum_totals(own: Any, children: list[Any]) -> Any:
    """Merge for ``stats`` in prefork: the supervisor's view, children's totals summed."""
    if not isinstance(own, dict):
        return own
    total: dict[str, int] = {}
    for part in children:
        if isinstance(part, dict):
            for name, count in (part.get("total") or {}).items():
                total[name] = total.get(name, 0) + int(count)
    own["total"] = total
    return own


@command(kind="inspect", scope="merge", merge=_sum_totals)
def stats(box: Pidbox, args: dict[str, Any]) -> Any:
    worker = box.worker
    pool_name = worker.pool_name
    supervisor = box.supervisor
    processes = sorted(supervisor.children) if supervisor is not None else [os.getpid()]
    timeouts: list[Any] = []
    if pool_name == "prefork":
        timeouts = [worker.soft_time_limit or 0, worker.time_limit or 0]
    implementation = {
        "prefork": "celeriac.worker.prefork:Supervisor",
        "threads": "celeriac.worker.pool:ThreadPool",
        "solo": "celeriac.worker.pool:SoloPool",
    }.get(pool_name, f"celeriac:{pool_name}")
    concurrency = supervisor.concurrency if supervisor is not None else worker.concurrency
    window = worker.window * (concurrency if pool_name == "prefork" else 1)
    return {
        "total": dict(getattr(worker, "totals", {})),
        "pid": os.getpid(),
        "clock": str(next(node_clock)),
        "uptime": int(time.monotonic() - box.started),
        "pool": {
            "implementation": implementation,
            "max-concurrency": concurrency,
            "processes": processes,
            "max-tasks-per-child": worker.max_tasks_per_child or "N/A",
            "put-guarded-by-semaphore": False,
            "timeouts": timeouts,
        },
        "broker": _broker_info(worker.app),
        "prefetch_count": window,
        "rusage": _rusage(),
    }


@command(kind="control", scope="all")
def rate_limit(box: Pidbox, args: dict[str, Any]) -> Any:
    name = str(args.get("task_name") or "")
    value = args.get("rate_limit")
    try:
        parse_rate_limit(value)
    except (ValueError, TypeError) as exc:
        return nok(f"Invalid rate limit string: {exc!r}")
    task = box.worker.app.tasks.get(name)
    if task is None:
        logger.error("Rate limit attempt for unknown task %s", name)
        return nok("unknown task")
    task.rate_limit = value or None
    box.worker.refresh_rate_limit(name, task)
    if not value:
        logger.info("Rate limits disabled for tasks of type %s", name)
        return ok("rate limit disabled successfully")
    logger.info("New rate limit for tasks of type %s: %s.", name, value)
    return ok("new rate limit set successfully")


def _limit(value: Any, what: str) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)
    if number != number or number < 0:
        raise ValueError(f"{what} time limit must be a number of seconds >= 0, not {value!r}")
    return number or None


@command(kind="control", scope="all")
def time_limit(box: Pidbox, args: dict[str, Any]) -> Any:
    name = str(args.get("task_name") or "")
    task = box.worker.app.tasks.get(name)
    if task is None:
        logger.error("Change time limit attempt for unknown task %s", name)
        return nok("unknown task")
    soft = _limit(args.get("soft"), "soft")
    hard = _limit(args.get("hard"), "hard")
    task.soft_time_limit = soft
    task.time_limit = hard
    logger.info("New time limits for tasks of type %s: soft=%s hard=%s", name, soft, hard)
    return ok("time limits set successfully")


@command(kind="control")
def shutdown(box: Pidbox, args: dict[str, Any]) -> Any:
    logger.warning(str(args.get("msg") or "Got shutdown from remote"))
    # A warm shutdown, as for SIGTERM; as in Celery no reply is sent.
    os.kill(os.getpid(), signal.SIGTERM)
    return NO_REPLY


def _events_toggle(box: Pidbox, enable: bool) -> Any:
    dispatcher = getattr(box.worker, "events", None)
    if dispatcher is None:
        return nok("event dispatcher unavailable")
    if bool(dispatcher.enabled) == enable:
        return ok(f"task events already {'enabled' if enable else 'disabled'}")
    dispatcher.enabled = enable
    box.worker.task_events = enable
    logger.info("Events of group {task} %s by remote.", "enabled" if enable else "disabled")
    return ok(f"task events {'enabled' if enable else 'disabled'}")


@command(kind="control", scope="all")
def enable_events(box: Pidbox, args: dict[str, Any]) -> Any:
    return _events_toggle(box, True)


@command(kind="control", scope="all")
def disable_events(box: Pidbox, args: dict[str, Any]) -> Any:
    return _events_toggle(box, False)


@command(kind="control")
def heartbeat(box: Pidbox, args: dict[str, Any]) -> Any:
    logger.debug("Heartbeat requested by remote.")
    heart = getattr(box.worker, "heart", None)
    if heart is not None:
        from celeriac.events import worker_fields

        active_count, processed = heart.counts()
        heart.dispatcher.send("worker-heartbeat", **worker_fields(5, active_count, processed))
    return None


def _pool_resize(box: Pidbox, args: dict[str, Any], grow: bool) -> Any:
    verb = "grow" if grow else "shrink"
    supervisor = box.supervisor
    if supervisor is None:
        # Celery's solo and threads pools cannot resize either: the same error.
        raise AttributeError(f"'TaskPool' object has no attribute '{verb}'")
    n = int(args.get("n", 1) or 1)
    if n < 1:
        return nok(f"n must be at least 1, not {n}")
    supervisor.resize(n if grow else -n)
    return ok(f"pool will {verb}")


@command(kind="control")
def pool_grow(box: Pidbox, args: dict[str, Any]) -> Any:
    return _pool_resize(box, args, True)


@command(kind="control")
def pool_shrink(box: Pidbox, args: dict[str, Any]) -> Any:
    return _pool_resize(box, args, False)


def _no_queue_name(command: str, args: dict[str, Any]) -> dict[str, str]:
    given = args.get("queue")
    if given is None:
        return nok(f"{command} needs a queue name")
    return nok(f"{command} needs a queue name, not {given!r}")


def _queue_name(args: dict[str, Any]) -> str | None:
    queue = args.get("queue")
    if not isinstance(queue, str) or not queue.strip():
        return None
    return queue


@command(kind="control", scope="all")
def add_consumer(box: Pidbox, args: dict[str, Any]) -> Any:
    queue = _queue_name(args)
    if queue is None:
        return _no_queue_name("add_consumer", args)
    exchange, routing_key = args.get("exchange"), args.get("routing_key")
    if (exchange not in (None, "", queue)) or (routing_key not in (None, "", queue)):
        logger.warning(
            "add_consumer %s: consuming it with its default binding (exchange %r and "
            "routing key %r are not declared)",
            queue,
            exchange,
            routing_key,
        )
    worker = box.worker
    if queue not in worker.queues:
        consumer = worker.consumer
        if consumer is not None:  # None: a prefork supervisor, or not connected yet
            consumer.add_queue(queue)
        # A new list: consumers made later (reconnects, prefork children) read it.
        worker.queues = [*worker.queues, queue]
        logger.info("Started consuming from %s", queue)
    return ok(f"add consumer {queue}")


@command(kind="control", scope="all")
def cancel_consumer(box: Pidbox, args: dict[str, Any]) -> Any:
    queue = _queue_name(args)
    if queue is None:
        return _no_queue_name("cancel_consumer", args)
    worker = box.worker
    logger.info("Canceling queue %s", queue)
    worker.queues = [q for q in worker.queues if q != queue]
    consumer = worker.consumer
    if consumer is not None:
        consumer.cancel_queue(queue)
    return ok(f"no longer consuming from {queue}")


@command(kind="inspect")
def active_queues(box: Pidbox, args: dict[str, Any]) -> Any:
    app = box.worker.app
    known: Mapping[str, Any] = {}
    with contextlib.suppress(Exception):
        known = app.queues
    return [_queue_as_dict(name, known.get(name)) for name in box.worker.queues]


def _arguments(spec: Any) -> Any:
    arguments = getattr(spec, "arguments", None)
    return dict(arguments) if isinstance(arguments, Mapping) and arguments else None


def _queue_as_dict(name: str, spec: Any) -> dict[str, Any]:
    """kombu's ``Queue.as_dict(recurse=True)`` for a consumed queue."""

    def attr(key: str, default: Any) -> Any:
        if isinstance(spec, Mapping):
            return spec.get(key, default)
        return getattr(spec, key, default) if spec is not None else default

    exchange = attr("exchange", name)
    exchange_name = getattr(exchange, "name", exchange) if exchange is not None else name
    exchange_type = getattr(exchange, "type", None) or attr("exchange_type", "direct")
    return {
        "name": name,
        "exchange": {
            "name": exchange_name,
            "type": exchange_type,
            "arguments": None,
            "durable": attr("exchange_durable", True),
            "passive": False,
            "auto_delete": attr("exchange_auto_delete", False),
            "delivery_mode": None,
            "no_declare": False,
        },
        "routing_key": attr("routing_key", name),
        "queue_arguments": attr("queue_arguments", None) or _arguments(spec),
        "binding_arguments": None,
        "consumer_arguments": None,
        "durable": attr("durable", True),
        "exclusive": attr("exclusive", False),
        "auto_delete": attr("auto_delete", False),
        "no_ack": False,
        "alias": None,
        "bindings": [],
        "no_declare": None,
        "expires": None,
        "message_ttl": None,
        "max_length": None,
        "max_length_bytes": None,
        "max_priority": None,
    }


_SECRET = re.compile(r"API|TOKEN|KEY|SECRET|PASS|SIGNATURE|DATABASE", re.IGNORECASE)


def _censored(table: Mapping[Any, Any]) -> dict[Any, Any]:
    """``table`` as Celery's ``inspect conf`` shows settings, at every depth: the value
    of a key that names a secret (``password``, ``sentinel_kwargs``' too) as
    ``********``, a URL with its password masked."""
    return {key: _censor(key, value) for key, value in table.items()}


def _censor(key: Any, value: Any) -> Any:
    if isinstance(value, Mapping):
        return _censored(value)
    if isinstance(key, str) and _SECRET.search(key) and value:
        return "********"
    if isinstance(value, str) and "://" in value:
        try:
            return _core.mask_url(value)
        except Exception:
            return "********"
    if isinstance(value, (list, tuple)):
        return [_censor(None, item) for item in value]
    return value


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return repr(value)


@command(kind="inspect")
def conf(box: Pidbox, args: dict[str, Any]) -> Any:
    with_defaults = args.get("with_defaults")
    if isinstance(with_defaults, str):
        with_defaults = with_defaults.strip().lower() in ("1", "true", "yes", "on")
    settings = box.worker.app.conf
    table: dict[str, Any] = {}
    for key in settings:
        if not isinstance(key, str) or key.startswith("__"):
            continue
        value = settings[key]
        if not with_defaults and key in DEFAULTS and DEFAULTS[key] == value:
            continue
        table[key] = _jsonable(_censor(key, value))
    return table


# -- revoke (the worker's side lives in celeriac.worker: Worker.revoke) ----------------


def _merge_terminated(own: Any, children: list[Any]) -> Any:
    """A prefork node's ``revoke`` reply: the supervisor stops sync tasks, each child
    its coroutines; ``terminate:`` lists every task stopped."""
    stopped: list[str] = []
    for part in [own, *children]:
        text = part.get("ok") if isinstance(part, dict) else None
        if isinstance(text, str) and text.startswith("terminate: ") and "unknown" not in text:
            stopped += [i for i in text[len("terminate: ") :].split(", ") if i not in stopped]
    if stopped:
        return ok("terminate: " + ", ".join(stopped))
    return own


@command(kind="control", scope="all", merge=_merge_terminated)
def revoke(box: Pidbox, args: dict[str, Any]) -> Any:
    return box.worker.revoke(args.get("task_id"), bool(args.get("terminate")), args.get("signal"))


@command(kind="control", scope="all", merge=_merge_terminated)
def terminate(box: Pidbox, args: dict[str, Any]) -> Any:
    return box.worker.revoke(args.get("task_id"), True, args.get("signal"))


@command(kind="inspect")
def revoked(box: Pidbox, args: dict[str, Any]) -> Any:
    return list(box.worker.revoked)


# -- Celery's other commands, for mixed fleets ------------------------------------------


def revoked_ids(value: Any) -> tuple[list[str], int] | None:
    """The task ids in a ``hello``'s or its reply's ``revoked``, and how many entries
    were not ids (not a non-empty string). A list (Celery 5.7, celeriac) or a mapping
    keyed by id (older Celery sent its ``LimitedSet``'s data); None for anything else."""
    if isinstance(value, Mapping):
        value = list(value)
    elif not isinstance(value, list):
        return None
    ids = [task_id for task_id in value if isinstance(task_id, str) and task_id]
    return ids, len(value) - len(ids)


@command(kind="inspect", scope="all")
def hello(box: Pidbox, args: dict[str, Any]) -> Any:
    """Mingle: a worker starting up (Celery's, or celeriac's: ``celeriac.worker.mingle``)
    sends its revoked ids and asks for ours and our clock. In prefork every child takes
    the ids too; only the supervisor's reply is sent, so a child builds none."""
    from_node = args.get("from_node")
    if from_node == box.nodename:
        return None  # our own start-up hello
    store = getattr(box.worker, "revoked", None)
    in_child = getattr(box.worker, "child", None) is not None
    if not in_child:
        logger.info("sync with %s", from_node)
    theirs = revoked_ids(args.get("revoked"))
    if store is not None and theirs is not None and theirs[0]:
        store.merge(theirs[0])
    if in_child:
        return None
    if store is None:
        return {"revoked": [], "clock": next(node_clock)}
    store.purge()  # nothing expired goes out
    return {"revoked": list(store), "clock": next(node_clock)}


@command(kind="control")
def autoscale(box: Pidbox, args: dict[str, Any]) -> Any:
    raise ValueError("Autoscale not enabled")  # what Celery says without --autoscale


@command(kind="control")
def pool_restart(box: Pidbox, args: dict[str, Any]) -> Any:
    raise ValueError("Pool restarts not enabled")


@command(kind="inspect")
def report(box: Pidbox, args: dict[str, Any]) -> Any:
    import platform

    worker = box.worker
    return ok(
        f"software -> celeriac:{_core.__version__} (celery protocol 2) "
        f"py:{platform.python_version()}\n"
        f"platform -> system:{platform.system()} arch:{platform.machine()}\n"
        f"pool -> {worker.pool_name} concurrency:{worker.concurrency}\n"
        f"broker -> {_core.mask_url(str(worker.app.broker_url))}"
    )


def visible(kind: str) -> list[str]:
    """The names of the commands of ``kind`` (``inspect``/``control``), for the CLI."""
    return sorted(name for name, found in COMMANDS.items() if found.kind == kind)
