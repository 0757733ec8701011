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


def test_remove_takes_out_what_the_predicate_picks_earliest_first() -> None:
    eta: EtaSchedule[str] = EtaSchedule()
    for due, item in [(4.0, "d1"), (2.0, "b"), (2.0, "x1"), (9.0, "x2"), (1.0, "a"), (4.0, "d2")]:
        eta.push(due, item)
    assert eta.remove(lambda item: item.startswith("x")) == ["x1", "x2"]
    assert eta.remove(lambda item: item == "none") == []
    assert eta.items() == ["a", "b", "d1", "d2"]  # the rest keep their order
    # Any truthy/falsy result counts, as in ``filter``.
    assert eta.remove(lambda item: 1 if item == "d2" else None) == ["d2"]
    assert eta.pop_due(100.0) == ["a", "b", "d1"]
    assert eta.remove(lambda item: True) == []


def test_remove_by_identity_not_equality() -> None:
    class Request:
        def __eq__(self, other: object) -> bool:
            return True  # every request "equals" every other: must not matter

        __hash__ = object.__hash__

    eta: EtaSchedule[Request] = EtaSchedule()
    first, second = Request(), Request()
    eta.push(1.0, first)
    eta.push(2.0, second)
    removed = eta.remove(lambda request: request is second)
    assert len(removed) == 1 and removed[0] is second
    assert eta.items()[0] is first and len(eta) == 1


def test_remove_predicate_may_use_the_schedule() -> None:
    """The predicate runs unlocked: it may push and pop (another thread may too);
    an item popped meanwhile is not removed, one pushed meanwhile is not looked at."""
    eta: EtaSchedule[str] = EtaSchedule()
    for due, item in [(1.0, "a"), (2.0, "b"), (3.0, "c")]:
        eta.push(due, item)
    popped: list[str] = []

    def pick(item: str) -> bool:
        if not popped:
            popped.extend(eta.pop_due(1.0))  # takes "a"
            eta.push(0.5, "new")
        return True

    assert eta.remove(pick) == ["b", "c"]
    assert popped == ["a"] and eta.items() == ["new"]


def test_remove_with_a_broken_predicate_removes_nothing() -> None:
    eta: EtaSchedule[int] = EtaSchedule()
    for i in range(4):
        eta.push(float(i), i)

    def broken(item: int) -> bool:
        if item == 2:
            raise RuntimeError("boom")
        return True

    with pytest.raises(RuntimeError, match="boom"):
        eta.remove(broken)
    with pytest.raises(TypeError):
        eta.remove("not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        eta.remove(lambda: True)  # type: ignore[arg-type,misc]

    class Unsure:
        def __bool__(self) -> bool:
            raise ValueError("no truth")

    with pytest.raises(ValueError, match="no truth"):
        eta.remove(lambda item: Unsure())
    assert eta.items() == [0, 1, 2, 3]
    assert eta.remove(lambda item: item % 2) == [1, 3]
