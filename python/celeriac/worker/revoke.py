"""Revoked task ids: a bounded set per process, and how a revoked task is recorded.

``app.control.revoke(id)`` is a broadcast; each worker keeps the ids it heard in
memory (as Celery does: nothing is stored in the broker) and discards a message whose
id is revoked when it arrives, or when it is about to run. A message it already holds
(for its ETA or a rate limit, or reserved for a free slot) is discarded at once: taken
out of the timer by the remote-control thread, then stored REVOKED, announced
(``task-revoked``) and acked by the worker loop, which owns the consumer (in prefork,
by the child holding it: each child hears every revoke). ``RevokedSet`` is that
memory: insertion-ordered, at most ``worker_revoked_ids_max`` ids, each forgotten after
``REVOKE_EXPIRES`` seconds (Celery's ``LimitedSet`` limits: 50,000 and 3 hours).

In prefork the supervisor holds the node's mailbox and passes each revoke on to every
child (remote control's ``scope="all"``); a child forked later inherits the
supervisor's ``RevokedSet`` through the fork. A running task is stopped by the
supervisor (sync tasks: it signals the child, see ``prefork.py``) or by the child's
event loop (``async def`` tasks: the coroutine is cancelled).

A worker starting up asks the others for theirs (mingle, ``celeriac.worker.mingle``)
and ``merge``s them, so an id revoked before it started is known to it too.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from celeriac import states
from celeriac.exceptions import TaskRevokedError
from celeriac.result import exception_to_meta, meta_for

if TYPE_CHECKING:
    from celeriac._core import Backend
    from celeriac.worker.request import Request

logger = logging.getLogger("celeriac.worker.revoke")

#: Seconds a revoked id is remembered (Celery's ``REVOKE_EXPIRES``).
REVOKE_EXPIRES = 10800.0
#: Default for ``worker_revoked_ids_max`` (Celery's ``REVOKES_MAX``).
REVOKES_MAX = 50000


class RevokedSet:
    """Revoked task ids, oldest first; ``terminate`` records whether the revoke asked
    for the running task to be stopped too (and with which signal)."""

    def __init__(self, maxlen: int = REVOKES_MAX, expires: float = REVOKE_EXPIRES) -> None:
        self.maxlen = maxlen
        self.expires = expires
        #: id -> (time added, signal number to terminate with, 0 = do not terminate);
        #: read it to test for emptiness cheaply, change it through ``add``.
        self.ids: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def __bool__(self) -> bool:
        return bool(self.ids)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self.ids))

    def __contains__(self, task_id: object) -> bool:
        if not isinstance(task_id, str):
            return False
        entry = self.ids.get(task_id)
        if entry is None:
            return False
        if time.time() - entry[0] > self.expires:
            with self._lock:
                self.ids.pop(task_id, None)
            return False
        return True

    def add(self, task_ids: Iterable[str], signum: int = 0, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            for task_id in task_ids:
                self.ids.pop(task_id, None)
                self.ids[task_id] = (now, signum)
            self._trim(now)

    def merge(self, task_ids: Iterable[str], now: float | None = None) -> int:
        """Add ids revoked elsewhere (another worker's, from mingle or its ``hello``),
        as Celery's ``merge_revoked``: stamped now (another host's times do not compare
        with ours), in their order, so the first go first when the set is full. An id
        known here keeps its entry (its time and terminate signal). Returns how many
        ids were new."""
        now = time.time() if now is None else now
        added = 0
        with self._lock:
            self._trim(now)  # an expired id is new again
            for task_id in task_ids:
                if task_id not in self.ids:
                    self.ids[task_id] = (now, 0)
                    added += 1
            self._trim(now)
        return added

    def purge(self, now: float | None = None) -> None:
        """Forget the ids kept longer than ``expires`` (before they are sent away)."""
        with self._lock:
            self._trim(time.time() if now is None else now)

    def _trim(self, now: float) -> None:
        while len(self.ids) > self.maxlen:
            self.ids.popitem(last=False)
        while self.ids:
            oldest = next(iter(self.ids.values()))
            if now - oldest[0] <= self.expires:
                break
            self.ids.popitem(last=False)

    def terminate_signal(self, task_id: str) -> int:
        """The signal a terminate revoke of ``task_id`` asked for, else 0."""
        entry = self.ids.get(task_id)
        return entry[1] if entry is not None and task_id in self else 0


def store_revoked(
    backend: Backend | None,
    request: Request,
    *,
    terminated: bool = False,
    signum: int | None = None,
) -> None:
    """Celery's record of a revoked task: log, ``task-revoked`` event, REVOKED with
    ``TaskRevokedError('revoked')`` (``'terminated'`` for a stopped one). The caller
    acks the message."""
    if terminated:
        logger.warning("Task %s[%s] terminated on request (revoked).", request.name, request.id)
    else:
        logger.info("Discarding revoked task: %s[%s].", request.name, request.id)
    request.send_event(
        "task-revoked",
        terminated=terminated,
        signum=signal_name(signum) if signum else None,
        expired=False,
    )
    from celeriac.signals import task_revoked

    if task_revoked.receivers:
        from celeriac.worker.request import send_revoked

        send_revoked(request, terminated=terminated, signum=signum or None, expired=False)
    if backend is None or request.ignore_result:
        return
    reason = exception_to_meta(TaskRevokedError("terminated" if terminated else "revoked"))
    try:
        backend.store(
            request.id,
            meta_for(request.id, states.REVOKED, reason, None, None),
            **request.reply_options,
        )
    except Exception as exc:
        logger.error("Could not store the revoke of task %s: %s", request.id, exc)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def parse_signal(value: object) -> int:
    """``"SIGTERM"``, ``"TERM"``, ``"kill"``, ``15`` or None (SIGTERM) as a signal
    number; ``ValueError`` for anything else."""
    if value is None or value == "":
        return int(signal.SIGTERM)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return int(signal.Signals(value))
        except ValueError:
            raise ValueError(f"unknown signal {value!r}") from None
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return parse_signal(int(name))
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise ValueError(f"unknown signal {value!r}")
