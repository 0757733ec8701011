"""The app and its tasks: decorator, registry, call-site checks, dispatch options,
retry, eager mode, module imports.

No broker is needed here except in ``test_unserializable_argument_sends_nothing``
(the real Redis). Where a test checks what ``apply_async`` hands to the Rust producer
(routing, countdown, expires, time limits, retry), it puts a recorder in the place of
``app.producer``: that checks our half of the ``Producer.send`` contract; what the core
then writes to the broker is tested in tests/brokers against Redis.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import celeriac
import celeriac.local as celeriac_local
import pytest
import redis
from celeriac import Celeriac, Celery, EagerResult, Task, current_app, shared_task, states
from celeriac._core import __version__ as core_version
from celeriac.exceptions import (
    AlwaysEagerIgnored,
    ImproperlyConfigured,
    MaxRetriesExceededError,
    NotRegistered,
    Retry,
)
from celeriac.result import AsyncResult


class Sent(NamedTuple):
    name: str
    task_id: str
    args: Any
    kwargs: Any
    queue: str
    options: dict[str, Any] | None


class RecordingProducer:
    """Stands where ``app.producer`` is and records each ``send`` call."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.flushed = 0
        self.closed = False

    def send(
        self,
        name: str,
        task_id: str,
        args: Any,
        kwargs: Any,
        queue: str,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.sent.append(Sent(name, task_id, args, kwargs, queue, options))

    def flush(self, timeout: float = 10.0) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed = True

    @property
    def last(self) -> Sent:
        return self.sent[-1]


def record(app: Celeriac) -> RecordingProducer:
    recorder = RecordingProducer()
    app._producer = recorder
    app._producer_pid = os.getpid()
    return recorder


@pytest.fixture(autouse=True)
def _keep_current_app() -> Iterator[None]:
    """Tests that create current apps put the previous one back."""
    saved = celeriac_local._current_app
    yield
    celeriac_local._current_app = saved


@pytest.fixture
def app() -> Celeriac:
    return Celeriac("testapp", set_as_current=False)


def unreachable_app(**settings: Any) -> Celeriac:
    """An app whose first send fails loudly: proves a check ran before sending."""
    return Celeriac(
        "unsent", broker="kafka://guest:secret@localhost//", set_as_current=False, **settings
    )


# -- the app ---------------------------------------------------------------------------


def test_app_basics() -> None:
    assert Celery is Celeriac
    assert celeriac.__version__ == core_version
    app = Celeriac(
        "proj",
        broker="redis://:secret@broker-host:6379/1",
        backend="redis://:secret@backend-host:6379/2",
        include=["proj.tasks"],
        task_default_queue="jobs",
        set_as_current=False,
    )
    assert app.main == "proj"
    assert app.conf.broker_url == "redis://:secret@broker-host:6379/1"
    assert app.conf.result_backend == "redis://:secret@backend-host:6379/2"
    assert app.conf.include == ("proj.tasks",)
    assert app.conf.task_default_queue == "jobs"
    assert app.broker_url_masked == "redis://:**@broker-host:6379/1"
    assert app.backend_url_masked == "redis://:**@backend-host:6379/2"
    assert "proj" in repr(app)


def test_current_app() -> None:
    first = Celeriac("first")
    assert current_app.main == "first"
    assert current_app._get_current_object() is first  # type: ignore[attr-defined]
    assert isinstance(current_app, Celeriac)
    Celeriac("not-current", set_as_current=False)
    assert current_app.main == "first"
    second = Celeriac("second")
    assert current_app.main == "second"
    first.set_current()
    assert current_app.main == "first"
    second.set_current()


def test_thread_oid_now_and_timezone(app: Celeriac) -> None:
    oid = app.thread_oid
    assert str(uuid.UUID(oid)) == oid
    assert app.thread_oid == oid
    other: list[str] = []
    thread = threading.Thread(target=lambda: other.append(app.thread_oid))
    thread.start()
    thread.join(10)
    assert other and other[0] != oid
    now = app.now()
    assert now.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - now).total_seconds()) < 60
    app.conf.timezone = "Europe/Paris"
    assert str(app.now().tzinfo) == "Europe/Paris"


