"""What a prefork node reports as one worker: tasks started and running, counted by
its children in shared memory and read by the supervisor for ``worker-heartbeat``.

Celery's heartbeat sends ``processed`` (tasks accepted by the pool since start) and
``active`` (running now); ``celery.events.state.State`` and Flower show both. The
supervisor cannot see them in the slot table, which it samples every 50 ms and which
shows only a child's sync task: a short task comes and goes between two looks. So each
child counts its own: ``processed`` is one node-wide counter every child adds to as a
task starts; ``active`` is one counter per slot, up as a task (sync or coroutine)
starts and down as it ends, reset by the supervisor when the slot's child is gone.
"""

from __future__ import annotations

from celeriac import _core

_PROCESSED = 0


class NodeStats:
    """Counts of a node of ``slots`` children; made before the supervisor forks."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._counters = _core.SharedCounters(1 + slots)

    def for_slot(self, index: int) -> SlotStats:
        """The counting end for the child of slot ``index``."""
        return SlotStats(self._counters, 1 + index)

    def clear(self, index: int) -> None:
        """The child of slot ``index`` is gone (or about to be replaced): it runs nothing."""
        self._counters.set(1 + index, 0)

    def processed(self) -> int:
        return self._counters.get(_PROCESSED)

    def active(self) -> int:
        return sum(max(0, self._counters.get(1 + index)) for index in range(self.slots))

    def counts(self) -> tuple[int, int]:
        """``(active, processed)``, what ``Heart`` sends."""
        return self.active(), self.processed()


class SlotStats:
    """A child's end: ``began``/``ended`` around each task it runs (any thread)."""

    def __init__(self, counters: _core.SharedCounters, active_index: int) -> None:
        self._counters = counters
        self._active = active_index

    def began(self) -> None:
        self._counters.add(_PROCESSED)
        self._counters.add(self._active)

    def ended(self) -> None:
        self._counters.add(self._active, -1)
