"""Settings: Celery's names and defaults, checks on the way in, config_from_object."""

from __future__ import annotations

import datetime
import importlib
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from celeriac import Celeriac
from celeriac.conf import DEFAULT_BROKER_URL, Settings, parse_rate_limit, read_object
from celeriac.exceptions import ImproperlyConfigured


def test_celery_defaults() -> None:
    conf = Settings()
    assert conf.broker_url is None
    assert conf.result_backend is None
    assert conf.task_default_queue == "celery"
    assert conf.task_default_exchange == "celery"
    assert conf.task_default_routing_key == "celery"
    assert conf.task_default_priority is None
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.result_expires == 86400
    assert conf.task_ignore_result is False
    assert conf.task_acks_late is False
    assert conf.task_always_eager is False
    assert conf.task_eager_propagates is False
    assert conf.task_create_missing_queues is True
    assert conf.worker_prefetch_multiplier == 4
    assert conf.worker_concurrency is None
    assert conf.broker_connection_timeout == 4.0
    assert conf.broker_connection_retry_on_startup is True
    assert conf.broker_connection_max_retries == 100
    assert conf.broker_transport_options == {}
    assert conf.result_backend_transport_options == {}
    assert conf.enable_utc is True
    assert conf.timezone == "UTC"
    assert conf.worker_send_task_events is False
    assert conf.task_send_sent_event is False
    assert conf.imports == ()
    assert conf.include == ()


def test_mutable_defaults_are_not_shared() -> None:
    first, second = Settings(), Settings()
    first.broker_transport_options["visibility_timeout"] = 10
    assert second.broker_transport_options == {}


def test_mapping_and_attribute_access() -> None:
    conf = Settings(task_default_queue="q1")
    assert conf["task_default_queue"] == "q1"
    assert conf.get("task_default_queue") == "q1"
    assert conf.get("no_such_setting", 7) == 7
    conf.task_default_queue = "q2"
    assert conf["task_default_queue"] == "q2"
    conf["my_own_setting"] = {"a": 1}
    assert conf.my_own_setting == {"a": 1}
    assert "my_own_setting" in conf
    assert conf.setdefault("another", 5) == 5
    assert conf.setdefault("another", 6) == 5
    conf.update({"task_acks_late": True}, worker_prefetch_multiplier=1)
    assert conf.task_acks_late is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.changes == {
        "task_default_queue": "q2",
        "my_own_setting": {"a": 1},
        "another": 5,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
    }
    del conf.task_acks_late
    assert conf.task_acks_late is False
    with pytest.raises(AttributeError):
        _ = conf.no_such_setting


def test_default_exchange_and_routing_key_follow_the_queue() -> None:
    conf = Settings(task_default_queue="jobs")
    assert conf.task_default_exchange == "jobs"
    assert conf.task_default_routing_key == "jobs"
    conf.task_default_exchange = "ex"
    assert conf.task_default_exchange == "ex"


def test_old_upper_case_names() -> None:
    conf = Settings()
    conf.update(BROKER_URL="redis://h:1/2", CELERY_RESULT_BACKEND="redis://h:1/3")
    conf["CELERYD_PREFETCH_MULTIPLIER"] = 2
    assert conf.broker_url == "redis://h:1/2"
    assert conf.result_backend == "redis://h:1/3"
    assert conf.worker_prefetch_multiplier == 2
    assert conf["BROKER_URL"] == "redis://h:1/2"


def test_environment_overrides_broker_and_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = Settings(broker_url="redis://configured/0")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://from-env/1")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://from-env/2")
    assert conf.broker_url == "redis://from-env/1"
    assert conf.result_backend == "redis://from-env/2"
    assert Celeriac(set_as_current=False, broker="redis://x/0").broker_url == "redis://from-env/1"


