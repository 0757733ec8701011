"""Running one request: rate limits, time limits, memory, and acking what finished."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from celeriac import _trace
from celeriac.fixups import run_with_fixups
from celeriac.signals import task_internal_error
from celeriac.worker import canvas_lost
from celeriac.worker.base import (
    ColdShutdown,
    WorkerBase,
)
from celeriac.worker.request import (
    Disposition,
    Request,
    TaskPolicy,
    execute,
    send_internal_error,
    task_policy,
)
from celeriac.worker.revoke import store_revoked
from celeriac.worker.settings import WorkerError, seconds_or_none
from celeriac.worker.slots import State

if TYPE_CHECKING:
    from collections.abc import Callable

    from celeriac._core import Consumer

logger = logging.getLogger("celeriac.worker")


def _rss_kib() -> int:
    """This process's resident memory in KiB (0 when unknown)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class ExecutionMixin(WorkerBase):
    """Running one request: rate limits, time limits, memory, and acking what finished."""

    def _policy(self, name: str, task: Any) -> TaskPolicy:
        """The task's acking/result policy, read once per task (not per message)."""
        policy = self._policies.get(name)
        if policy is None or policy.task is not task:
            policy = self._policies[name] = task_policy(task, self.app.conf)
        return policy

    def _rate_wait(self, request: Request) -> float:
        """0 when ``request`` may start now under its task's rate limit (a token is
        taken), else the seconds to hold it."""
        task = request.task
        name = task.name or ""
        value = getattr(task, "rate_limit", None)
        if value != self._rate_of.get(name):
            try:
                self._rate_for(name, task)  # picks up a changed rate_limit
            except WorkerError as exc:
                logger.error("%s; running without a rate limit", exc)
                return 0.0
        if not value:
            return 0.0  # no limit: no token to take
        return float(self.rate_limiter.acquire(name))

    def time_limits(self, request: Request) -> tuple[float | None, float | None]:
        """``(hard, soft)``: the message's ``timelimit`` header, else the task's
        attributes, else ``task_time_limit``/``task_soft_time_limit``."""
        header = request.delivery.headers.get("timelimit")
        hard_h = soft_h = None
        if isinstance(header, (list, tuple)) and len(header) == 2:
            hard_h, soft_h = header
        task = request.task
        limits: list[float | None] = []
        for from_header, attr, default in (
            (hard_h, "time_limit", self.time_limit),
            (soft_h, "soft_time_limit", self.soft_time_limit),
        ):
            value: Any = from_header
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                value = getattr(task, attr, None)
            if value is None:
                limits.append(default)
                continue
            try:
                limits.append(seconds_or_none(attr, value) or default)
            except WorkerError:
                limits.append(default)
        return limits[0], limits[1]

    def _job(self, request: Request) -> Disposition:
        """Runs in the pool. Never raises: a failure here is the worker's, not the task's."""
        if self.revoked.ids and request.id in self.revoked:  # revoked while it waited
            store_revoked(self.backend, request)
            return Disposition.ACK if request.acks_late else Disposition.NONE
        child = self.child
        if child is None:
            return self._execute(request)
        hard, soft = self.time_limits(request)
        # Counted toward --max-tasks-per-child (and the child retired) by _dispatch.
        child.publish(State.RETIRING if child.retiring else State.RUNNING, request, hard or 0.0)
        canvas_lost.record(child, request)  # errbacks/chord part if this child is lost
        guard = None
        if soft:
            limit = soft

            def guard(entering: bool) -> None:
                self._in_task = entering
                signal.setitimer(signal.ITIMER_REAL, limit if entering else 0)

        try:
            return self._execute(request, guard)
        finally:
            self._in_task = False
            self.check_memory()
            child.publish(State.RETIRING if child.retiring else State.IDLE)
            canvas_lost.task_done()

    def _settle_joins(self, done: list[tuple[Request, Disposition]]) -> None:
        """The chord parts the tasks in ``done`` sent (``Request.pending_join``). An
        ``acks_late`` one is settled now, before its message is acked: a header task
        redelivered after a crash then finds its part recorded, or joins again. An
        early-acked one whose reply is not in yet is left in flight, so the next task
        need not wait for it (``settle_joins_in_flight``, at the latest when the
        worker would wait for messages)."""
        in_flight = self.joins_in_flight
        if in_flight:
            self.settle_joins_in_flight(block=False)
        for request, _ in done:
            pending = request.pending_join
            if pending is None:
                continue
            request.pending_join = None
            if request.acks_late or pending.join.ready():
                pending.settle()
            else:
                in_flight.append(pending)

    def settle_joins_in_flight(self, block: bool) -> None:
        """Settle the chord parts left in flight: all of them (``block``: waits for
        their replies), else those already answered."""
        left = []
        for pending in self.joins_in_flight:
            if block or pending.join.ready():
                pending.settle()
            else:
                left.append(pending)
        self.joins_in_flight[:] = left

    def check_memory(self) -> None:
        """``--max-memory-per-child`` in a prefork child, after a task ended (a sync
        one in ``_job``, coroutines when the main thread collects them): over the
        limit, the child retires as ``_count_for_child`` retires it: it takes nothing
        more, lets what runs finish and gives the rest back; the supervisor starts its
        replacement. Main thread only (it writes the child's slot)."""
        child, most = self.child, self.max_memory_per_child
        if child is None or most is None or child.retiring or self.stop_requested:
            return
        used = _rss_kib()
        if used <= most:
            return
        logger.warning(
            "Memory usage %d KiB is over --max-memory-per-child (%d KiB): replacing this process.",
            used,
            most,
        )
        child.retiring = True
        self.stop_requested = True
        child.publish(State.RETIRING)

    def _execute(
        self, request: Request, guard: Callable[[bool], None] | None = None
    ) -> Disposition:
        self.running.append(request)
        self.totals[request.name] += 1
        stats = self.slot_stats
        if stats is not None:
            stats.began()
        try:
            if self.app.fixups:  # Django's: database connections closed around the task
                return run_with_fixups(self.app.fixups, execute, request, self.backend, guard)
            return execute(request, self.backend, guard)
        except ColdShutdown:
            raise
        except BaseException as exc:
            logger.critical(
                "Task %s[%s] INTERNAL ERROR: %r", request.name, request.id, exc, exc_info=True
            )
            if task_internal_error.receivers:
                send_internal_error(request, exc)
            return Disposition.ACK if request.acks_late else Disposition.NONE
        finally:
            if _trace.ENABLED:
                _trace.hop("py.executed")
            with contextlib.suppress(ValueError):
                self.running.remove(request)
            if stats is not None:
                stats.ended()

    def _finish(self, consumer: Consumer, done: list[tuple[Request, Disposition]]) -> None:
        self._settle_joins(done)
        acks: list[str] = []
        for request, disposition in done:
            if disposition is Disposition.ACK:
                acks.append(request.delivery_tag)
            elif disposition is Disposition.REJECT:
                consumer.reject(request.delivery_tag, False)
            elif disposition is Disposition.REQUEUE:
                consumer.reject(request.delivery_tag, True)
        if acks:
            consumer.ack(acks)
        if self._slots_held:  # --disable-prefetch: the early-acked ones' slots are free
            freed = min(self._slots_held, sum(1 for request, _ in done if not request.acks_late))
            if freed:
                self._slots_held -= freed
                consumer.extend_window(freed)
