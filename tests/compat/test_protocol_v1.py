"""Celery's protocol v1 (``task_protocol = 1``: everything in the body, no task
headers) sent by a real Celery client runs on a celeriac worker; malformed v1 bodies
are dropped with a log line and the worker keeps serving."""

from __future__ import annotations

import datetime
import decimal
import os
import uuid
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from types import ModuleType

    from conftest import ResultKeys

    from compat.conftest import CompatDir


@pytest.fixture
def v1_client(compat: CompatDir, start_worker: Any) -> ModuleType:
    start_worker("celeriac")
    os.environ["CELERIAC_TEST_PROTOCOL"] = "1"
    try:
        module = compat.celery_app()
    finally:
        os.environ.pop("CELERIAC_TEST_PROTOCOL", None)
    assert module.app.conf.task_protocol == 1
    return module


def test_v1_messages_run(v1_client: ModuleType, result_keys: ResultKeys) -> None:
    result = v1_client.add.delay(2, 3)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 5

    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    typed = v1_client.echo.apply_async(
        (when, uuid.UUID(int=7)), {"d": decimal.Decimal("2.5"), "b": b"\x01"}
    )
    result_keys.add(typed.id)
    got = typed.get(timeout=10)
    assert got["arg_types"] == ["datetime", "UUID"]
    assert got["kwarg_types"] == {"d": "Decimal", "b": "bytes"}
    assert got["args"] == [when, uuid.UUID(int=7)]

    before = datetime.datetime.now(datetime.timezone.utc)
    info = v1_client.info.apply_async(countdown=1, time_limit=30, soft_time_limit=20)
    result_keys.add(info.id)
    seen = info.get(timeout=15)
    assert seen["id"] == info.id
    assert seen["timelimit"] == [30, 20]
    eta = datetime.datetime.fromisoformat(seen["eta"])
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=datetime.timezone.utc)
    assert eta >= before + datetime.timedelta(seconds=1)
    assert seen["now"] >= eta.timestamp()

    failed = v1_client.fail.delay("value", "v1 boom")
    result_keys.add(failed.id)
    with pytest.raises(ValueError) as raised:
        failed.get(timeout=10)
    assert raised.value.args == ("v1 boom",)

    retried = v1_client.flaky.delay(1)
    result_keys.add(retried.id)
    assert retried.get(timeout=15) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"task": "compat.add"},  # no id
        {"id": "v1-no-task", "args": [1, 2]},  # no task name
        {"task": "compat.add", "id": "v1-bad-args", "args": "1, 2"},
        {"task": "compat.add", "id": "v1-bad-kwargs", "args": [], "kwargs": [1]},
        {"task": "compat.add", "id": "v1-bad-eta", "args": [1, 2], "eta": "yesterday"},
        ["not", "a", "v1", "body"],
    ],
    ids=["no-id", "no-task", "args-not-list", "kwargs-not-object", "bad-eta", "list-body"],
)
def test_malformed_v1_bodies_are_dropped(
    v1_client: ModuleType, result_keys: ResultKeys, compat: CompatDir, body: Any
) -> None:
    app = v1_client.app
    with app.connection_for_write() as conn:
        conn.Producer().publish(body, routing_key=compat.queue, serializer="json", headers={})
    # The worker logs it and keeps serving.
    result = v1_client.add.delay(20, 22)
    result_keys.add(result.id)
    assert result.get(timeout=10) == 42
