"""Remote control (celery-wire §6): kombu's pidbox ``Mailbox``, both ends.

Requests are broadcast on the fanout exchange ``celery.pidbox``; a worker answers on
the direct exchange ``reply.celery.pidbox`` with routing key = the client's ``oid``,
body ``{nodename: result}`` and header ``ticket``. Redis and AMQP brokers.

Commands live in one table, ``COMMANDS``: add one with the ``@command`` decorator
(a function of the node's ``Pidbox`` and the request's arguments). In a prefork
worker the supervisor holds the mailbox and answers once for the node; each command's
``scope`` says what its children do:

- ``node``: the supervisor answers alone (``ping``, ``registered``, ``shutdown``...);
- ``all``: the supervisor applies it (so children forked later inherit it) and so does
  every child; the reply is the supervisor's, or ``merge(own, children's)``;
- ``merge``: every child answers and ``merge(own, children's)`` makes the reply
  (default: the lists joined, as ``active``/``reserved``).

Children are reached through a socket pair each (``ChildLinks``); a child serves it
from a thread (``serve_child``), so it answers while a task runs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from celeriac import _core
from celeriac.app import transport_of
from celeriac.conf import DEFAULTS, parse_rate_limit

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.worker.prefork import Supervisor
    from celeriac.worker.worker import Worker

__all__ = [
    "COMMANDS",
    "PIDBOX",
    "REPLY",
    "ChildLinks",
    "Command",
    "Control",
    "Pidbox",
    "broadcast",
    "command",
]

logger = logging.getLogger("celeriac.control")

PIDBOX = "celery.pidbox"
REPLY = "reply.celery.pidbox"
#: How long the supervisor waits for its children's answers.
CHILD_TIMEOUT = 0.5


class LamportClock:
    """The node's logical clock (Celery's ``app.clock``): ``next(clock)`` ticks it;
    ``adjust(other)`` moves it past a value another node sent (mingle's replies).
    No lock, so a prefork child forked at any moment never inherits one held: each
    step is one GIL-atomic call and only the mingle thread adjusts."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def __iter__(self) -> LamportClock:
        return self

    def __next__(self) -> int:
        return next(self._count)

    def adjust(self, other: int) -> int:
        """``max(ours, other) + 1``, the clock's new value."""
        value = next(self._count)
        if other >= value:
            value = other + 1
            self._count = itertools.count(value + 1)
        return value


_clock = LamportClock()


def _conf(app: Any, name: str, default: Any) -> Any:
    conf = getattr(app, "conf", None)
    try:
        value = conf[name] if conf is not None else None
    except (KeyError, TypeError):
        value = None
    return default if value is None else value


def _mailbox(app: Celeriac) -> Any:
    timeout = float(_conf(app, "broker_connection_timeout", 4.0) or 4.0)
    expires = _conf(app, "control_queue_expires", 10.0)
    ttl = _conf(app, "control_queue_ttl", 300.0)
    return _core.Mailbox(
        app.broker_url,
        transport_options=app.transport_options(),
        connect_timeout=timeout,
        queue_expires=float(expires) if expires else None,
        queue_ttl=float(ttl) if ttl else None,
    )


def matches(nodename: str, body: Mapping[str, Any]) -> bool:
    """Whether a request is for ``nodename`` (destination, else pattern, else all)."""
    destination = body.get("destination")
    if destination:
        return nodename in destination
    pattern, matcher = body.get("pattern"), body.get("matcher")
    if pattern and matcher:
        if matcher == "pcre":
            try:
                return re.match(str(pattern), nodename) is not None
            except re.error:
                return False
        return fnmatch.fnmatch(nodename, str(pattern))
    return True


# -- client ---------------------------------------------------------------------------


def broadcast(
    app: Celeriac,
    command: str,
    arguments: Mapping[str, Any] | None = None,
    *,
    destination: list[str] | None = None,
    reply: bool = True,
    timeout: float = 1.0,
    limit: int | None = None,
    keep: bool = True,
) -> list[dict[str, Any]]:
    """Send ``command`` to the workers; with ``reply``, the replies that came within
    ``timeout`` seconds (``[{nodename: result}, ...]``).

    On AMQP the connection is kept for the next call (per process and broker, as
    kombu's producer pool does); elsewhere connecting is cheap and each call has its
    own. ``keep=False``: a connection of its own on AMQP too, closed after (a worker's
    mingle, so nothing stays open for the children it forks later)."""
    oid = str(uuid.uuid4())
    queue = f"{oid}.{REPLY}"
    ticket = str(uuid.uuid4())
    body: dict[str, Any] = {
        "method": command,
        "arguments": dict(arguments or {}),
        "destination": destination,
        "pattern": None,
        "matcher": None,
    }
    if reply:
        body["ticket"] = ticket
        body["reply_to"] = {"exchange": REPLY, "routing_key": oid}
    if limit is None and destination:
        limit = len(destination)
    mailbox, shared = _client_mailbox(app) if keep else (_mailbox(app), False)
    if reply:
        try:
            mailbox.bind(REPLY, oid, queue)
        except Exception:
            if not shared:
                mailbox.close()
                raise
            # The kept connection went away (broker restart): once more on a new one.
            _forget(mailbox)
            mailbox, shared = _client_mailbox(app)
            mailbox.bind(REPLY, oid, queue)
    replies: list[dict[str, Any]] = []
    try:
        mailbox.publish(
            PIDBOX,
            "",
            body,
            headers={"clock": next(_clock), "expires": time.time() + timeout},
            exchange_type="fanout",
        )
        deadline = time.monotonic() + timeout
        while reply and (limit is None or len(replies) < limit):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got = mailbox.pop(queue, min(left, 0.25))
            if got is None:
                continue
            headers, data = got
            if headers is None or headers.get("ticket") != ticket:
                continue
            try:
                result = _core.loads(data)
            except _core.DecodeError:
                continue
            if isinstance(result, dict):
                replies.append(result)
    except Exception:
        if shared:
            _forget(mailbox)
        raise
    finally:
        if reply:
            with contextlib.suppress(Exception):
                mailbox.unbind(REPLY, oid, queue)
        if not shared:
            mailbox.close()
    return replies


_clients: dict[tuple[int, str, str], Any] = {}
_clients_lock = threading.Lock()


def _client_mailbox(app: Celeriac) -> tuple[Any, bool]:
    """A mailbox for a client: ``(mailbox, kept)``; kept ones are not to be closed."""
    url = str(app.broker_url)
    if not url.startswith(("amqp", "pyamqp")):
        return _mailbox(app), False
    key = (os.getpid(), url, repr(sorted(app.transport_options().items())))
    with _clients_lock:
        mailbox = _clients.get(key)
        if mailbox is None:
            mailbox = _clients[key] = _mailbox(app)
    return mailbox, True


def _forget(mailbox: Any) -> None:
    with _clients_lock:
        for key in [key for key, kept in _clients.items() if kept is mailbox]:
            del _clients[key]
    with contextlib.suppress(Exception):
        mailbox.close()


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


def _join(own: Any, children: list[Any]) -> Any:
    """Merge for list replies: every child's items in turn."""
    joined: list[Any] = []
    for part in children:
        if isinstance(part, list):
            joined.extend(part)
    return joined


def _union(own: Any, children: list[Any]) -> Any:
    """Merge for dict replies keyed by task id (``query_task``)."""
    merged: dict[str, Any] = {}
    for part in children:
        if isinstance(part, dict):
            merged.update(part)
    return merged


# -- the node's end -------------------------------------------------------------------


class Pidbox:
    """A worker's mailbox: a thread that answers the requests for ``worker``.

    With ``supervisor`` (prefork) it answers for the node and reaches the children
    through ``links``."""

    def __init__(self, worker: Worker, supervisor: Supervisor | None = None) -> None:
        self.worker = worker
        self.nodename = worker.nodename
        self.supervisor = supervisor
        self.links: ChildLinks | None = None
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._mailbox: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._mailbox = _mailbox(self.worker.app)
            self._mailbox.subscribe(PIDBOX, f"{self.nodename}.{PIDBOX}")
        except ValueError as exc:
            # A broker URL the mailbox cannot use: a setting to fix, not a fault here.
            logger.info("Remote control is off: %s", exc)
            self._mailbox = None
            return
        except Exception as exc:
            logger.warning("Remote control is off: %s", exc)
            self._mailbox = None
            return
        self._thread = threading.Thread(target=self._run, name="pidbox", daemon=True)
        self._thread.start()
        if self._mingles():
            from celeriac.worker import mingle

            mingle.start(self)

    def _mingles(self) -> bool:
        """Whether this node says hello to the others (at start, and again after its
        mailbox lost the broker: revokes sent in between were missed)."""
        options = getattr(self.worker, "options", None)
        # Celery mingles on RabbitMQ and Redis only. On the SQLite file it would also
        # hold a connection in a thread while prefork children are forked, and SQLite's
        # in-process lock state does not survive fork() (the children found it locked).
        on_sqlite = transport_of(self.worker.app.broker_url) == "sqlite"
        return bool(getattr(options, "mingle", False)) and not on_sqlite

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        if self._mailbox is not None:
            self._mailbox.close()

    def _run(self) -> None:
        resubscribed = self._mailbox.resubscriptions
        while not self._stop.is_set():
            try:
                got = self._mailbox.receive(0.2)
            except Exception as exc:
                logger.warning("pidbox: %s", exc)
                return
            if self._mailbox.resubscriptions != resubscribed:
                resubscribed = self._mailbox.resubscriptions
                self._reconnected()
            if got is not None:
                try:
                    self.handle(*got)
                except Exception:  # never let one request end remote control
                    logger.exception("pidbox: could not handle a request")

    def _reconnected(self) -> None:
        """The mailbox is back after a lost connection: mingle again, as Celery's
        consumer does when it restarts after a connection loss."""
        logger.info("pidbox: reconnected to %s", self.worker.app.broker_url_masked)
        if self._mingles():
            from celeriac.worker import mingle

            mingle.start(self)

    def handle(self, headers: Any, data: Any) -> None:
        """Answer one request; a malformed one is logged and dropped."""
        if headers is None:
            logger.warning("pidbox: dropped a malformed message: %s", data)
            return
        try:
            body = _core.loads(data)
        except _core.DecodeError as exc:
            logger.warning("pidbox: dropped a message that is not JSON: %s", exc)
            return
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            logger.warning("pidbox: dropped a message without a method: %r", body)
            return
        if not matches(self.nodename, body):
            return
        method = body["method"]
        result = self.dispatch(method, body.get("arguments") or {})
        reply_to, ticket = body.get("reply_to"), body.get("ticket")
        if ticket and isinstance(reply_to, dict) and result is not _NO_REPLY:
            try:
                self._mailbox.publish(
                    str(reply_to.get("exchange") or REPLY),
                    str(reply_to.get("routing_key") or ""),
                    {self.nodename: result},
                    headers={"ticket": ticket, "clock": next(_clock)},
                    exchange_type="direct",
                )
            except Exception as exc:
                logger.warning("pidbox: cannot reply to %s: %s", method, exc)

    def dispatch(self, method: str, arguments: Any) -> Any:
        """Run ``method`` here (and in the children, by its scope): the reply."""
        found = COMMANDS.get(method)
        if found is None:
            logger.warning("pidbox: no such control command: %s", method)
            return nok(repr(KeyError(method)))  # what Celery replies
        if not isinstance(arguments, dict):
            return nok(f"arguments must be a mapping, not {arguments!r}")
        own = run_handler(found, self, arguments)
        if self.links is None or found.scope == "node":
            return own
        children = self.links.ask(method, arguments)
        if found.merge is not None:
            return found.merge(own, children)
        if found.scope == "merge":
            return _join(own, children)
        return own


#: A handler's result when no reply must be sent (``shutdown``).
_NO_REPLY: Any = object()


def run_handler(found: Command, box: Pidbox, arguments: dict[str, Any]) -> Any:
    try:
        return found.handler(box, arguments)
    except Exception as exc:
        logger.error("pidbox command error: %r", exc, exc_info=True)
        return nok(repr(exc))


# -- prefork: the supervisor's links to its children ----------------------------------


class ChildLinks:
    """One socket pair per prefork child, by slot index. The supervisor asks its
    children over them; each child answers from a thread (``serve_child``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: One ``ask`` at a time (the pidbox and mingle threads both ask): each reads
        #: its answers off the shared sockets and would drop the other's.
        self._asking = threading.Lock()
        self._parent: dict[int, socket.socket] = {}
        self._seq = itertools.count(1)

    def before_fork(self, index: int) -> socket.socket:
        """Make the pair for the child about to be forked into slot ``index``; the
        child's end is returned (the parent closes it after the fork)."""
        with self._lock:
            old = self._parent.pop(index, None)
            if old is not None:
                old.close()
            parent, child = socket.socketpair()
            self._parent[index] = parent
        return child

    def after_fork_child(self, worker: Worker, end: socket.socket) -> None:
        """In the new child: keep its own ``end`` only and serve it from a thread."""
        for sock in self._parent.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._parent.clear()
        thread = threading.Thread(
            target=serve_child, args=(Pidbox(worker), end), name="pidbox-child", daemon=True
        )
        thread.start()

    def detach(self, index: int) -> None:
        """The child of slot ``index`` is gone."""
        with self._lock:
            sock = self._parent.pop(index, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        with self._lock:
            for sock in self._parent.values():
                sock.close()
            self._parent.clear()

    def ask(self, method: str, arguments: dict[str, Any]) -> list[Any]:
        """Every live child's answer to ``method`` (those that answer in time)."""
        with self._asking:
            return self._ask(method, arguments)

    def _ask(self, method: str, arguments: dict[str, Any]) -> list[Any]:
        with self._lock:
            socks = list(self._parent.values())
            seq = next(self._seq)
        line = (json.dumps({"seq": seq, "method": method, "arguments": arguments}) + "\n").encode()
        waiting = []
        for sock in socks:
            try:
                sock.sendall(line)
                waiting.append(sock)
            except OSError:
                continue
        answers: list[Any] = []
        deadline = time.monotonic() + CHILD_TIMEOUT
        for sock in waiting:
            answer = _read_answer(sock, seq, deadline)
            if answer is not None:
                answers.append(answer[0])
        return answers


def _read_answer(sock: socket.socket, seq: int, deadline: float) -> tuple[Any] | None:
    buffer = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (OSError, TimeoutError):
            return None
        if not chunk:
            return None
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("seq") == seq:
                return (message.get("result"),)
            # an answer that came too late for an earlier request: skip it


def serve_child(box: Pidbox, sock: socket.socket) -> None:
    """A prefork child's end: answer the supervisor's requests until it goes away."""
    try:
        with sock, sock.makefile("rb") as reader:
            for line in reader:
                _answer(box, sock, line)
    except OSError:
        return  # the supervisor is gone


def _answer(box: Pidbox, sock: socket.socket, line: bytes) -> None:
    try:
        request = json.loads(line)
        found = COMMANDS.get(str(request.get("method")))
        arguments = request.get("arguments") or {}
        result = (
            run_handler(found, box, arguments)
            if found is not None and isinstance(arguments, dict)
            else None
        )
        if result is _NO_REPLY:
            result = None
        data = json.dumps({"seq": request.get("seq"), "result": result}, default=repr)
    except Exception:
        logger.exception("pidbox: could not answer the supervisor")
        return
    sock.sendall(data.encode() + b"\n")


# -- commands ---------------------------------------------------------------------------


@command(kind="inspect")
def ping(box: Pidbox, args: dict[str, Any]) -> Any:
    return ok("pong")


@command(kind="inspect")
def clock(box: Pidbox, args: dict[str, Any]) -> Any:
    return {"clock": next(_clock)}


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


@command(kind="inspect", scope="merge", merge=_union)
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
    """Celery's ``stats()["broker"]``: the connection's parameters, no password."""
    url = str(app.broker_url)
    parts = urlsplit(url)
    scheme = parts.scheme or url.split(":", 1)[0]
    transport = {"pyamqp": "amqp", "amqps": "amqp", "rediss": "redis"}.get(scheme, scheme)
    try:
        port = parts.port
    except ValueError:
        port = None
    vhost = unquote(parts.path[1:]) if parts.path.startswith("/") else parts.path
    options = dict(_conf(app, "broker_transport_options", {}) or {})
    return {
        "hostname": parts.hostname,
        "userid": unquote(parts.username) if parts.username else None,
        "virtual_host": vhost or ("/" if transport == "amqp" else "0"),
        "port": port,
        "insist": False,
        "ssl": scheme in ("amqps", "rediss"),
        "transport": transport,
        "connect_timeout": _conf(app, "broker_connection_timeout", 4.0),
        "transport_options": options,
        "login_method": "PLAIN" if transport == "amqp" else None,
        "uri_prefix": None,
        "heartbeat": _conf(app, "broker_heartbeat", 120.0) if transport == "amqp" else 0,
        "failover_strategy": "round-robin",
        "alternates": [],
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
        "clock": str(next(_clock)),
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
    return _NO_REPLY


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
            "durable": True,
            "passive": False,
            "auto_delete": False,
            "delivery_mode": None,
            "no_declare": False,
        },
        "routing_key": attr("routing_key", name),
        "queue_arguments": attr("queue_arguments", None),
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
        if isinstance(value, str) and "://" in value:
            try:
                value = _core.mask_url(value)
            except Exception:
                value = "********"
        elif _SECRET.search(key) and value:
            value = "********"
        table[key] = _jsonable(value)
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


class Control:
    """``app.control``: Celery's remote-control client, for the commands above.

    ``broadcast`` returns the replies (``[{nodename: reply}, ...]``) when ``reply``,
    else None, as Celery's does."""

    def __init__(self, app: Celeriac) -> None:
        self.app = app

    def broadcast(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        destination: list[str] | None = None,
        connection: Any = None,
        reply: bool = False,
        timeout: float = 1.0,
        limit: int | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]] | None:
        replies = broadcast(
            self.app,
            command,
            arguments,
            destination=destination,
            reply=reply,
            timeout=timeout,
            limit=limit,
        )
        return replies if reply else None

    def revoke(
        self,
        task_id: str | list[str],
        destination: list[str] | None = None,
        terminate: bool = False,
        signal: str | int | None = "SIGTERM",
        **kwargs: Any,
    ) -> list[dict[str, Any]] | None:
        """Every worker discards ``task_id`` (or each id of a list); with
        ``terminate`` a running one is stopped with ``signal``."""
        arguments = {"task_id": task_id, "terminate": terminate, "signal": signal}
        return self.broadcast("revoke", arguments, destination, **kwargs)

    def terminate(
        self,
        task_id: str | list[str],
        destination: list[str] | None = None,
        signal: str | int | None = "SIGTERM",
        **kwargs: Any,
    ) -> list[dict[str, Any]] | None:
        return self.revoke(task_id, destination, terminate=True, signal=signal, **kwargs)


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
        return {"revoked": [], "clock": next(_clock)}
    store.purge()  # nothing expired goes out
    return {"revoked": list(store), "clock": next(_clock)}


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