def test_unknown_transport_is_reported_at_first_use() -> None:
    app = unreachable_app()

    @app.task
    def noop() -> None:
        return None

    with pytest.raises(ImproperlyConfigured, match="not supported") as info:
        noop.delay()
    assert "kafka" in str(info.value)
    assert "secret" not in str(info.value)


# -- tasks -----------------------------------------------------------------------------


def test_bare_decorator(app: Celeriac) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        """Add two numbers."""
        return x + y

    assert isinstance(add, Task)
    assert add.name == f"{__name__}.add"
    assert app.tasks[add.name] is add
    assert add(2, 3) == 5
    assert add.run(2, 3) == 5
    assert add.__doc__ == "Add two numbers."
    assert add.__name__ == "add"
    assert add.app is app
    assert repr(add) == f"<@task: {__name__}.add of testapp>"


def test_decorator_options_become_attributes(app: Celeriac) -> None:
    @app.task(
        name="custom.name",
        ignore_result=True,
        serializer="json",
        acks_late=True,
        rate_limit="10/m",
        time_limit=30,
        soft_time_limit=20,
        max_retries=5,
        default_retry_delay=2,
        autoretry_for=(KeyError,),
        retry_backoff=True,
        typing=False,
        track_started=True,
        queue="special",
        my_flag="yes",
    )
    def job() -> None:
        return None

    assert job.name == "custom.name"
    assert app.tasks["custom.name"] is job
    assert job.ignore_result is True
    assert job.serializer == "json"
    assert job.acks_late is True
    assert job.rate_limit == "10/m"
    assert job.time_limit == 30
    assert job.soft_time_limit == 20
    assert job.max_retries == 5
    assert job.default_retry_delay == 2
    assert job.autoretry_for == (KeyError,)
    assert job.retry_backoff is True
    assert job.typing is False
    assert job.track_started is True
    assert job.queue == "special"
    assert job.my_flag == "yes"  # type: ignore[attr-defined]


def test_attributes_default_to_settings(app: Celeriac) -> None:
    @app.task
    def job() -> None:
        return None

    assert job.acks_late is False
    assert job.ignore_result is False
    assert job.priority is None
    assert job.max_retries == 3
    assert job.default_retry_delay == 180
    app.conf.update(task_acks_late=True, task_ignore_result=True, task_default_priority=4)
    assert job.acks_late is True
    assert job.ignore_result is True
    assert job.priority == 4
    job.acks_late = False
    assert job.acks_late is False


def test_main_module_tasks_use_the_app_name(app: Celeriac) -> None:
    def fun() -> None:
        return None

    fun.__module__ = "__main__"
    assert app.task(fun).name == "testapp.fun"


def test_duplicate_name_returns_the_registered_task(app: Celeriac) -> None:
    @app.task(name="dup")
    def one() -> int:
        return 1

    @app.task(name="dup")
    def two() -> int:
        return 2

    assert two is one


def test_registry_missing_name(app: Celeriac) -> None:
    with pytest.raises(NotRegistered) as info:
        app.tasks["no.such.task"]
    assert isinstance(info.value, KeyError)
    assert app.tasks.get("no.such.task") is None


def test_bind_and_request(app: Celeriac) -> None:
    seen: list[Any] = []

    @app.task(bind=True)
    def whoami(self: Task[Any, Any], x: int) -> str:
        seen.append((self, self.request.args, self.request.called_directly))
        return str(self.name)

    assert whoami(1) == whoami.name
    assert seen == [(whoami, (1,), True)]
    assert whoami.request.id is None  # outside any execution
    whoami.push_request(id="abc", args=[7], kwargs={}, retries=2)
    try:
        assert whoami.request.id == "abc"
        assert whoami.request.called_directly is False
        assert celeriac.current_task.name == whoami.name
        assert whoami(7) == whoami.name
        assert seen[-1] == (whoami, [7], False)  # the pushed request stays current
    finally:
        whoami.pop_request()
    assert whoami.request.id is None
    assert not celeriac.current_task


def test_base_class(app: Celeriac) -> None:
    class Base(Task[Any, Any]):
        abstract_marker = "base"
        max_retries = 7

    @app.task(base=Base)
    def job() -> str:
        return "ran"

    assert isinstance(job, Base)
    assert job.abstract_marker == "base"  # type: ignore[attr-defined]
    assert job.max_retries == 7
    assert job() == "ran"

    class AppBase(app.Task):  # type: ignore[misc,name-defined]
        marker = "app"

    assert AppBase().app is app


