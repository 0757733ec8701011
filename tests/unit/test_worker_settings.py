"""A worker's settings are read once and checked: a bad value stops the worker with a
message naming the setting, and every default comes from ``celeriac.conf.DEFAULTS``."""

from __future__ import annotations

from typing import Any

import pytest
from celeriac import Celeriac
from celeriac.conf import DEFAULTS
from celeriac.worker import WorkerError, WorkerOptions, WorkerSettings

REDIS = "redis://127.0.0.1:6379/0"


def build(conf: dict[str, Any] | None = None, **options: Any) -> WorkerSettings:
    app = Celeriac("settings", broker=REDIS)
    app.conf.update(conf or {})
    return WorkerSettings.build(app, WorkerOptions(**options))


def test_defaults_are_the_ones_in_conf_defaults() -> None:
    settings = build(pool="threads", concurrency=3)
    assert settings.prefetch_multiplier == DEFAULTS["worker_prefetch_multiplier"]
    assert settings.window == 3 * DEFAULTS["worker_prefetch_multiplier"]
    assert settings.async_concurrency == DEFAULTS["worker_async_concurrency"]
    assert settings.revoked_ids_max == DEFAULTS["worker_revoked_ids_max"]
    assert settings.queues == (DEFAULTS["task_default_queue"],)
    assert settings.pool_start_method == DEFAULTS["worker_pool_start_method"]
    assert settings.disable_prefetch is DEFAULTS["worker_disable_prefetch"]
    assert settings.rate_limits_enabled is not DEFAULTS["worker_disable_rate_limits"]
    assert settings.task_events is DEFAULTS["worker_send_task_events"]
    assert settings.time_limit is None and settings.soft_time_limit is None
    assert build().pool == DEFAULTS["worker_pool"]


def test_without_q_every_queue_of_task_queues_is_consumed_as_by_celery() -> None:
    conf = {"task_queues": {"orders": {}, "reports": {}}, "task_default_queue": "orders"}
    assert build(conf).queues == ("orders", "reports")
    assert build(conf, exclude_queues=["orders"]).queues == ("reports",)
    assert build(conf, queues=["reports"]).queues == ("reports",)
    with pytest.raises(WorkerError, match=r"task_queues: "):
        build({"task_queues": [42]})


def test_a_changed_default_in_conf_defaults_is_what_the_worker_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(DEFAULTS, "worker_revoked_ids_max", 7)
    monkeypatch.setitem(DEFAULTS, "worker_prefetch_multiplier", 5)
    settings = build(pool="threads", concurrency=2)
    assert settings.revoked_ids_max == 7
    assert settings.window == 10


def test_the_command_line_wins_over_the_setting() -> None:
    settings = build(
        {"worker_prefetch_multiplier": 2, "task_time_limit": 30},
        pool="threads",
        concurrency=2,
        prefetch_multiplier=3,
        time_limit=5,
    )
    assert settings.window == 6
    assert settings.time_limit == 5.0


@pytest.mark.parametrize(
    ("conf", "options", "message"),
    [
        ({}, {"pool": "fibers"}, r"pool 'fibers' is not available \(choose from "),
        ({}, {"concurrency": "many"}, r"concurrency must be a number or 'auto', not 'many'"),
        ({}, {"concurrency": 0}, r"concurrency must be at least 1, not 0"),
        ({}, {"prefetch_multiplier": -1}, r"the prefetch multiplier must be 0 or more, not -1"),
        ({}, {"pool_start_method": "forkserver"}, r"--pool-start-method must be 'fork' or"),
        ({}, {"time_limit": "soon"}, r"time limit must be a number of seconds, not 'soon'"),
        ({}, {"soft_time_limit": -2}, r"soft time limit must be a number of seconds >= 0"),
        ({}, {"max_tasks_per_child": 1.5}, r"--max-tasks-per-child must be a whole number >= 0"),
        ({}, {"heartbeat_interval": "often"}, r"--heartbeat-interval must be a number"),
        ({}, {"exclude_queues": ["celery"]}, r"every queue was excluded"),
        ({"worker_disable_prefetch": "yes"}, {}, r"worker_disable_prefetch must be True or False"),
        ({"worker_pool_start_method": "spawn"}, {"pool": "prefork"}, r"spawn is not supported"),
        (
            {"task_create_missing_queues": False},
            {"queues": ["nowhere"]},
            r"queue 'nowhere' is not defined in task_queues",
        ),
    ],
)
def test_a_bad_value_stops_the_worker_with_a_message_naming_it(
    conf: dict[str, Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(WorkerError, match=message):
        build(conf, **options)
