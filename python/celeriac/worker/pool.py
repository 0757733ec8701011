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


class Pool(Generic[R, D]):
    """Runs ``job(request) -> disposition`` for each submitted request."""

    name = "base"

    def __init__(self, job: Callable[[R], D], limit: int) -> None:
        self.job = job
        self.limit = limit

    def free_slots(self) -> int:
        raise NotImplementedError

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

    def __init__(self, job: Callable[[R], D], limit: int) -> None:
        super().__init__(job, limit)
        self._executor = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="celeriac")
        self._done: queue.SimpleQueue[tuple[R, Future[D]]] = queue.SimpleQueue()
        self._active = 0

    def free_slots(self) -> int:
        return max(0, self.limit - self._active)

    def active(self) -> int:
        return self._active

    def submit(self, request: R) -> None:
        future = self._executor.submit(self.job, request)
        self._active += 1
        future.add_done_callback(lambda f: self._done.put((request, f)))

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


def create(name: str, job: Callable[[R], D], limit: int) -> Pool[R, D]:
    if name == "solo":
        return SoloPool(job, limit)
    if name == "threads":
        return ThreadPool(job, limit)
    raise ValueError(f"unknown pool {name!r}")
