"""``async def`` tasks: one asyncio event loop per worker process, in a thread of its own.

Why a loop thread and not a loop that drives the process: the worker's main thread
owns the Rust consumer and blocks in ``fetch`` with the GIL released; keeping it so
leaves the fetch/ack path, the prefork supervisor and the sync pools exactly as they
are, and the same code serves every pool (solo, threads, and each prefork child, which
starts its own loop after the fork). The main thread hands a request over with
``call_soon_threadsafe``; the loop runs it as an asyncio task and puts
``(request, disposition)`` on a queue the main thread drains, as the thread pool does.

At most ``worker_async_concurrency`` coroutines run at once per process (Celery has
no bound, its issue #6552). The worker submits one only while ``free_slots`` (counted
until its outcome is collected) has room, so it starts at once and an early ack lands
just before it runs; more wait in the worker's reserved list, unacked.

In a prefork child ``--max-memory-per-child`` is checked when the main thread collects
finished coroutines (``completed``): over the limit, the child retires as after a sync
task (the coroutines still running finish, what waits is given back).

Time limits: the soft limit raises ``SoftTimeLimitExceeded`` inside the coroutine at
the ``await`` it is suspended on (the asyncio task is cancelled and the cancellation
swapped for the exception, so ``try/except SoftTimeLimitExceeded`` works as in a sync
task); the hard limit cancels the asyncio task and settles the message at once with
FAILURE ``TimeLimitExceeded`` (a coroutine that swallows the cancellation is left to
finish, its outcome ignored). ``revoke(terminate=True)`` cancels it too: REVOKED.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.exceptions import (
    Ignore,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from celeriac.result import exception_to_meta
from celeriac.signals import task_internal_error, task_postrun, task_prerun
from celeriac.worker.pool import ASYNC, Pool
from celeriac.worker.request import (
    Disposition,
    LazyContext,
    Request,
    _failure_disposition,
    _handler,
    _on_failure,
    _on_ignore,
    _on_reject,
    _on_retry,
    _on_success,
    send_internal_error,
    send_postrun,
    store,
)
from celeriac.worker.revoke import store_revoked

if TYPE_CHECKING:
    from celeriac._core import Backend

logger = logging.getLogger("celeriac.worker.aio")

#: Default for ``worker_async_concurrency``.
DEFAULT_ASYNC_CONCURRENCY = 100


class _Run:
    """One request on the loop: its asyncio task and what happened to it."""

    __slots__ = (
        "hard",
        "interrupt",
        "released",
        "request",
        "revoked",
        "settled",
        "soft",
        "task",
        "timers",
    )

    def __init__(self, request: Request, hard: float | None, soft: float | None) -> None:
        self.request = request
        self.hard = hard
        self.soft = soft
        self.task: asyncio.Task[None] | None = None
        #: The exception to raise inside the coroutine at its next wake-up.
        self.interrupt: BaseException | None = None
        #: The signal a terminate revoke named (the coroutine was cancelled).
        self.revoked: int = 0
        #: The message was settled (hard limit) before the coroutine ended.
        self.settled = False
        #: Its concurrency slot was given back.
        self.released = False
        self.timers: list[asyncio.TimerHandle] = []


class _Interruptible:
    """Awaits ``coro``, and turns the cancellation ``_Run.interrupt`` asked for into
    that exception, raised inside the coroutine where it waits."""

    __slots__ = ("coro", "run")

    def __init__(self, awaitable: Any, run: _Run) -> None:
        # A coroutine steps itself; any other awaitable through its iterator.
        self.coro = awaitable if inspect.iscoroutine(awaitable) else awaitable.__await__()
        self.run = run

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            try:
                value = yield yielded
                error = None
            except asyncio.CancelledError as exc:
                value = None
                interrupt = self.run.interrupt
                if interrupt is not None:
                    self.run.interrupt = None
                    # Python 3.11+ counts cancellations: this one was ours.
                    uncancel = getattr(asyncio.current_task(), "uncancel", None)
                    if uncancel is not None:
                        uncancel()
                    error = interrupt
                else:
                    error = exc
            except BaseException as exc:
                value, error = None, exc


class AsyncPool(Pool[Request, Disposition]):
    """Runs ``async def`` requests on this process's event loop, ``limit`` at a time.

    ``worker`` supplies the backend, time limits, the revoked set and the
    ``running``/``totals`` bookkeeping; every counter the main thread reads
    (``active``/``free_slots``) is changed by the main thread only."""

    name = "asyncio"

    def __init__(self, worker: Any, limit: int, wakeup: Callable[[], None] | None = None) -> None:
        super().__init__(lambda request: Disposition.NONE, limit)
        self.worker = worker
        self._wakeup = wakeup
        self._done: queue.SimpleQueue[tuple[Request, Disposition]] = queue.SimpleQueue()
        #: Submitted and not yet collected by ``completed`` (main thread).
        self._active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        # Loop side.
        self._runs: dict[str, _Run] = {}
        self._waiting: collections.deque[_Run] = collections.deque()
        self._running = 0
        self._live = 0
        self._idle = threading.Condition()

    # -- main thread ------------------------------------------------------------------

    def free_slots(self) -> int:
        return max(0, self.limit - self._active)

    def kind(self, request: Request) -> str:
        return ASYNC

    def active(self) -> int:
        return self._active

    def submit(self, request: Request) -> None:
        loop = self._ensure_loop()
        hard, soft = self.worker.time_limits(request)
        run = _Run(request, hard, soft)
        self._active += 1
        with self._idle:
            self._live += 1
        loop.call_soon_threadsafe(self._admit, run)

    def completed(self, timeout: float = 0.0) -> list[tuple[Request, Disposition]]:
        out: list[tuple[Request, Disposition]] = []
        if not self._active:
            return out
        try:
            out.append(self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait())
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self._active -= len(out)
        # --max-memory-per-child after coroutines too, here on the main thread: a
        # prefork child that grows by running only ``async def`` tasks is replaced.
        self.worker.check_memory()
        return out

    def join(self) -> None:
        """Wait for every submitted coroutine, then stop the loop."""
        with self._idle:
            while self._live > 0:
                self._idle.wait(0.1)
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and self._pid == os.getpid():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5.0)
        self._loop = self._thread = None

    def terminate(self, task_id: str, signum: int) -> bool:
        """Cancel the coroutine running ``task_id`` (any thread); whether it runs here."""
        run = self._runs.get(task_id)
        loop = self._loop
        if run is None or loop is None or run.settled:
            return False
        loop.call_soon_threadsafe(self._terminate, run, signum)
        return True

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None and self._pid == os.getpid():
            return self._loop
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop, self._pid = loop, os.getpid()
        self._thread = threading.Thread(target=serve, name="celeriac-asyncio", daemon=True)
        self._thread.start()
        ready.wait(5.0)
        return loop

    # -- loop thread ------------------------------------------------------------------

    def _admit(self, run: _Run) -> None:
        self._waiting.append(run)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and self._running < self.limit:
            self._start(self._waiting.popleft())

    def _start(self, run: _Run) -> None:
        request = run.request
        self._running += 1
        if self.worker.is_revoked(request.id):
            store_revoked(self.worker.backend, request)
            self._settle(run, Disposition.ACK if request.acks_late else Disposition.NONE)
            self._release(run, admit=False)  # the caller's loop admits the next
            return
        self._runs[request.id] = run
        loop = asyncio.get_running_loop()
        run.task = loop.create_task(self._execute(run), name=f"celeriac:{request.id}")
        if run.soft:
            run.timers.append(loop.call_later(run.soft, self._soft_limit, run))
        if run.hard:
            run.timers.append(loop.call_later(run.hard, self._hard_limit, run))

    def _release(self, run: _Run, admit: bool = True) -> None:
        """``run`` ended, never started, or was given up (hard limit): its slot goes
        to the next waiting request."""
        if run.released:
            return
        run.released = True
        self._running -= 1
        for timer in run.timers:
            timer.cancel()
        if self._runs.get(run.request.id) is run:
            del self._runs[run.request.id]
        if admit:
            self._start_waiting()
        with self._idle:
            self._live -= 1
            if self._live == 0:
                self._idle.notify_all()

    def _settle(self, run: _Run, disposition: Disposition) -> None:
        if run.settled:
            return
        run.settled = True
        self._done.put((run.request, disposition))
        if self._wakeup is not None:
            self._wakeup()

    def _soft_limit(self, run: _Run) -> None:
        if run.task is None or run.task.done() or run.settled:
            return
        request = run.request
        logger.warning(
            "Soft time limit (%ss) exceeded for %s[%s]", run.soft, request.name, request.id
        )
        run.interrupt = SoftTimeLimitExceeded(run.soft)
        run.task.cancel()

    def _hard_limit(self, run: _Run) -> None:
        if run.task is None or run.task.done() or run.settled:
            return
        request = run.request
        logger.error(
            "Hard time limit (%ss) exceeded for %s[%s]", run.hard, request.name, request.id
        )
        run.interrupt = None
        run.task.cancel()
        self._settle(run, _timed_out(request, self.worker.backend, run.hard))
        self._release(run)  # even if the coroutine ignores the cancel

    def _terminate(self, run: _Run, signum: int) -> None:
        if run.task is None or run.task.done() or run.settled:
            return
        logger.info("Terminating %s (%s)", run.request.id, signum)
        run.revoked = signum
        run.interrupt = None
        run.task.cancel()

    async def _execute(self, run: _Run) -> None:
        request = run.request
        worker = self.worker
        worker.running.append(request)
        worker.totals[request.name] += 1
        stats = worker.slot_stats  # a prefork child counts for the node's heartbeat
        if stats is not None:
            stats.began()
        try:
            disposition = await self._body(run)
        except BaseException as exc:  # the worker's failure, not the task's
            logger.critical(
                "Task %s[%s] INTERNAL ERROR: %r", request.name, request.id, exc, exc_info=True
            )
            if task_internal_error.receivers:
                send_internal_error(request, exc)
            disposition = Disposition.ACK if request.acks_late else Disposition.NONE
        finally:
            if task_postrun.receivers:
                send_postrun(request)
            if request in worker.running:
                worker.running.remove(request)
            if stats is not None:
                stats.ended()
        self._settle(run, disposition)
        self._release(run)

    async def _body(self, run: _Run) -> Disposition:
        """``request.execute`` for a coroutine: the same hooks, states and events."""
        request = run.request
        backend: Backend | None = self.worker.backend
        task = request.task
        late = request.acks_late
        args, kwargs = request.delivery.args, request.delivery.kwargs
        task.enter_async_request(LazyContext(request))
        started = time.monotonic()
        request.time_start = time.time()
        request.send_event("task-started")
        if task_prerun.receivers:
            task_prerun.send(sender=task, task_id=request.id, task=task, args=args, kwargs=kwargs)
        _handler(request, "before_start", request.id, args, kwargs)
        if request.track_started and backend is not None and not request.ignore_result:
            started_meta = {"pid": os.getpid(), "hostname": request.hostname}
            store(backend, request, request.meta(states.STARTED, started_meta))
        try:
            retval = task(*args, **kwargs)
            if inspect.isawaitable(retval):
                retval = await _Interruptible(retval, run)
        except Retry as exc:
            stopped = self._unless_stopped(run)
            if stopped is not None:
                return stopped
            return _on_retry(request, backend, exc)
        except Ignore:
            return _on_ignore(request, late)
        except Reject as exc:
            return _on_reject(request, exc, late)
        except asyncio.CancelledError as exc:
            stopped = self._unless_stopped(run)
            if stopped is not None:
                return stopped
            # Cancelled by the task's own code (or the loop stopping): a failure.
            return _on_failure(request, backend, exc, traceback.format_exc())
        except (Exception, SystemExit) as exc:
            stopped = self._unless_stopped(run)
            if stopped is not None:
                return stopped
            return _on_failure(request, backend, exc, traceback.format_exc())
        stopped = self._unless_stopped(run)
        if stopped is not None:
            return stopped
        return _on_success(request, backend, retval, time.monotonic() - started)

    def _unless_stopped(self, run: _Run) -> Disposition | None:
        """The outcome of a coroutine stopped by a hard limit or a terminate revoke
        (whatever it returned or raised), else None."""
        request = run.request
        if run.settled:
            return Disposition.NONE  # settled by the hard limit already; never sent
        if run.revoked:
            store_revoked(self.worker.backend, request, terminated=True, signum=run.revoked)
            return Disposition.ACK if request.acks_late else Disposition.NONE
        return None


def _timed_out(request: Request, backend: Backend | None, limit: float | None) -> Disposition:
    """FAILURE ``TimeLimitExceeded`` (or a requeue, as for a killed prefork child under
    ``acks_late`` without ``acks_on_failure_or_timeout``)."""
    exc = TimeLimitExceeded(limit)
    if request.acks_late and not request.acks_on_failure:
        logger.warning(
            "Task %s[%s] will be retried: %r (message requeued)", request.name, request.id, exc
        )
        return Disposition.REQUEUE
    logger.error("Task handler raised error: %r", exc)
    request.send_event("task-failed", exception=repr(exc), traceback=None)
    if backend is not None and not request.ignore_result:
        store(backend, request, request.meta(states.FAILURE, exception_to_meta(exc)))
    return _failure_disposition(request)
