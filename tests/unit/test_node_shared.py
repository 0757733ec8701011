"""What a prefork node's processes share: rate-limit buckets and task counts, in memory
made before a fork and seen by the forked process (real ``os.fork``)."""

from __future__ import annotations

import math
import os

import pytest
from celeriac import _core
from celeriac.worker.node_stats import NodeStats


def _in_child(body: object) -> int:
    """Run ``body()`` in a forked process; its exit status (0 when it returned)."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            body()  # type: ignore[operator]
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_token_taken_in_a_forked_child_is_gone_for_the_parent() -> None:
    limiter = _core.SharedRateLimiter(4)
    limiter.set("tasks.add", 1 / 3600)  # "1/h"
    assert _in_child(lambda: limiter.acquire("tasks.add")) == 0
    assert limiter.acquire("tasks.add") > 3000


def test_a_rate_changed_in_a_child_is_the_parents_rate() -> None:
    limiter = _core.SharedRateLimiter(4)
    limiter.set("tasks.add", 1 / 3600)
    assert limiter.acquire("tasks.add") == 0.0
    assert _in_child(lambda: limiter.set("tasks.add", 100.0)) == 0  # control rate_limit
    assert limiter.acquire("tasks.add") == 0.0  # a new rate: the bucket starts full
    assert 0 < limiter.acquire("tasks.add") <= 0.01
    assert _in_child(lambda: limiter.set("tasks.add", 0)) == 0
    assert not limiter.is_limited("tasks.add")


def test_bad_rates_are_refused_and_a_full_table_falls_back_per_process() -> None:
    limiter = _core.SharedRateLimiter(0)
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="tasks per second"):
            limiter.set("tasks.add", bad)
    names = [f"t{i}" for i in range(limiter.capacity + 1)]
    for name in names:
        limiter.set(name, 1 / 3600)
    last = names[-1]  # no room in the shared table: a bucket of this process
    assert limiter.is_limited(last)
    assert limiter.acquire(last) == 0.0
    assert limiter.acquire(last) > 3000
    limiter.set(last, 0)
    assert not limiter.is_limited(last)
    assert limiter.acquire(last) == 0.0


def test_node_stats_add_up_what_children_count() -> None:
    stats = NodeStats(3)

    def child() -> None:
        mine = stats.for_slot(1)
        for _ in range(5):
            mine.began()
            mine.ended()
        mine.began()  # still running when it exits

    assert _in_child(child) == 0
    assert stats.counts() == (1, 6)
    stats.clear(1)  # the supervisor saw the child go
    assert stats.counts() == (0, 6)
    with pytest.raises(IndexError):
        _core.SharedCounters(2).get(2)