def test_default_broker() -> None:
    assert Celeriac(set_as_current=False).broker_url == DEFAULT_BROKER_URL


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("worker_prefetch_multiplier", -1),
        ("worker_prefetch_multiplier", "4"),
        ("worker_prefetch_multiplier", 2.5),
        ("worker_prefetch_multiplier", True),
        ("broker_url", 123),
        ("broker_url", ["amqp://a", 1]),
        ("broker_url", []),
        ("result_backend", object()),
        ("task_default_queue", ""),
        ("accept_content", "json"),
        ("accept_content", ["json", 1]),
        ("task_acks_late", "False"),
        ("broker_connection_timeout", 0),
        ("broker_transport_options", ["visibility_timeout"]),
        ("result_expires", -5),
        ("task_default_priority", 256),
        ("task_time_limit", -1),
        ("worker_concurrency", "lots"),
        ("worker_concurrency", "auto2"),
        ("worker_concurrency", "-1"),
        ("worker_concurrency", "2.5"),
        ("worker_concurrency", ""),
        ("worker_concurrency", -1),
        ("worker_concurrency", 2.5),
        ("worker_concurrency", True),
        ("timezone", "Nowhere/Atlantis"),
        ("task_default_rate_limit", "10/x"),
        ("imports", 5),
        ("task_routes", 42),
        ("CELERYD_PREFETCH_MULTIPLIER", -3),
    ],
)
def test_wrong_values_name_the_setting(name: str, value: object) -> None:
    conf = Settings()
    with pytest.raises(ImproperlyConfigured) as info:
        conf[name] = value
    expected = {"CELERYD_PREFETCH_MULTIPLIER": "worker_prefetch_multiplier"}.get(name, name)
    assert expected in str(info.value)


def test_wrong_value_in_constructor_and_update() -> None:
    with pytest.raises(ImproperlyConfigured, match="worker_prefetch_multiplier"):
        Celeriac(set_as_current=False, worker_prefetch_multiplier=-1)
    with pytest.raises(ImproperlyConfigured, match="broker_url"):
        Celeriac(set_as_current=False, broker=42)  # type: ignore[arg-type]
    app = Celeriac(set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="task_default_priority"):
        app.conf.update(task_default_priority="high")


def test_worker_concurrency_takes_auto_as_celery_5_7() -> None:
    for given, kept in (("auto", "auto"), (" AUTO ", "auto"), ("8", 8), (8, 8), (0, 0)):
        assert Settings(worker_concurrency=given).worker_concurrency == kept, given
    app = Celeriac(set_as_current=False)
    app.conf.worker_concurrency = "Auto"
    assert app.conf.worker_concurrency == "auto"


def test_values_are_normalised() -> None:
    conf = Settings(
        accept_content=("json",),
        imports="myapp.tasks",
        task_acks_late=1,
        result_expires=datetime.timedelta(hours=1),
    )
    assert conf.accept_content == ["json"]
    assert conf.imports == ("myapp.tasks",)
    assert conf.task_acks_late is True
    assert conf.result_expires == datetime.timedelta(hours=1)


def test_table_masks_secrets() -> None:
    conf = Settings(
        broker_url="redis://:secret@localhost:6379/0",
        my_api_key="abc",
        task_default_queue="q",
    )
    table = conf.table()
    assert table["broker_url"] == "redis://:********@localhost:6379/0"
    assert table["my_api_key"] == "********"
    assert table["task_default_queue"] == "q"
    assert "secret" not in repr(table)
    assert conf.table(censored=False)["broker_url"] == "redis://:secret@localhost:6379/0"
    assert "worker_prefetch_multiplier" in conf.table(with_defaults=True)


@pytest.mark.parametrize(
    ("value", "per_second"),
    [
        (None, 0.0),
        ("", 0.0),
        (0, 0.0),
        ("10/s", 10.0),
        ("10", 10.0),
        (5, 5.0),
        (2.5, 2.5),
        ("60/m", 1.0),
        ("3600/h", 1.0),
        ("1.5/m", 0.025),
    ],
)
def test_parse_rate_limit(value: object, per_second: float) -> None:
    assert parse_rate_limit(value) == pytest.approx(per_second)


@pytest.mark.parametrize("value", ["10/x", "abc", "abc/m", "-1/s", -3, object(), "nan/s"])
def test_parse_rate_limit_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_rate_limit(value)


# -- config_from_object ------------------------------------------------------------------


