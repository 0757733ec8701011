"""The worker's ETA timer (Rust, ``src/scheduler/eta.rs``) as Python sees it: order,
limits, the Python objects it holds, and refusal of times it cannot order."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
from celeriac.worker.eta import EtaSchedule


def test_earliest_first_and_first_pushed_among_equal_times() -> None:
    eta: EtaSchedule[str] = EtaSchedule()
    assert len(eta) == 0 and not eta and eta.next_due() is None
    for due, item in [(5.0, "e"), (1, "a"), (3.0, "c1"), (3.0, "c2"), (2.5, "b")]:
        eta.push(due, item)
    assert len(eta) == 5 and eta.next_due() == 1.0
    assert eta.items() == ["a", "b", "c1", "c2", "e"]
    assert eta.pop_due(0.5) == []
    assert eta.pop_due(3.0, 3) == ["a", "b", "c1"]
    assert eta.pop_due(3.0, limit=None) == ["c2"]
    assert eta.pop_due(1e12, 0) == []
    assert eta.clear() == ["e"]
    assert len(eta) == 0 and eta.clear() == []


def test_holds_the_objects_themselves() -> None:
    class Request:
        pass

    eta: EtaSchedule[Request] = EtaSchedule()
    request = Request()
    eta.push(1.0, request)
    eta.push(1.0, request)
    popped = eta.pop_due(1.0)
    assert popped[0] is request and popped[1] is request


def test_a_cycle_through_the_schedule_is_collected() -> None:
    class Owner:
        eta: EtaSchedule[Owner]

    owner = Owner()
    owner.eta = EtaSchedule()
    owner.eta.push(1.0, owner)
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_time_that_cannot_be_ordered_is_refused(bad: float) -> None:
    eta: EtaSchedule[int] = EtaSchedule()
    with pytest.raises(ValueError, match="finite"):
        eta.push(bad, 1)
    assert len(eta) == 0
    eta.push(1.0, 2)
    assert eta.pop_due(math.nan) == [] and len(eta) == 1


def test_broken_arguments() -> None:
    eta: EtaSchedule[int] = EtaSchedule()
    with pytest.raises(TypeError):
        eta.push("tomorrow", 1)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        eta.push(10**400, 1)
    with pytest.raises(ValueError, match="limit"):
        eta.pop_due(1.0, -1)
    with pytest.raises(TypeError):
        eta.pop_due(1.0, 1.5)  # type: ignore[arg-type]
    assert len(eta) == 0


def test_subscriptable_at_run_time() -> None:
    alias = EtaSchedule[int]
    assert alias.__origin__ is EtaSchedule  # type: ignore[attr-defined]