def test_task_cls_argument() -> None:
    class Custom(Task[Any, Any]):
        custom = True

    app = Celeriac("c", task_cls=Custom, set_as_current=False)

    @app.task
    def job() -> None:
        return None

    assert isinstance(job, Custom)


def test_class_based_task(app: Celeriac) -> None:
    class Multiply(Task[Any, Any]):
        name = "math.multiply"

        def run(self, x: int, y: int) -> int:  # type: ignore[override]
            return x * y

    task = app.register_task(Multiply())
    assert app.tasks["math.multiply"] is task
    assert task(3, 4) == 12
    app.conf.task_always_eager = True
    assert task.delay(3, 5).get() == 15
    with pytest.raises(TypeError):
        task.delay(1)


def test_shared_task() -> None:
    before = Celeriac("before-shared")

    @shared_task
    def shared_add(x: int, y: int) -> int:
        return x + y

    @shared_task(bind=True, name="shared.bound")
    def shared_bound(self: Task[Any, Any]) -> str:
        return str(self.app.main)

    after = Celeriac("after-shared", task_always_eager=True)
    for app in (before, after):
        assert shared_add.name in app.tasks
        assert app.tasks[shared_add.name].app is app
        assert app.tasks["shared.bound"]() == app.main
    assert shared_add(1, 2) == 3
    assert shared_add.delay(2, 3).get() == 5  # through the current app (eager)
    assert shared_bound.delay().get() == "after-shared"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate_limit": "10/x"}, "rate limit"),
        ({"rate_limit": "abc"}, "rate limit"),
        ({"rate_limit": "-5/m"}, "rate limit"),
        ({"time_limit": -1}, "time_limit"),
        ({"time_limit": "10"}, "time_limit"),
        ({"soft_time_limit": -0.5}, "soft_time_limit"),
        ({"time_limit": 5, "soft_time_limit": 10}, "soft_time_limit"),
        ({"max_retries": -1}, "max_retries"),
        ({"default_retry_delay": "soon"}, "default_retry_delay"),
        ({"priority": 300}, "priority"),
        ({"serializer": "xml"}, "serializer 'xml' is not a serializer"),
    ],
)
def test_bad_options_fail_at_decoration(
    app: Celeriac, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):

        @app.task(**options)
        def job() -> None:
            return None


def test_attributes_are_checked_when_set(app: Celeriac) -> None:
    @app.task
    def job() -> None:
        return None

    with pytest.raises(ValueError, match="rate limit"):
        job.rate_limit = "10/x"
    with pytest.raises(ValueError, match="time_limit"):
        job.time_limit = -2
    job.rate_limit = "5/m"
    assert job.rate_limit == "5/m"


# -- annotations -----------------------------------------------------------------------


def test_annotations() -> None:
    app = Celeriac(
        "anno",
        set_as_current=False,
        task_annotations=[
            {"anno.add": {"rate_limit": "10/s", "custom": 1}},
            {"*": {"acks_late": True}},
        ],
    )

    @app.task(name="anno.add")
    def add() -> None:
        return None

    @app.task(name="anno.other")
    def other() -> None:
        return None

    assert add.rate_limit == "10/s"
    assert add.custom == 1  # type: ignore[attr-defined]
    assert add.acks_late is True
    assert other.acks_late is True
    assert other.rate_limit is None

    # Set after the tasks exist: applied when the registry is next read.
    app.conf.task_annotations = {"anno.other": {"rate_limit": "1/m"}}
    assert app.tasks["anno.other"].rate_limit == "1/m"

    with pytest.raises(ValueError, match="rate limit"):
        app.conf.task_annotations = {"*": {"rate_limit": "10/x"}}
        _ = app.tasks


def test_annotation_objects() -> None:
    class Annotator:
        def annotate(self, task: Task[Any, Any]) -> dict[str, Any] | None:
            return {"time_limit": 3} if task.name == "obj.job" else None

    app = Celeriac("obj", set_as_current=False, task_annotations=Annotator())

    @app.task(name="obj.job")
    def job() -> None:
        return None

    assert job.time_limit == 3


