"""Remote control (celery-wire §6): kombu's pidbox ``Mailbox``, both ends.

Requests are broadcast on the fanout exchange ``celery.pidbox``; a worker answers on
the direct exchange ``reply.celery.pidbox`` with routing key = the client's ``oid``,
body ``{nodename: result}`` and header ``ticket``. Redis brokers only for now.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celeriac import _core
from celeriac.conf import parse_rate_limit

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.worker.worker import Worker

__all__ = ["PIDBOX", "REPLY", "Pidbox", "broadcast"]

logger = logging.getLogger("celeriac.control")

PIDBOX = "celery.pidbox"
REPLY = "reply.celery.pidbox"

_clock = itertools.count(1)


def _mailbox(app: Celeriac) -> Any:
    conf = getattr(app, "conf", None)
    timeout = float(getattr(conf, "broker_connection_timeout", None) or 4.0)
    return _core.Mailbox(
        app.broker_url, transport_options=app.transport_options(), connect_timeout=timeout
    )


def matches(nodename: str, body: Mapping[str, Any]) -> bool:
    """Whether a request is for ``nodename`` (destination, else pattern, else all)."""
    destination = body.get("destination")
    if destination:
        return nodename in destination
    pattern, matcher = body.get("pattern"), body.get("matcher")
    if pattern and matcher:
        if matcher == "pcre":
            return re.match(str(pattern), nodename) is not None
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
) -> list[dict[str, Any]]:
    """Send ``command`` to the workers; with ``reply``, the replies that came within
    ``timeout`` seconds (``[{nodename: result}, ...]``)."""
    mailbox = _mailbox(app)
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
        mailbox.bind(REPLY, oid, queue)
    if limit is None and destination:
        limit = len(destination)
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
        while reply and time.monotonic() < deadline and (limit is None or len(replies) < limit):
            got = mailbox.pop(queue)
            if got is None:
                time.sleep(0.02)
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
    finally:
        if reply:
            mailbox.unbind(REPLY, oid, queue)
        mailbox.close()
    return replies


# -- worker ---------------------------------------------------------------------------


class Pidbox:
    """A worker's mailbox: a thread that answers the requests for ``worker``."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.nodename = worker.nodename
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._mailbox: Any = None
        self._thread: threading.Thread | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": lambda args: {"ok": "pong"},
            "registered": self.registered,
            "active": self.active,
            "stats": self.stats,
            "rate_limit": self.rate_limit,
            "clock": lambda args: {"clock": next(_clock)},
        }

    def start(self) -> None:
        try:
            self._mailbox = _mailbox(self.worker.app)
            self._mailbox.subscribe(PIDBOX)
        except ValueError as exc:
            # A broker we have no mailbox for yet (AMQP, SQLite): expected, not a fault.
            logger.info("Remote control is off: %s", exc)
            self._mailbox = None
            return
        except Exception as exc:
            logger.warning("Remote control is off: %s", exc)
            self._mailbox = None
            return
        self._thread = threading.Thread(target=self._run, name="pidbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._mailbox is not None:
            self._mailbox.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self._mailbox.receive(0.2)
            except Exception as exc:
                logger.warning("pidbox: %s", exc)
                return
            if got is not None:
                self.handle(*got)

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
        arguments = body.get("arguments") or {}
        handler = self._handlers.get(method)
        if handler is None:
            logger.warning("pidbox: no such control command: %s", method)
            result: Any = {"error": repr(KeyError(method))}  # what Celery replies
        elif not isinstance(arguments, dict):
            result = {"error": f"arguments must be a mapping, not {arguments!r}"}
        else:
            try:
                result = handler(arguments)
            except Exception as exc:
                logger.exception("pidbox command %s failed", method)
                result = {"error": repr(exc)}
        reply_to, ticket = body.get("reply_to"), body.get("ticket")
        if ticket and isinstance(reply_to, dict):
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

    # -- commands ---------------------------------------------------------------------

    def registered(self, args: dict[str, Any]) -> list[str]:
        names = []
        for name, task in sorted(self.worker.app.tasks.items()):
            if name.startswith("celery."):
                continue
            rate = getattr(task, "rate_limit", None)
            names.append(f"{name} [rate_limit={rate}]" if rate else name)
        return names

    def active(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [_info(request, self.nodename) for request in list(self.worker.running)]

    def stats(self, args: dict[str, Any]) -> dict[str, Any]:
        worker = self.worker
        try:
            import resource

            usage = resource.getrusage(resource.RUSAGE_SELF)
            rusage: dict[str, Any] = {
                "utime": usage.ru_utime,
                "stime": usage.ru_stime,
                "maxrss": usage.ru_maxrss,
            }
        except ImportError:  # pragma: no cover - not POSIX
            rusage = {}
        return {
            "total": dict(worker.totals),
            "pid": os.getpid(),
            "clock": str(next(_clock)),
            "uptime": int(time.monotonic() - self.started),
            "pool": {
                "implementation": f"celeriac:{worker.pool_name}",
                "max-concurrency": worker.concurrency,
                "processes": [os.getpid()],
                "max-tasks-per-child": worker.max_tasks_per_child or "N/A",
                "put-guarded-by-semaphore": False,
                "timeouts": [worker.soft_time_limit or 0, worker.time_limit or 0],
            },
            "broker": {"transport": worker.app.broker_url.split(":", 1)[0]},
            "prefetch_count": worker.window,
            "rusage": rusage,
        }

    def rate_limit(self, args: dict[str, Any]) -> dict[str, str]:
        name = str(args.get("task_name") or "")
        value = args.get("rate_limit")
        task = self.worker.app.tasks.get(name)
        if task is None:
            return {"error": "unknown task"}
        try:
            parse_rate_limit(value)
        except (ValueError, TypeError) as exc:
            return {"error": f"Invalid rate limit string: {exc}"}
        task.rate_limit = value or None
        self.worker.refresh_rate_limit(name, task)
        if not value:
            return {"ok": "rate limit disabled successfully"}
        return {"ok": "new rate limit set successfully"}


def _info(request: Any, hostname: str) -> dict[str, Any]:
    delivery = request.delivery
    return {
        "id": request.id,
        "name": request.name,
        "args": delivery.args,
        "kwargs": delivery.kwargs,
        "type": request.name,
        "hostname": hostname,
        "time_start": getattr(request, "time_start", None),
        "acknowledged": not request.acks_late,
        "delivery_info": {
            "exchange": delivery.exchange,
            "routing_key": delivery.routing_key,
            "priority": delivery.priority,
            "redelivered": delivery.redelivered,
        },
        "worker_pid": os.getpid(),
    }