@pytest.fixture
def config_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"celeriac_test_config_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import os

            broker_url = "redis://config-host:6379/3"
            task_default_queue = "from-config"
            worker_prefetch_multiplier = 1
            TASK_IGNORED = "upper case names are not settings"
            CELERY_ALWAYS_EAGER = True
            _private = "skipped"


            class Nested:
                task_acks_late = True
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_config_from_module_name(config_module: str) -> None:
    app = Celeriac(set_as_current=False)
    app.config_from_object(config_module)
    assert app.conf.broker_url == "redis://config-host:6379/3"
    assert app.conf.task_default_queue == "from-config"
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_always_eager is True  # old name mapped
    assert "TASK_IGNORED" not in app.conf
    assert "_private" not in app.conf
    assert "os" not in app.conf  # imported modules are not settings


def test_config_from_module_object_and_attribute_path(config_module: str) -> None:
    app = Celeriac(set_as_current=False)
    app.config_from_object(importlib.import_module(config_module))
    assert app.conf.task_default_queue == "from-config"
    other = Celeriac(set_as_current=False)
    other.config_from_object(f"{config_module}:Nested")
    assert other.conf.task_acks_late is True
    dotted = Celeriac(set_as_current=False)
    dotted.config_from_object(f"{config_module}.Nested")
    assert dotted.conf.task_acks_late is True


def test_config_from_class_and_object() -> None:
    class Config:
        task_default_queue = "from-class"
        result_expires = 60
        NOT_A_SETTING = 1

    app = Celeriac(set_as_current=False)
    app.config_from_object(Config)
    assert app.conf.task_default_queue == "from-class"
    assert app.conf.result_expires == 60
    assert "NOT_A_SETTING" not in app.conf

    instance = Celeriac(set_as_current=False)
    instance.config_from_object(SimpleNamespace(task_serializer="json", worker_concurrency=3))
    assert instance.conf.worker_concurrency == 3

    mapping = Celeriac(set_as_current=False)
    mapping.config_from_object({"task_default_queue": "from-dict"})
    assert mapping.conf.task_default_queue == "from-dict"


def test_config_namespace() -> None:
    class Config:
        CELERY_BROKER_URL = "redis://ns-host/0"
        CELERY_TASK_ALWAYS_EAGER = True
        CELERY_WORKER_PREFETCH_MULTIPLIER = 2
        OTHER_SETTING = "not ours"
        task_default_queue = "lower case is not namespaced"

    app = Celeriac(set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    assert app.conf.broker_url == "redis://ns-host/0"
    assert app.conf.task_always_eager is True
    assert app.conf.worker_prefetch_multiplier == 2
    assert app.conf.task_default_queue == "celery"
    assert "OTHER_SETTING" not in app.conf
    assert read_object(Config, "CELERY")["broker_url"] == "redis://ns-host/0"


def test_namespace_from_constructor() -> None:
    class Config:
        CELERY_TASK_DEFAULT_QUEUE = "ns-queue"

    app = Celeriac(set_as_current=False, namespace="CELERY")
    app.config_from_object(Config)
    assert app.conf.task_default_queue == "ns-queue"


def test_constructor_arguments_win_over_config(config_module: str) -> None:
    app = Celeriac(set_as_current=False, broker="redis://explicit/0")
    app.config_from_object(config_module)
    assert app.conf.broker_url == "redis://explicit/0"
    assert app.conf.task_default_queue == "from-config"


def test_config_source_argument(config_module: str) -> None:
    app = Celeriac(set_as_current=False, config_source=config_module)
    assert app.conf.task_default_queue == "from-config"


def test_config_from_broken_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = Celeriac(set_as_current=False)
    with pytest.raises(ImportError):
        app.config_from_object("celeriac_no_such_config_module")
    app.config_from_object("celeriac_no_such_config_module", silent=True)
    with pytest.raises(AttributeError):
        app.config_from_object("celeriac.conf:NoSuchThing")

    name = f"celeriac_test_bad_config_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("worker_prefetch_multiplier = 'four'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ImproperlyConfigured, match="worker_prefetch_multiplier"):
            app.config_from_object(name)
    finally:
        sys.modules.pop(name, None)


def test_config_from_envvar(config_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = Celeriac(set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="CELERIAC_TEST_CONFIG"):
        app.config_from_envvar("CELERIAC_TEST_CONFIG")
    monkeypatch.setenv("CELERIAC_TEST_CONFIG", config_module)
    app.config_from_envvar("CELERIAC_TEST_CONFIG")
    assert app.conf.task_default_queue == "from-config"
