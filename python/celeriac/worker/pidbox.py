"""The worker's mailbox (``Pidbox``) and, in prefork, the supervisor's links to its
children (``ChildLinks``).

Children are reached through a socket pair each; a child serves it from a thread
(``serve_child``), so it answers while a task runs. The commands themselves are in
``celeriac.worker.control``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from celeriac import _core
from celeriac.app import transport_of
from celeriac.control import PIDBOX, REPLY, matches, node_clock, open_mailbox
from celeriac.worker import mingle
from celeriac.worker.control import COMMANDS, NO_REPLY, join_lists, nok, run_handler

if TYPE_CHECKING:
    from celeriac.worker.prefork import Supervisor
    from celeriac.worker.worker import Worker

__all__ = ["CHILD_TIMEOUT", "ChildLinks", "Pidbox", "serve_child"]

logger = logging.getLogger("celeriac.control")

#: How long the supervisor waits for its children's answers.
CHILD_TIMEOUT = 0.5

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
        self._minglers: list[threading.Thread] = []

    def start(self) -> None:
        try:
            self._mailbox = open_mailbox(self.worker.app)
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
        self._mingle()

    def _mingle(self) -> None:
        if self._mingles():
            self._minglers = [*(t for t in self._minglers if t.is_alive()), mingle.start(self)]

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
        # A mingle thread waits for replies inside the extension with the GIL released;
        # left running, the interpreter's exit would end it there (pthread_exit).
        for mingler in self._minglers:
            mingler.join(mingle.REPLY_WAIT + 1.0)
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
        self._mingle()

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
        if ticket and isinstance(reply_to, dict) and result is not NO_REPLY:
            try:
                self._mailbox.publish(
                    str(reply_to.get("exchange") or REPLY),
                    str(reply_to.get("routing_key") or ""),
                    {self.nodename: result},
                    headers={"ticket": ticket, "clock": next(node_clock)},
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
            return join_lists(own, children)
        return own


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
        if result is NO_REPLY:
            result = None
        data = json.dumps({"seq": request.get("seq"), "result": result}, default=repr)
    except Exception:
        logger.exception("pidbox: could not answer the supervisor")
        return
    sock.sendall(data.encode() + b"\n")