# -- call-site checks ------------------------------------------------------------------


def test_wrong_arguments_raise_before_sending() -> None:
    app = unreachable_app()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def flexible(a: int, /, b: int = 2, *rest: int, c: int, **extra: int) -> int:
        return a

    with pytest.raises(TypeError, match="add\\(\\) missing 1 required positional argument: 'y'"):
        add.delay(1)
    with pytest.raises(TypeError, match="takes 2 positional arguments but 3 were given"):
        add.delay(1, 2, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        add.apply_async((1, 2), {"z": 3})
    with pytest.raises(TypeError, match="multiple values"):
        add.apply_async((1, 2), {"x": 3})
    with pytest.raises(TypeError, match="keyword-only argument: 'c'"):
        flexible.delay(1)
    with pytest.raises(TypeError, match=r"required positional argument: 'a'"):
        flexible.apply_async((), {"a": 1, "c": 2})
    # Correct calls pass the check and then fail on the unsupported broker.
    with pytest.raises(ImproperlyConfigured):
        add.delay(1, 2)
    with pytest.raises(ImproperlyConfigured):
        flexible.apply_async((1, 2, 3, 4), {"c": 5, "d": 6})


@pytest.mark.parametrize("args", ["ab", {1, 2}, 5, (i for i in range(2)), {"x": 1}])
def test_args_must_be_a_list_or_tuple(args: Any) -> None:
    app = unreachable_app()

    @app.task(typing=False)
    def anything(*args: Any) -> None:
        return None

    with pytest.raises(TypeError, match="list or tuple"):
        anything.apply_async(args)
    with pytest.raises(TypeError, match="list or tuple"):
        app.send_task("x", args)


@pytest.mark.parametrize("kwargs", [[("x", 1)], "x=1", 5])
def test_kwargs_must_be_a_mapping(kwargs: Any) -> None:
    app = unreachable_app()

    @app.task(typing=False)
    def anything(**kwargs: Any) -> None:
        return None

    with pytest.raises(TypeError, match="mapping"):
        anything.apply_async((), kwargs)
    with pytest.raises(TypeError, match="mapping"):
        app.send_task("x", (), kwargs)


def test_typing_false_skips_the_check() -> None:
    app = unreachable_app()

    @app.task(typing=False)
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ImproperlyConfigured):  # got past the argument check
        add.delay(1)


