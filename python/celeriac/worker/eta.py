"""Messages with an ETA in the future, held until due.

Stop-gap until the Rust timer (``src/scheduler/``) takes this over: a heap ordered by
due time. The messages stay unacked meanwhile (as in Celery), so a warm shutdown puts
them back in the queue with ``Consumer.restore_unacked``.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, TypeVar

T = TypeVar("T")


class EtaSchedule(Generic[T]):
    """Items keyed by a UNIX timestamp; ``pop_due`` hands back those whose time came."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._order), item))

    def next_due(self) -> float | None:
        """The earliest due time, or None when empty."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[T]:
        """Items due at ``now`` or earlier, earliest first, at most ``limit``."""
        due: list[T] = []
        while self._heap and self._heap[0][0] <= now and (limit is None or len(due) < limit):
            due.append(heapq.heappop(self._heap)[2])
        return due

    def clear(self) -> list[T]:
        """Remove and return everything still held."""
        items = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        return items
