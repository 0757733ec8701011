"""Requests held back (ETA, rate limit) and revoked ones."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.exceptions import TaskRevokedError
from celeriac.result import exception_to_meta, meta_for
from celeriac.worker.announce import announce_received
from celeriac.worker.base import RATE_LIMIT_HOLD
from celeriac.worker.execution import ExecutionMixin
from celeriac.worker.request import Request
from celeriac.worker.revoke import parse_signal, store_revoked

if TYPE_CHECKING:
    from celeriac._core import Consumer

logger = logging.getLogger("celeriac.worker")


class HeldMixin(ExecutionMixin):
    """Requests held back (ETA, rate limit) and revoked ones."""

    def is_revoked(self, task_id: str) -> bool:
        revoked = self.revoked
        return bool(revoked.ids) and task_id in revoked

    def revoke(self, task_ids: Any, terminate: bool = False, signal_: Any = None) -> dict[str, str]:
        """Remote control's ``revoke``: remember ``task_ids`` (a task id or a list of
        them) so their messages are discarded, and with ``terminate`` stop the ones
        running here (prefork: the supervisor signals the child of a sync task; an
        ``async def`` task's coroutine is cancelled). Celery's reply text."""
        if isinstance(task_ids, str):
            ids = [task_ids]
        elif isinstance(task_ids, (list, tuple)) and all(isinstance(i, str) for i in task_ids):
            ids = list(dict.fromkeys(task_ids))
        else:
            return {"error": f"task_id must be a task id or a list of them, not {task_ids!r}"}
        ids = [i for i in ids if i]
        signum = 0
        if terminate:
            try:
                signum = parse_signal(signal_)
            except ValueError as exc:
                return {"error": str(exc)}
        self.revoked.add(ids, signum)
        self._take_out_revoked(ids)
        if self.child is None:  # the process that speaks for the node
            self._store_revoked(ids)
        if not terminate:
            logger.info("Tasks flagged as revoked: %s", ", ".join(ids))
            shown = "{" + ", ".join(repr(i) for i in ids) + "}" if ids else "set()"
            return {"ok": f"tasks {shown} flagged as revoked"}  # Celery prints the set
        terminated: list[str] = []
        if self.supervisor is not None:
            terminated = list(self.supervisor.terminate(ids, signum))
        coroutines = self._async_pool()
        if coroutines is not None:
            terminated += [i for i in ids if coroutines.terminate(i, signum)]
        if self.child is None and self.supervisor is None:
            stuck = [r.id for r in list(self.running) if r.id in ids and r.id not in terminated]
            if stuck:
                logger.warning(
                    "Cannot terminate running task(s) %s: the %s pool runs them in this "
                    "process (revoked: a redelivery will not run)",
                    ", ".join(stuck),
                    self.pool_name,
                )
        if not terminated:
            return {"ok": "terminate: tasks unknown"}
        return {"ok": "terminate: " + ", ".join(terminated)}

    def _take_out_revoked(self, ids: list[str]) -> None:
        """Take the revoked messages held here for their ETA or rate limit out of the
        timer at once (``inspect scheduled`` stops listing them), and have the worker
        loop settle them and drop revoked ones from ``reserved``: it owns the consumer
        and ``reserved``, while this runs on the remote-control thread."""
        if not ids:
            return
        wanted = set(ids)
        if len(self.eta):
            self._revoked_held.extend(self.eta.remove(lambda request: request.id in wanted))
        self._revoke_pending = True  # after the extend: the loop sees what was taken

    def _settle_revoked(self, consumer: Consumer) -> None:
        """In the worker loop, after a revoke: discard the revoked messages held or
        reserved here as Celery discards a revoked message (``task-revoked``, REVOKED
        stored, acked), and give back the extra window slot a held one took."""
        self._revoke_pending = False
        gone: list[Request] = []
        while self._revoked_held:
            gone.append(self._revoked_held.popleft())
        revoked = self.revoked
        if revoked.ids:
            if len(self.eta):  # held after revoke looked (it raced the arrival check)
                gone += self.eta.remove(lambda request: request.id in revoked)
            if self.reserved:
                kept: list[Request] = []
                dropped: list[Request] = []
                for request in self.reserved:  # one look each: the set may change meanwhile
                    (dropped if request.id in revoked else kept).append(request)
                if dropped:
                    self.reserved.clear()
                    self.reserved.extend(kept)
                    gone += dropped
        if not gone:
            return
        self._unhold(consumer, gone)
        for request in gone:
            store_revoked(self.backend, request)
        consumer.ack([request.delivery_tag for request in gone])

    def _store_revoked(self, ids: list[str]) -> None:
        """REVOKED for each id that has no result yet and does not run here (Celery
        5.7 writes it when the command arrives)."""
        try:
            backend = self.app.backend
        except Exception:
            return
        if backend is None:
            return
        running = {r.id for r in list(self.running)}
        if self.supervisor is not None:
            children = self.supervisor.running_ids()
            if children is None:
                return  # not sure what runs: the messages are discarded when they come
            running |= set(children)
        reason = exception_to_meta(TaskRevokedError("revoked"))
        for task_id in ids:
            if task_id in running:
                continue
            try:
                stored = backend.get_meta(task_id)
                status = stored.get("status") if isinstance(stored, dict) else None
                if status not in (None, states.PENDING, "RECEIVED", states.RETRY, "REJECTED"):
                    continue
                backend.store(task_id, meta_for(task_id, states.REVOKED, reason, None, None))
            except Exception as exc:
                logger.warning("Failed to mark task %s as revoked in the backend: %s", task_id, exc)

    def _hold(self, consumer: Consumer, request: Request, due: float, *, rate: bool) -> None:
        """Keep ``request`` (unacked) until ``due``, widening the prefetch window by one
        so it does not starve other messages (Celery raises QoS the same way), up to
        ``worker_eta_task_limit`` for ETA messages and ``RATE_LIMIT_HOLD`` for
        rate-limited ones."""
        announce_received(request)  # kept here: never given back
        if self.window:
            if rate:
                if self._rate_extra < RATE_LIMIT_HOLD:
                    request.extra_slot = True
                    self._rate_extra += 1
            elif self.eta_task_limit is None or self._eta_extra < self.eta_task_limit:
                request.extra_slot = True
                self._eta_extra += 1
            if request.extra_slot:
                consumer.extend_window(1)
        request.rate_held = rate
        self.eta.push(due, request)

    def _unhold(self, consumer: Consumer, requests: list[Request]) -> None:
        shrink = 0
        for request in requests:
            if request.extra_slot:
                request.extra_slot = False
                shrink += 1
                if request.rate_held:
                    self._rate_extra -= 1
                else:
                    self._eta_extra -= 1
        if shrink:
            consumer.extend_window(-shrink)

    def _release_due_eta(self, consumer: Consumer) -> None:
        if len(self.eta):
            due = self.eta.pop_due(time.time())
            if due:
                self._unhold(consumer, due)
                self.reserved.extend(due)
