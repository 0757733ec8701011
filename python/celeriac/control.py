"""Remote control, the client's end (docs/wire.md §6): kombu's pidbox ``Mailbox``.

Requests are broadcast on the fanout exchange ``celery.pidbox``; a worker answers on
the direct exchange ``reply.celery.pidbox`` with routing key = the client's ``oid``,
body ``{nodename: result}`` and header ``ticket``. Redis and AMQP brokers.

The worker's end is in ``celeriac.worker.control`` (the command table and its
handlers) and ``celeriac.worker.pidbox`` (the node's mailbox and the prefork links).
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celeriac._core import DecodeError, Mailbox, loads
from celeriac.conf import setting

if TYPE_CHECKING:
    from celeriac.conf import BrokerApp

__all__ = [
    "PIDBOX",
    "REPLY",
    "Control",
    "LamportClock",
    "broadcast",
    "matches",
    "node_clock",
    "open_mailbox",
]

PIDBOX = "celery.pidbox"
REPLY = "reply.celery.pidbox"


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


#: This process's clock, ticked by every message it sends.
node_clock = LamportClock()


def open_mailbox(app: BrokerApp) -> Any:
    """A new broker connection for pidbox messages (the caller closes it)."""
    timeout = float(setting(app.conf, "broker_connection_timeout"))
    expires = setting(app.conf, "control_queue_expires")
    ttl = setting(app.conf, "control_queue_ttl")
    return Mailbox(
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
    app: BrokerApp,
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
    mailbox, shared = _client_mailbox(app) if keep else (open_mailbox(app), False)
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
            headers={"clock": next(node_clock), "expires": time.time() + timeout},
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
                result = loads(data)
            except DecodeError:
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


def _client_mailbox(app: BrokerApp) -> tuple[Any, bool]:
    """A mailbox for a client: ``(mailbox, kept)``; kept ones are not to be closed."""
    url = str(app.broker_url)
    if not url.startswith(("amqp", "pyamqp")):
        return open_mailbox(app), False
    key = (os.getpid(), url, repr(sorted(app.transport_options().items())))
    with _clients_lock:
        mailbox = _clients.get(key)
        if mailbox is None:
            mailbox = _clients[key] = open_mailbox(app)
    return mailbox, True


def _forget(mailbox: Any) -> None:
    with _clients_lock:
        for key in [key for key, kept in _clients.items() if kept is mailbox]:
            del _clients[key]
    with contextlib.suppress(Exception):
        mailbox.close()


class Control:
    """``app.control``: Celery's remote-control client (commands: ``celeriac.worker.control``).

    ``broadcast`` returns the replies (``[{nodename: reply}, ...]``) when ``reply``,
    else None, as Celery's does."""

    def __init__(self, app: BrokerApp) -> None:
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


#: Worker-side names that lived here before the split, by the module that has them now.
_MOVED = {
    "celeriac.worker.control": (
        "COMMANDS",
        "Command",
        "command",
        "visible",
        "revoked_ids",
        "ok",
        "nok",
    ),
    "celeriac.worker.pidbox": ("Pidbox", "ChildLinks", "serve_child", "CHILD_TIMEOUT"),
}


def __getattr__(name: str) -> Any:
    """The worker's end, read through this module by older code (``control.Pidbox``,
    ``control.COMMANDS``, a handler such as ``control.ping``)."""
    import importlib

    for module_name, names in _MOVED.items():
        module = importlib.import_module(module_name)
        if name in names or (module_name.endswith(".control") and name in module.COMMANDS):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
