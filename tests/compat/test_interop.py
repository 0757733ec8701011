"""Celery 5.7 and celeriac, side by side, on Redis (redis results) and RabbitMQ (rpc://).

Each test runs in both directions: a real Celery client in this process sends to a
celeriac worker, and a celeriac client sends to a real Celery worker. What the task
received, and what the client reads back, must be the same either way.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from compat.conftest import DIRECTIONS, direction_id

if TYPE_CHECKING:
    from conftest import ResultKeys

    from compat.conftest import CompatDir


def _typed_values() -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = [
        datetime.datetime(2024, 1, 2, 3, 4, 5, 678901),
        datetime.date(2024, 1, 2),
        datetime.time(1, 2, 3, 4),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        decimal.Decimal("3.14159265358979323846"),
        b"utf-8 bytes",
        b"\xff\x00\xfe",
    ]
    kwargs: dict[str, Any] = {
        "aware": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
        "offset": datetime.datetime(
            2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))
        ),
        "nested": {"when": [datetime.date(2000, 2, 29)], "id": uuid.UUID(int=1)},
        "text": "naïve ☃",
        "big": 2**70,
    }
    return args, kwargs


def test_result_reaches_the_other_client(client: ModuleType, result_keys: ResultKeys) -> None:
    result = client.add.delay(2, 3)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 5
    assert result.state == "SUCCESS"
    assert result.successful()
    sent = client.app.send_task("compat.add", args=[20], kwargs={"y": 22})
    result_keys.add(sent.id)
    assert sent.get(timeout=10) == 42


def test_argument_types_survive_both_ways(client: ModuleType, result_keys: ResultKeys) -> None:
    args, kwargs = _typed_values()
    result = client.echo.apply_async(args, kwargs)
    result_keys.add(result.id)
    got = result.get(timeout=10)
    # What the worker's task received ...
    assert got["arg_types"] == ["datetime", "date", "time", "UUID", "Decimal", "bytes", "bytes"]
    assert got["kwarg_types"] == {
        "aware": "datetime",
        "offset": "datetime",
        "nested": "dict",
        "text": "str",
        "big": "int",
    }
    # ... and what came back through the result backend, equal and of the same types.
    assert got["args"] == args
    assert [type(v) for v in got["args"]] == [type(v) for v in args]
    assert got["kwargs"] == kwargs
    assert got["kwargs"]["offset"].utcoffset() == datetime.timedelta(hours=5, minutes=30)
    assert type(got["kwargs"]["nested"]["id"]) is uuid.UUID


@pytest.mark.parametrize(
    ("kind", "args", "type_name"),
    [
        ("value", ("boom", 42), "ValueError"),
        ("key", ("missing",), "KeyError"),
        ("custom", ("custom message", {"k": 1}), "CustomError"),
    ],
)
def test_exceptions_keep_type_and_message(
    client: ModuleType,
    result_keys: ResultKeys,
    kind: str,
    args: tuple[Any, ...],
    type_name: str,
) -> None:
    import compat_errors  # the test directory's module, imported by the client module

    result = client.fail.delay(kind, *args)
    result_keys.add(result.id)
    expected: type[BaseException] = {
        "value": ValueError,
        "key": KeyError,
        "custom": compat_errors.CustomError,
    }[kind]
    with pytest.raises(expected) as raised:
        result.get(timeout=10)
    assert type(raised.value).__name__ == type_name
    assert raised.value.args == args
    assert result.state == "FAILURE"
    assert type_name in (result.traceback or "")
    assert isinstance(result.result, expected)


def test_unknown_task_fails_as_not_registered(client: ModuleType, result_keys: ResultKeys) -> None:
    result = client.app.send_task("compat.no_such_task", args=[1])
    result_keys.add(result.id)
    with pytest.raises(Exception) as raised:
        result.get(timeout=10)
    assert type(raised.value).__name__ == "NotRegistered"
    assert raised.value.args == ("compat.no_such_task",)
    # The worker keeps serving.
    again = client.add.delay(1, 1)
    result_keys.add(again.id)
    assert again.get(timeout=10) == 2


def test_retries(client: ModuleType, result_keys: ResultKeys) -> None:
    result = client.flaky.delay(2)
    result_keys.add(result.id)
    assert result.get(timeout=15) == 2  # two retries, same task id, retries counted
    exhausted = client.give_up.delay()
    result_keys.add(exhausted.id)
    with pytest.raises(ValueError) as raised:
        exhausted.get(timeout=15)
    assert raised.value.args == ("still broken",)
    assert exhausted.state == "FAILURE"


def test_eta_expires_priority_and_timelimit_headers(
    client: ModuleType, result_keys: ResultKeys
) -> None:
    before = datetime.datetime.now(datetime.timezone.utc)
    result = client.info.apply_async(
        countdown=1, expires=300, priority=5, time_limit=30, soft_time_limit=20
    )
    result_keys.add(result.id)
    info = result.get(timeout=15)
    assert info["id"] == result.id
    assert info["retries"] == 0
    assert info["root_id"] == result.id
    assert info["parent_id"] is None
    eta = datetime.datetime.fromisoformat(info["eta"])
    expires = datetime.datetime.fromisoformat(info["expires"])
    assert eta.utcoffset() == datetime.timedelta(0)
    assert eta >= before + datetime.timedelta(seconds=1)
    # The worker held it until its ETA.
    assert info["now"] >= eta.timestamp()
    assert expires >= before + datetime.timedelta(seconds=300)
    assert info["timelimit"] == [30, 20]  # [hard, soft]
    assert info["priority"] == 5

    at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=0.5)
    by_eta = client.info.apply_async(eta=at)
    result_keys.add(by_eta.id)
    info = by_eta.get(timeout=15)
    assert datetime.datetime.fromisoformat(info["eta"]) == at
    assert info["now"] >= at.timestamp()
    assert info["timelimit"] in (None, [None, None])


def test_expired_message_is_revoked(
    compat: CompatDir, client: ModuleType, result_keys: ResultKeys
) -> None:
    if compat.env["CELERIAC_TEST_BROKER"].startswith("amqp"):
        pytest.skip("RabbitMQ drops a message whose expiration passed: nothing is stored")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=30)
    result = client.add.apply_async((1, 2), expires=past)
    result_keys.add(result.id)
    with pytest.raises(Exception) as raised:
        result.get(timeout=10)
    assert type(raised.value).__name__ == "TaskRevokedError"
    assert result.state == "REVOKED"
    after = client.add.apply_async((1, 2), expires=60)
    result_keys.add(after.id)
    assert after.get(timeout=10) == 3


@pytest.mark.parametrize("direction", DIRECTIONS, ids=direction_id)
def test_redis_priority_order(
    compat: CompatDir, start_worker: Any, result_keys: ResultKeys, direction: tuple[str, str]
) -> None:
    # Lower number first on Redis (kombu's priority sub-lists), whoever sent it.
    if not compat.env["CELERIAC_TEST_BROKER"].startswith("redis"):
        pytest.skip("RabbitMQ priorities need x-max-priority queues")
    client_kind, worker_kind = direction
    module = compat.celery_app() if client_kind == "celery" else compat.celeriac_app()
    sent = {}
    for priority in (9, 0, 6, 3):
        result = module.info.apply_async(priority=priority)
        result_keys.add(result.id)
        sent[priority] = result
    if client_kind == "celeriac":
        module.app.producer.flush(10.0)  # all four are in the queue before a worker starts
    start_worker(worker_kind)
    seen = {priority: result.get(timeout=10) for priority, result in sent.items()}
    order = sorted(seen, key=lambda p: seen[p]["now"])
    assert order == [0, 3, 6, 9]
    assert all(seen[p]["priority"] == p for p in seen)


@pytest.mark.parametrize("direction", DIRECTIONS, ids=direction_id)
def test_time_limits_on_prefork(
    compat: CompatDir, start_worker: Any, result_keys: ResultKeys, direction: tuple[str, str]
) -> None:
    # The timelimit header is [hard, soft] on both sides: a soft limit raises
    # SoftTimeLimitExceeded in the task, a hard one kills the process.
    if not compat.env["CELERIAC_TEST_BROKER"].startswith("redis"):
        pytest.skip("one broker is enough for the pool's time limits")
    client_kind, worker_kind = direction
    start_worker(worker_kind, "-c", "1", pool="prefork")
    module = compat.celery_app() if client_kind == "celery" else compat.celeriac_app()
    soft = module.sleep.apply_async((10,), soft_time_limit=0.5)
    result_keys.add(soft.id)
    with pytest.raises(Exception) as raised:
        soft.get(timeout=15)
    assert type(raised.value).__name__ == "SoftTimeLimitExceeded"
    hard = module.sleep.apply_async((10,), time_limit=0.5)
    result_keys.add(hard.id)
    with pytest.raises(Exception) as raised:
        hard.get(timeout=15)
    assert type(raised.value).__name__ == "TimeLimitExceeded"
    after = module.add.delay(1, 2)
    result_keys.add(after.id)
    assert after.get(timeout=15) == 3
