"""Execution pools: ``solo`` runs each task inline, ``threads`` in a thread pool.

The worker's main thread owns the consumer; a pool only runs jobs and hands back
``(request, disposition)`` pairs for the main thread to ack or reject.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

logger = logging.getLogger("celeriac.worker.pool")

R = TypeVar("R")
D = TypeVar("D")

#: The kinds of request a pool runs (``Pool.kind``): sync tasks, ``async def`` tasks.
SYNC = "sync"
ASYNC = "async"


class Pool(Generic[R, D]):
    """Runs ``job(request) -> disposition`` for each submitted request."""

    name = "base"

    def __init__(self, job: Callable[[R], D], limit: int) -> None:
        self.job = job
        self.limit = limit

    def free_slots(self) -> int:
        raise NotImplementedError

    def kind(self, request: R) -> str:
        """Which part of the pool runs ``request``: ``SYNC`` or ``ASYNC``."""
        return SYNC

    def free_slots_for(self, kind: str) -> int:
        """Free slots for requests of ``kind``: one submitted while there is a free
        slot for its kind starts at once."""
        return self.free_slots()

    def active(self) -> int:
        raise NotImplementedError

    def submit(self, request: R) -> None:
        raise NotImplementedError

    def completed(self, timeout: float = 0.0) -> list[tuple[R, D]]:
        """Finished jobs; waits up to ``timeout`` seconds for one when none is ready."""
        raise NotImplementedError

    def join(self) -> None:
        """Wait for every running job (warm shutdown)."""


class SoloPool(Pool[R, D]):
    """One task at a time, in the worker's own thread (Celery's ``solo``)."""

    name = "solo"

    def __init__(self, job: Callable[[R], D], limit: int) -> None:
        super().__init__(job, limit)
        self._done: list[tuple[R, D]] = []

    def free_slots(self) -> int:
        return 1

    def active(self) -> int:
        return 0

    def submit(self, request: R) -> None:
        self._done.append((request, self.job(request)))

    def completed(self, timeout: float = 0.0) -> list[tuple[R, D]]:
        done, self._done = self._done, []
        return done


class ThreadPool(Pool[R, D]):
    """``limit`` threads; the worker submits only while a thread is free, so every
    submitted job starts at once (and an early ack lands just before it runs)."""

    name = "threads"

    def __init__(
        self, job: Callable[[R], D], limit: int, wakeup: Callable[[], None] | None = None
    ) -> None:
        super().__init__(job, limit)
        self._executor = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="celeriac")
        self._done: queue.SimpleQueue[tuple[R, Future[D]]] = queue.SimpleQueue()
        self._active = 0
        #: Called after each job (``HybridPool`` waits on two pools at once).
        self._wakeup = wakeup

    def free_slots(self) -> int:
        return max(0, self.limit - self._active)

    def active(self) -> int:
        return self._active

    def submit(self, request: R) -> None:
        future = self._executor.submit(self.job, request)
        self._active += 1
        wakeup = self._wakeup
        if wakeup is None:
            future.add_done_callback(lambda f: self._done.put((request, f)))
        else:

            def done(f: Future[D]) -> None:
                self._done.put((request, f))
                wakeup()

            future.add_done_callback(done)

    def completed(self, timeout: float = 0.0) -> list[tuple[R, D]]:
        finished: list[tuple[R, Future[D]]] = []
        if self._active:
            try:
                first = self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()
            except queue.Empty:
                return []
            finished.append(first)
            while True:
                try:
                    finished.append(self._done.get_nowait())
                except queue.Empty:
                    break
        out: list[tuple[R, D]] = []
        for request, future in finished:
            self._active -= 1
            out.append((request, future.result()))
        return out

    def join(self) -> None:
        self._executor.shutdown(wait=True)


class HybridPool(Pool[R, D]):
    """A sync pool and the ``async def`` pool side by side (a worker whose app has
    coroutine tasks): each request goes to the pool of its kind.

    ``free_slots`` is the sum of both (the worker fetches while either has room);
    ``free_slots_for`` counts one kind, and the worker submits a request only while its
    kind has a free slot, so nothing waits (acked) inside a full pool: a request of a
    full kind stays reserved, unacked, while the other kind keeps running.
    """

    def __init__(
        self,
        sync: Pool[R, D],
        coroutines: Pool[R, D],
        is_async: Callable[[R], bool],
        wakeups: queue.SimpleQueue[None],
    ) -> None:
        super().__init__(sync.job, sync.limit)
        self.sync = sync
        self.coroutines = coroutines
        self.is_async = is_async
        self.name = sync.name
        self._wakeups = wakeups

    def free_slots(self) -> int:
        return self.sync.free_slots() + self.coroutines.free_slots()

    def kind(self, request: R) -> str:
        return ASYNC if self.is_async(request) else SYNC

    def free_slots_for(self, kind: str) -> int:
        return (self.coroutines if kind == ASYNC else self.sync).free_slots()

    def active(self) -> int:
        return self.sync.active() + self.coroutines.active()

    def submit(self, request: R) -> None:
        if self.is_async(request):
            self.coroutines.submit(request)
        else:
            self.sync.submit(request)

    def completed(self, timeout: float = 0.0) -> list[tuple[R, D]]:
        done = self._collect()
        if done or timeout <= 0 or not self.active():
            return done
        try:
            self._wakeups.get(timeout=timeout)
        except queue.Empty:
            return done
        return self._collect()

    def _collect(self) -> list[tuple[R, D]]:
        while True:  # tokens of what is collected now
            try:
                self._wakeups.get_nowait()
            except queue.Empty:
                break
        return self.sync.completed() + self.coroutines.completed()

    def join(self) -> None:
        self.sync.join()
        self.coroutines.join()


def create(
    name: str, job: Callable[[R], D], limit: int, wakeup: Callable[[], None] | None = None
) -> Pool[R, D]:
    if name == "solo":
        return SoloPool(job, limit)
    if name == "threads":
        return ThreadPool(job, limit, wakeup)
    raise ValueError(f"unknown pool {name!r}")
