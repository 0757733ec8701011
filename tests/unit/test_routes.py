"""Routing (Celery's task_routes): names, globs, regexes, dicts, routers, queue= wins."""

from __future__ import annotations

import re
import sys
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celeriac.conf import Settings
from celeriac.exceptions import ImproperlyConfigured, QueueNotFound
from celeriac.routes import QueueSpec, Route, Router, queue_table
from kombu import Exchange, Queue


def router(**settings: Any) -> Router:
    return Router(Settings(**settings))


def test_default_queue() -> None:
    assert router().route("tasks.add") == Route("celery", None, None, None)
    assert router(task_default_queue="jobs").route("tasks.add").queue == "jobs"


def test_exact_name_to_queue_name_or_dict() -> None:
    r = router(
        task_routes={
            "tasks.add": "adds",
            "tasks.mul": {"queue": "muls", "priority": 5},
        }
    )
    assert r.route("tasks.add") == Route("adds")
    assert r.route("tasks.mul") == Route("muls", priority=5)
    assert r.route("tasks.other") == Route("celery")
    assert r.static


def test_globs_and_regexes() -> None:
    r = router(
        task_routes={
            "feed.tasks.*": {"queue": "feeds"},
            re.compile(r"(video|image)\.tasks\..*"): {"queue": "media"},
            "*.slow": "slow",
        }
    )
    assert r.route("feed.tasks.import_feed").queue == "feeds"
    assert r.route("video.tasks.encode").queue == "media"
    assert r.route("image.tasks.resize").queue == "media"
    assert r.route("audio.tasks.encode").queue == "celery"
    assert r.route("reports.slow").queue == "slow"


def test_exact_name_wins_over_patterns_in_one_map() -> None:
    r = router(task_routes={"tasks.*": "globbed", "tasks.add": "exact"})
    assert r.route("tasks.add").queue == "exact"
    assert r.route("tasks.mul").queue == "globbed"


def test_list_of_routers_first_match_wins() -> None:
    r = router(
        task_routes=[
            {"tasks.add": "first"},
            [("tasks.*", {"queue": "pairs"}), (re.compile(r"other\..*"), "regex")],
            {"tasks.add": "never", "tasks.mul": "third"},
        ]
    )
    assert r.route("tasks.add").queue == "first"
    assert r.route("tasks.mul").queue == "pairs"
    assert r.route("other.x").queue == "regex"


def test_router_functions() -> None:
    calls: list[tuple[Any, ...]] = []

    def by_argument(
        name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> Any:
        calls.append((name, args, kwargs, options, task))
        if kwargs.get("urgent"):
            return {"queue": "urgent", "priority": 9}
        return None

    r = router(task_routes=(by_argument, {"tasks.add": "adds"}))
    assert not r.static
    sentinel = object()
    assert r.route("tasks.add", (1,), {"urgent": True}, {"countdown": 3}, task=sentinel) == (
        Route("urgent", priority=9)
    )
    assert calls[-1] == ("tasks.add", (1,), {"urgent": True}, {"countdown": 3}, sentinel)
    assert r.route("tasks.add", (1,), {}).queue == "adds"
    assert r.route("tasks.mul").queue == "celery"


def test_router_function_may_return_a_queue_name() -> None:
    r = router(task_routes=[lambda name, *args, **kw: "q-" + name.rpartition(".")[2]])
    assert r.route("tasks.add").queue == "q-add"


@pytest.fixture
def routers_module() -> Iterator[str]:
    name = f"celeriac_test_routers_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)

    def route_task(name: str, args: Any, kwargs: Any, options: Any, **kw: Any) -> Any:
        return {"queue": "from-dotted"} if name.startswith("dotted.") else None

    class OldStyle:
        def route_for_task(self, task: str, args: Any = None, kwargs: Any = None) -> Any:
            return "old-style" if task == "old.task" else None

    module.route_task = route_task  # type: ignore[attr-defined]
    module.OldStyle = OldStyle  # type: ignore[attr-defined]
    sys.modules[name] = module
    yield name
    del sys.modules[name]


def test_dotted_router_names(routers_module: str) -> None:
    r = router(task_routes=[f"{routers_module}.route_task", f"{routers_module}:OldStyle"])
    assert r.route("dotted.task").queue == "from-dotted"
    assert r.route("old.task").queue == "old-style"
    assert r.route("plain.task").queue == "celery"
    with pytest.raises(ImproperlyConfigured, match="cannot import"):
        router(task_routes=[f"{routers_module}.missing"])


def test_call_options_win_over_routes() -> None:
    r = router(task_routes={"tasks.add": {"queue": "routed", "priority": 2}})
    assert r.route("tasks.add", options={"queue": "explicit"}) == Route("explicit", priority=2)
    assert r.route("tasks.add", options={"priority": 7}) == Route("routed", priority=7)
    assert r.route("tasks.other", options={"queue": "explicit"}).queue == "explicit"


def test_direct_exchange_goes_through_the_default_exchange() -> None:
    r = router(task_routes={"tasks.add": {"queue": "q", "exchange": "ex"}})
    # Exchange without routing key on a direct queue: default exchange, key = queue.
    assert r.route("tasks.add") == Route("q", None, None, None)
    both = r.route("tasks.add", options={"exchange": "ex", "routing_key": "rk"})
    assert both == Route("q", "ex", "rk", None)


def test_task_queues_with_topic_exchange() -> None:
    queues = [
        Queue("default", Exchange("default"), routing_key="default"),
        Queue("feeds", Exchange("media", type="topic"), routing_key="media.feed"),
        {"name": "plain"},
    ]
    conf = Settings(task_queues=queues, task_default_queue="default")
    table = queue_table(conf)
    assert table["feeds"] == QueueSpec("feeds", "media", "topic", "media.feed")
    assert table["plain"] == QueueSpec("plain", "plain", "direct", "plain")
    r = Router(conf)
    assert r.route("x", options={"queue": "feeds"}) == Route("feeds", "media", "media.feed")
    assert r.route("x", options={"queue": "feeds", "routing_key": "media.video"}) == Route(
        "feeds", "media", "media.video"
    )
    assert r.route("x") == Route("default")


def test_missing_queue() -> None:
    conf = Settings(task_queues=[Queue("known")], task_create_missing_queues=False)
    r = Router(conf)
    assert r.route("x", options={"queue": "known"}).queue == "known"
    with pytest.raises(QueueNotFound, match="unknown"):
        r.route("x", options={"queue": "unknown"})
    created = Router(Settings(task_queues=[Queue("known")]))
    assert created.route("x", options={"queue": "other"}) == Route("other")
    assert created.queue("other") == QueueSpec("other", "other", "direct", "other")


def test_default_queue_table() -> None:
    assert queue_table(Settings()) == {"celery": QueueSpec("celery", "celery", "direct", "celery")}
    conf = Settings(task_default_queue="jobs", task_default_routing_key="jobs.key")
    assert queue_table(conf) == {"jobs": QueueSpec("jobs", "jobs", "direct", "jobs.key")}


def test_static_routes_are_cached() -> None:
    r = router(task_routes={"tasks.*": "globbed"})
    first = r.for_name("tasks.add")
    assert r.for_name("tasks.add") is first


def test_bad_routes() -> None:
    with pytest.raises(ImproperlyConfigured):
        router(task_routes={42: "q"})
    with pytest.raises(ImproperlyConfigured):
        router(task_routes=[42])
