"""Pieces of ``async def`` tasks and revoke that need no broker: task detection, each
coroutine's own ``self.request``, eager runs, the bounded revoked-id set, signal names
and the new settings' checks. The worker behaviour is tested against Redis in
tests/brokers/test_async_tasks.py and tests/brokers/test_revoke.py."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
from celeriac import Celeriac
from celeriac.exceptions import ImproperlyConfigured
from celeriac.local import get_current_worker_task
from celeriac.task import is_async_task
from celeriac.worker.revoke import RevokedSet, parse_signal


@pytest.fixture
def app() -> Celeriac:
    return Celeriac("unit-async", broker="redis://127.0.0.1:6379/0", set_as_current=False)


def test_async_tasks_are_detected(app: Celeriac) -> None:
    @app.task
    def plain() -> int:
        return 1

    @app.task
    async def coro() -> int:
        return 2

    @app.task(bind=True)
    async def bound(self: Any) -> int:
        return 3

    @app.task(autoretry_for=(ValueError,))
    async def retried() -> int:
        return 4

    assert not is_async_task(plain)
    assert all(is_async_task(t) for t in (coro, bound, retried))


def test_each_coroutine_sees_its_own_request(app: Celeriac) -> None:
    seen: dict[str, Any] = {}

    @app.task(bind=True)
    async def who(self: Any, name: str) -> None:
        await asyncio.sleep(0.01 if name == "a" else 0)
        seen[name] = (self.request.id, get_current_worker_task() is self)
        await asyncio.sleep(0)
        assert self.request.id == f"id-{name}"

    async def run(name: str) -> None:
        who.enter_async_request(id=f"id-{name}", args=(name,), kwargs={})
        await who(name)

    async def both() -> None:
        await asyncio.gather(run("a"), run("b"))

    asyncio.run(both())
    assert seen == {"a": ("id-a", True), "b": ("id-b", True)}
    assert who.request.id is None  # nothing leaks outside the asyncio tasks


def test_eager_apply_runs_the_coroutine(app: Celeriac) -> None:
    @app.task(bind=True)
    async def double(self: Any, x: int) -> tuple[int, str | None]:
        await asyncio.sleep(0)
        return x * 2, self.request.id

    result = double.apply((21,), task_id="eager-1")
    assert result.get() == (42, "eager-1")
    app.conf.task_always_eager = True
    assert double.delay(2).get()[0] == 4


def test_revoked_set_is_bounded_and_forgets() -> None:
    revoked = RevokedSet(maxlen=3, expires=100.0)
    now = time.time()
    revoked.add(["a", "b"], now=now - 2)
    revoked.add(["c", "d"], signum=int(signal.SIGTERM), now=now - 1)
    assert list(revoked) == ["b", "c", "d"]  # the oldest went first
    assert "a" not in revoked and "d" in revoked
    assert revoked.terminate_signal("d") == signal.SIGTERM
    assert revoked.terminate_signal("b") == 0
    assert 123 not in revoked  # not an id: never revoked, no error
    revoked.add(["e"], now=now + 200)  # b, c and d are older than 100 s by then
    assert list(revoked) == ["e"]
    old = RevokedSet(expires=100.0)
    old.add(["f"], now=now - 500)
    assert "f" not in old  # expired when looked up


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, signal.SIGTERM),
        ("SIGTERM", signal.SIGTERM),
        ("kill", signal.SIGKILL),
        ("USR1", signal.SIGUSR1),
        ("9", signal.SIGKILL),
        (15, signal.SIGTERM),
    ],
)
def test_signal_names(value: Any, expected: int) -> None:
    assert parse_signal(value) == expected


@pytest.mark.parametrize("value", ["SIGNOPE", 999, True, 1.5, [15]])
def test_bad_signal_names(value: Any) -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal(value)


@pytest.mark.parametrize("name", ["worker_async_concurrency", "worker_revoked_ids_max"])
@pytest.mark.parametrize("value", [0, -1, "10", 2.5, True, None])
def test_count_settings_refuse_bad_values(app: Celeriac, name: str, value: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match=f"{name}.*int >= 1"):
        app.conf[name] = value


def test_count_settings_defaults(app: Celeriac) -> None:
    assert app.conf.worker_async_concurrency == 100
    assert app.conf.worker_revoked_ids_max == 50000
    app.conf.worker_async_concurrency = 7
    assert app.conf.worker_async_concurrency == 7