def test_unserializable_argument_sends_nothing(redis_client: redis.Redis, queue_name: str) -> None:
    app = Celeriac("serial", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.task_default_queue = queue_name

    @app.task
    def echo(value: Any) -> Any:
        return value

    try:
        with pytest.raises(TypeError, match="object"):
            echo.delay(object())
        with pytest.raises(TypeError):
            echo.apply_async(({1, 2},))
        app.producer.flush(5.0)
        assert redis_client.llen(queue_name) == 0
        ok = echo.delay({"fine": [1, 2.5, None]})
        app.producer.flush(5.0)
        assert redis_client.llen(queue_name) == 1
        assert ok.id
    finally:
        app.close()


# -- dispatch options ------------------------------------------------------------------


def test_delay_passes_no_options(app: Celeriac) -> None:
    recorder = record(app)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(2, 2)
    sent = recorder.last
    assert sent == Sent(add.name, result.id, (2, 2), {}, "celery", None)
    assert isinstance(result, AsyncResult)
    assert str(uuid.UUID(result.id)) == result.id
    assert result.name == add.name
    add.apply_async([1, 2], task_id="fixed-id")
    assert recorder.last == Sent(add.name, "fixed-id", [1, 2], {}, "celery", None)


def test_time_fields(app: Celeriac) -> None:
    recorder = record(app)

    @app.task
    def job() -> None:
        return None

    before = datetime.datetime.now(datetime.timezone.utc)
    job.apply_async(countdown=30, expires=60)
    after = datetime.datetime.now(datetime.timezone.utc)
    options = recorder.last.options
    assert options is not None and set(options) == {"eta", "expires", "expiration"}
    eta = datetime.datetime.fromisoformat(options["eta"])
    expires = datetime.datetime.fromisoformat(options["expires"])
    assert options["eta"].endswith("+00:00")
    span = datetime.timedelta(seconds=30)
    assert before + span <= eta <= after + span
    assert before + 2 * span <= expires <= after + 2 * span
    assert options["expiration"] in range(59_000, 60_001)

    job.apply_async(expires=-5)
    assert recorder.last.options is not None
    assert recorder.last.options["expiration"] == 0

    naive = datetime.datetime(2030, 1, 2, 3, 4, 5, 600)
    job.apply_async(eta=naive, expires=naive + datetime.timedelta(hours=1))
    options = recorder.last.options
    assert options is not None
    assert options["eta"] == "2030-01-02T03:04:05.000600+00:00"
    assert options["expires"] == "2030-01-02T04:04:05.000600+00:00"
    assert options["expiration"] > 0

    aware = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    job.apply_async(eta=aware.isoformat())
    assert recorder.last.options == {"eta": "2030-01-02T03:04:05+00:00"}

    job.apply_async(countdown=0)
    assert recorder.last.options is None
    with pytest.raises(TypeError, match="countdown"):
        job.apply_async(countdown="soon")  # type: ignore[arg-type]


def test_time_limits(app: Celeriac) -> None:
    recorder = record(app)

    @app.task(time_limit=30)
    def limited() -> None:
        return None

    @app.task
    def plain() -> None:
        return None

    limited.delay()
    assert recorder.last.options == {"timelimit": (30, None)}
    limited.apply_async(soft_time_limit=10)
    assert recorder.last.options == {"timelimit": (30, 10)}
    plain.apply_async(time_limit=5.5)
    assert recorder.last.options == {"timelimit": (5.5, None)}
    app.conf.task_soft_time_limit = 3
    plain.delay()
    assert recorder.last.options == {"timelimit": (None, 3)}
    with pytest.raises(ValueError, match="soft_time_limit"):
        plain.apply_async(time_limit=2, soft_time_limit=5)
    with pytest.raises(ValueError, match="negative"):
        plain.apply_async(time_limit=-1)
    with pytest.raises(ValueError, match="time_limit"):
        plain.apply_async(time_limit="1")  # type: ignore[arg-type]


def test_other_options(app: Celeriac) -> None:
    recorder = record(app)

    @app.task
    def job(x: int = 0) -> None:
        return None

    job.apply_async(
        priority=7,
        headers={"custom": "h"},
        ignore_result=True,
        shadow="job-shadow",
        link={"task": "cb", "args": [], "kwargs": {}, "options": {}},
        link_error=[{"task": "eb", "args": [], "kwargs": {}, "options": {}}],
        group_id="g-1",
        group_index=2,
        root_id="root-1",
        parent_id="parent-1",
        delivery_mode="transient",
        retries=3,
        serializer="json",
        retry=True,
        retry_policy={"max_retries": 1},
        some_unknown_option=1,
    )
    assert recorder.last.options == {
        "priority": 7,
        "headers": {"custom": "h"},
        "ignore_result": True,
        "shadow": "job-shadow",
        "callbacks": [{"task": "cb", "args": [], "kwargs": {}, "options": {}}],
        "errbacks": [{"task": "eb", "args": [], "kwargs": {}, "options": {}}],
        "group": "g-1",
        "group_index": 2,
        "root_id": "root-1",
        "parent_id": "parent-1",
        "delivery_mode": 1,
        "retries": 3,
    }
    with pytest.raises(ValueError, match="serializer 'xml' is not a serializer"):
        job.apply_async(serializer="xml")
    with pytest.raises(ValueError, match='compression: unknown compression "brotli"'):
        job.apply_async(compression="brotli")
    with pytest.raises(TypeError, match="signature"):
        job.apply_async(link="not a signature")


def test_unsupported_task_serializer_setting(app: Celeriac) -> None:
    app.conf.task_serializer = "xml"

    @app.task
    def job() -> None:
        return None

    with pytest.raises(ValueError, match="task_serializer 'xml' is not a serializer"):
        job.delay()
    with pytest.raises(ImproperlyConfigured, match="task_serializer"):
        _ = app.producer


def test_ignore_result_and_priority_defaults(app: Celeriac) -> None:
    recorder = record(app)

    @app.task(ignore_result=True, priority=3)
    def quiet() -> None:
        return None

    result = quiet.delay()
    assert recorder.last.options == {"priority": 3, "ignore_result": True}
    assert result.ignored
    assert result.get() is None  # ignored results are not waited for
    quiet.apply_async(priority=0, ignore_result=False)
    assert recorder.last.options == {"priority": 0}
    app.conf.task_default_priority = 5

    @app.task
    def other() -> None:
        return None

    other.delay()
    assert recorder.last.options == {"priority": 5}


def test_routing(app: Celeriac) -> None:
    recorder = record(app)
    app.conf.task_routes = {
        "routed.*": {"queue": "routed-q", "priority": 2},
        "exchanged": {"queue": "ex-q", "exchange": "ex", "routing_key": "rk"},
    }

    @app.task(name="routed.job")
    def routed() -> None:
        return None

    @app.task(name="exchanged")
    def exchanged() -> None:
        return None

    @app.task(name="plain")
    def plain() -> None:
        return None

    @app.task(name="fixed", queue="task-q")
    def fixed() -> None:
        return None

    routed.delay()
    assert (recorder.last.queue, recorder.last.options) == ("routed-q", {"priority": 2})
    routed.apply_async(queue="explicit")
    assert (recorder.last.queue, recorder.last.options) == ("explicit", {"priority": 2})
    routed.apply_async(priority=9)
    assert recorder.last.options == {"priority": 9}
    exchanged.delay()
    assert recorder.last.queue == "ex-q"
    assert recorder.last.options == {"exchange": "ex", "routing_key": "rk"}
    plain.delay()
    assert (recorder.last.queue, recorder.last.options) == ("celery", None)
    fixed.delay()
    assert recorder.last.queue == "task-q"

    # Changed settings take effect on the next send.
    app.conf.task_default_queue = "new-default"
    plain.delay()
    assert recorder.last.queue == "new-default"

    calls: list[Any] = []

    def by_args(name: str, args: Any, kwargs: Any, options: Any, task: Any = None) -> Any:
        calls.append((name, args, task))
        return "big" if args and args[0] > 10 else None

    app.conf.task_routes = [by_args]

    @app.task(name="sized")
    def sized(n: int) -> None:
        return None

    sized.delay(50)
    assert recorder.last.queue == "big"
    sized.delay(1)
    assert recorder.last.queue == "new-default"
    assert calls[0] == ("sized", (50,), sized)


def test_send_task(app: Celeriac) -> None:
    recorder = record(app)
    result = app.send_task(
        "remote.task", (1,), {"a": 2}, countdown=5, queue="remote-q", task_id="r-1"
    )
    assert result.id == "r-1"
    sent = recorder.last
    assert (sent.name, sent.task_id, sent.args, sent.kwargs, sent.queue) == (
        "remote.task",
        "r-1",
        (1,),
        {"a": 2},
        "remote-q",
    )
    assert sent.options is not None and set(sent.options) == {"eta"}

    @app.task(time_limit=9, name="local.task")
    def local() -> None:
        return None

    app.send_task("local.task")  # the registered task's defaults apply
    assert recorder.last.options == {"timelimit": (9, None)}

    app.conf.task_always_eager = True
    with pytest.warns(AlwaysEagerIgnored):
        app.send_task("remote.task")
    assert recorder.last.name == "remote.task"


def test_messages_sent_by_a_running_task_get_its_ids(app: Celeriac) -> None:
    recorder = record(app)

    @app.task
    def child() -> None:
        return None

    @app.task(bind=True)
    def parent(self: Task[Any, Any]) -> None:
        child.delay()

    parent.push_request(id="parent-id", root_id="root-id", args=(), kwargs={})
    try:
        parent.run()
        request = parent.request
    finally:
        parent.pop_request()
    assert recorder.last.options == {"root_id": "root-id", "parent_id": "parent-id"}
    assert [r.id for r in request.children] == [recorder.last.task_id]

    parent.push_request(id="top-id", args=(), kwargs={})
    try:
        child.apply_async(add_to_parent=False)
        assert not parent.request.children
    finally:
        parent.pop_request()
    assert recorder.last.options == {"root_id": "top-id", "parent_id": "top-id"}

    child.delay()  # called directly, outside any task: no parent
    assert recorder.last.options is None


# -- retry -----------------------------------------------------------------------------


def test_retry_sends_the_same_id_again(app: Celeriac) -> None:
    recorder = record(app)

    @app.task(bind=True, max_retries=2)
    def flaky(self: Task[Any, Any], x: int) -> None:
        raise self.retry(countdown=5, exc=ValueError("try again"))

    flaky.push_request(
        id="task-1",
        args=[1],
        kwargs={},
        retries=0,
        root_id="root-1",
        origin="gen1@somewhere",
        reply_to="reply-oid",
        timelimit=[10, 5],
        delivery_info={"exchange": "", "routing_key": "work-q", "priority": 3},
        headers={"custom": "kept"},
    )
    try:
        with pytest.raises(Retry) as info:
            flaky.run(1)
    finally:
        flaky.pop_request()
    assert info.value.when == 5
    assert isinstance(info.value.exc, ValueError)
    assert "Retry in 5s" in str(info.value)
    sent = recorder.last
    assert (sent.name, sent.task_id, sent.args, sent.kwargs, sent.queue) == (
        flaky.name,
        "task-1",
        (1,),
        {},
        "work-q",
    )
    options = sent.options
    assert options is not None
    assert options["retries"] == 1
    assert options["root_id"] == "root-1"
    assert options["parent_id"] == "task-1"
    assert options["origin"] == "gen1@somewhere"
    assert options["reply_to"] == "reply-oid"
    assert options["timelimit"] == (10, 5)
    assert options["priority"] == 3
    assert options["headers"] == {"custom": "kept"}
    eta = datetime.datetime.fromisoformat(options["eta"])
    delay = (eta - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 3 < delay <= 5


def test_retry_limits(app: Celeriac) -> None:
    recorder = record(app)

    @app.task(bind=True, max_retries=1, default_retry_delay=1)
    def flaky(self: Task[Any, Any], error: bool) -> None:
        if error:
            raise self.retry(exc=KeyError("original"))
        raise self.retry()

    for error, expected in ((True, KeyError), (False, MaxRetriesExceededError)):
        flaky.push_request(id="t-2", args=[error], kwargs={}, retries=1)
        try:
            with pytest.raises(expected):
                flaky.run(error)
        finally:
            flaky.pop_request()
    assert recorder.sent == []

    # Called as a plain function there is no message to send again.
    with pytest.raises(KeyError):
        flaky(True)
    with pytest.raises(Retry):
        flaky(False)
    assert recorder.sent == []

    flaky.push_request(id="t-3", args=[False], kwargs={}, retries=0)
    try:
        with pytest.raises(Retry):
            flaky.run(False)
        with pytest.raises(Retry):
            flaky.retry(args=[True], max_retries=5, countdown=2, queue="other-q")
    finally:
        flaky.pop_request()
    assert recorder.last.args == (True,)
    assert recorder.last.queue == "other-q"


# -- eager mode ------------------------------------------------------------------------


def test_always_eager() -> None:
    app = Celeriac("eager", task_always_eager=True, set_as_current=False)
    record(app)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def fail() -> None:
        raise ValueError("boom")

    @app.task
    def echo(value: Any) -> Any:
        return value

    result = add.delay(2, 3)
    assert isinstance(result, EagerResult)
    assert result.get() == 5
    assert result.state == states.SUCCESS
    failed = fail.delay()
    assert failed.state == states.FAILURE
    assert failed.traceback is not None and "ValueError: boom" in failed.traceback
    with pytest.raises(ValueError, match="boom"):
        failed.get()
    assert isinstance(failed.get(propagate=False), ValueError)
    # Arguments arrive as a worker would see them (through JSON).
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    assert echo.delay((1, 2)).get() == [1, 2]
    assert echo.delay(when).get() == when
    with pytest.raises(TypeError):
        echo.delay(object())
    with pytest.raises(TypeError):
        add.delay(1)
    app.conf.task_eager_propagates = True
    with pytest.raises(ValueError, match="boom"):
        fail.delay()


def test_eager_request_and_retry() -> None:
    app = Celeriac("eager-retry", task_always_eager=True, set_as_current=False)
    attempts: list[tuple[int, bool]] = []

    @app.task(bind=True, max_retries=3)
    def flaky(self: Task[Any, Any], succeed_at: int) -> int:
        attempts.append((self.request.retries, self.request.is_eager))
        if self.request.retries < succeed_at:
            raise self.retry(countdown=100)
        return self.request.retries

    assert flaky.delay(2).get() == 2
    assert attempts == [(0, True), (1, True), (2, True)]
    attempts.clear()
    with pytest.raises(MaxRetriesExceededError):
        flaky.apply((10,), throw=True)
    assert len(attempts) == 4


def test_autoretry_for() -> None:
    app = Celeriac("autoretry", task_always_eager=True, set_as_current=False)
    attempts: list[int] = []

    @app.task(bind=True, autoretry_for=(KeyError,), retry_kwargs={"max_retries": 2})
    def flaky(self: Task[Any, Any]) -> str:
        attempts.append(self.request.retries)
        if len(attempts) < 3:
            raise KeyError("missing")
        return "done"

    assert flaky.delay().get() == "done"
    assert attempts == [0, 1, 2]

    @app.task(autoretry_for=(KeyError,), max_retries=1, retry_backoff=True)
    def always() -> None:
        raise KeyError("always")

    result = always.delay()
    assert result.state == states.FAILURE
    assert isinstance(result.result, KeyError)


def test_apply(app: Celeriac) -> None:
    @app.task(bind=True)
    def info(self: Task[Any, Any], x: int) -> dict[str, Any]:
        return {"id": self.request.id, "x": x, "eager": self.request.is_eager}

    result = info.apply((4,), task_id="apply-id")
    assert result.get() == {"id": "apply-id", "x": 4, "eager": True}
    assert result.id == "apply-id"


# -- modules ---------------------------------------------------------------------------


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"celeriac_test_pkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    (root / "with_tasks").mkdir(parents=True)
    (root / "without_tasks").mkdir()
    (root / "broken").mkdir()
    (root / "__init__.py").write_text("")
    (root / "with_tasks" / "__init__.py").write_text("")
    (root / "with_tasks" / "tasks.py").write_text(
        textwrap.dedent(
            """
            from celeriac import shared_task

            @shared_task(name="discovered.task")
            def discovered():
                return "found"
            """
        )
    )
    (root / "without_tasks" / "__init__.py").write_text("")
    (root / "broken" / "__init__.py").write_text("")
    (root / "broken" / "tasks.py").write_text("import celeriac_no_such_dependency\n")
    (root / "included.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


def test_autodiscover_and_import_modules(package: str) -> None:
    app = Celeriac("disc", include=[f"{package}.included"], set_as_current=False)
    app.autodiscover_tasks([f"{package}.with_tasks", f"{package}.without_tasks"])
    assert f"{package}.with_tasks.tasks" not in sys.modules  # lazy until the worker starts
    modules = app.import_modules()
    names = [module.__name__ for module in modules]
    assert names == [f"{package}.included", f"{package}.with_tasks.tasks"]
    assert "discovered.task" in app.tasks

    broken = Celeriac("broken", set_as_current=False)
    broken.autodiscover_tasks(lambda: [f"{package}.broken"])
    with pytest.raises(ModuleNotFoundError, match="celeriac_no_such_dependency"):
        broken.import_modules()

    forced = Celeriac("forced", set_as_current=False)
    forced.autodiscover_tasks([f"{package}.with_tasks"], force=True)
    assert "discovered.task" in forced.tasks


# -- process state ---------------------------------------------------------------------


def _child_report(app: Celeriac, conn: Any) -> None:
    conn.send((app._producer is None, app.thread_oid))
    conn.close()


def test_fork_drops_the_parents_connections(app: Celeriac) -> None:
    recorder = record(app)
    parent_oid = app.thread_oid
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_report, args=(app, sender))
    child.start()
    assert receiver.poll(20)
    dropped, child_oid = receiver.recv()
    child.join(20)
    assert child.exitcode == 0
    assert dropped
    assert child_oid != parent_oid
    assert app._producer is recorder


def test_close_flushes(app: Celeriac) -> None:
    recorder = record(app)
    app.close()
    assert recorder.flushed == 1 and recorder.closed
    assert app._producer is None
