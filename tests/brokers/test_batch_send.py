"""``Task.delay_many`` / ``apply_async_many``: many messages in one call to the producer,
against the real Redis (and one test on RabbitMQ). Each message must be what
``apply_async`` sends with the same options; a bad item sends nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celeriac import Celery

if TYPE_CHECKING:
    from conftest import ResultKeys, StartWorker, TasksDir

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: header fields that differ between two messages of the same call
PER_MESSAGE = {"id", "root_id", "argsrepr", "kwargsrepr", "eta", "expires"}


@pytest.fixture
def app(queue_name: str) -> Iterator[Celery]:
    app = Celery("batch", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.task_default_queue = queue_name

    @app.task(name="batch.add")
    def add(x: int, y: int) -> int:
        return x + y

    yield app
    app.close()


def messages(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The queue's envelopes, oldest first (kombu LPUSHes and consumers BRPOP)."""
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def body(envelope: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(envelope["body"]))


def test_delay_many_sends_what_delay_sends(
    app: Celery, queue_name: str, redis_client: redis.Redis
) -> None:
    add = app.tasks["batch.add"]
    single = add.delay(-1, -1)
    results = add.delay_many([(i, i * 2) for i in range(1000)])
    app.producer.flush(10.0)
    assert len(results) == 1000
    assert len({r.id for r in results} | {single.id}) == 1001
    sent = messages(redis_client, queue_name)
    assert len(sent) == 1001
    reference, batch = sent[0], sent[1:]
    assert reference["headers"]["id"] == single.id
    for i, (result, envelope) in enumerate(zip(results, batch, strict=True)):
        headers = envelope["headers"]
        assert headers["id"] == result.id == headers["root_id"]
        assert envelope["properties"]["correlation_id"] == result.id
        assert headers["argsrepr"] == repr((i, i * 2))
        assert body(envelope) == [[i, i * 2], {}, body(reference)[2]]
        # Everything else is what delay() wrote: the same keys, the same values.
        assert list(headers) == list(reference["headers"])
        for key, value in reference["headers"].items():
            if key not in PER_MESSAGE:
                assert headers[key] == value, key
        props = {k: v for k, v in envelope["properties"].items() if k != "delivery_tag"}
        ref_props = {k: v for k, v in reference["properties"].items() if k != "delivery_tag"}
        assert props | {"correlation_id": None} == ref_props | {"correlation_id": None}
        assert envelope["content-type"] == reference["content-type"]


def test_options_apply_to_every_message(
    app: Celery, queue_name: str, redis_client: redis.Redis
) -> None:
    add = app.tasks["batch.add"]
    other = f"{queue_name}.other"
    options: dict[str, Any] = {
        "queue": other, "countdown": 60, "expires": 120, "headers": {"x-batch": [1, "a"]},
        "shadow": "shadowed", "time_limit": 30, "soft_time_limit": 20, "ignore_result": True,
    }  # fmt: skip
    single = add.apply_async((0,), {"y": 1}, **options)
    results = add.apply_async_many([(1,), (2,), (3,)], [{"y": 1}, {"y": 2}, {"y": 3}], **options)
    app.producer.flush(10.0)
    assert all(r.ignored for r in results) and single.ignored
    assert redis_client.llen(queue_name) == 0
    reference, *batch = messages(redis_client, other)
    assert [body(m)[:2] for m in batch] == [[[1], {"y": 1}], [[2], {"y": 2}], [[3], {"y": 3}]]
    for envelope in batch:
        headers = envelope["headers"]
        for key, value in reference["headers"].items():
            if key not in PER_MESSAGE:
                assert headers[key] == value, key
        assert headers["x-batch"] == [1, "a"]
        assert headers["shadow"] == "shadowed"
        assert headers["timelimit"] == [30, 20]
        assert headers["ignore_result"] is True
        assert headers["eta"] is not None and headers["expires"] is not None
        assert envelope["properties"]["delivery_info"]["routing_key"] == other
        assert envelope["properties"]["expiration"]


def test_router_function_routes_each_message(
    app: Celery, queue_name: str, redis_client: redis.Redis
) -> None:
    def by_parity(name: str, args: Any, kwargs: Any, options: Any, **rest: Any) -> Any:
        return {"queue": f"{queue_name}.odd"} if args[0] % 2 else None

    app.conf.task_routes = (by_parity,)
    add = app.tasks["batch.add"]
    results = add.delay_many([(i, 0) for i in range(10)])
    app.producer.flush(10.0)
    odd = messages(redis_client, f"{queue_name}.odd")
    even = messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in odd] == [r.id for r in results[1::2]]
    assert [m["headers"]["id"] for m in even] == [r.id for r in results[0::2]]
    assert [body(m)[0][0] for m in odd] == [1, 3, 5, 7, 9]


def test_a_worker_runs_every_message(
    worker: StartWorker, tasks_dir: TasksDir, result_keys: ResultKeys
) -> None:
    worker()
    tasks = tasks_dir.import_module()
    results = tasks.add.delay_many([(i, 1000) for i in range(200)])
    for result in results:
        result_keys.add(result.id)
    assert [r.get(timeout=20) for r in results] == [i + 1000 for i in range(200)]


def test_eager_mode_runs_them_in_place(app: Celery, redis_client: redis.Redis) -> None:
    app.conf.task_always_eager = True
    results = app.tasks["batch.add"].delay_many([(1, 2), (3, 4)])
    assert [r.get() for r in results] == [3, 7]


def test_empty_batch_sends_nothing(app: Celery, queue_name: str, redis_client: redis.Redis) -> None:
    assert app.tasks["batch.add"].delay_many([]) == []
    assert app.tasks["batch.add"].delay_many(iter(())) == []
    assert redis_client.llen(queue_name) == 0


def test_broken_input_raises_and_sends_nothing(
    app: Celery, queue_name: str, redis_client: redis.Redis
) -> None:
    add = app.tasks["batch.add"]
    with pytest.raises(TypeError, match="iterable of argument tuples, not int"):
        add.delay_many(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not str"):
        add.delay_many("ab")  # type: ignore[arg-type]
    items: list[Any] = [(i, i) for i in range(1000)]
    items[500] = (object(), 1)
    with pytest.raises(TypeError, match="item 500") as raised:
        add.delay_many(items)
    assert "object" in str(raised.value)
    items[500] = 7  # not an argument tuple
    with pytest.raises(TypeError, match="item 500: task args must be a list or tuple"):
        add.delay_many(items)
    with pytest.raises(TypeError, match="item 1: task keyword arguments must be a mapping"):
        add.apply_async_many([(1,), (2,)], [{"y": 1}, ["y"]])
    with pytest.raises(ValueError, match="kwargs_list has 1 items and args_list 2"):
        add.apply_async_many([(1,), (2,)], [{"y": 1}])
    with pytest.raises(TypeError, match="no task_id"):
        add.delay_many([(1, 2)], task_id="x")
    with pytest.raises(ValueError, match="time_limit"):
        add.delay_many([(1, 2)], time_limit="soon")
    app.producer.flush(10.0)
    assert redis_client.llen(queue_name) == 0


def test_producer_send_many_refuses_bad_items(app: Celery) -> None:
    producer = app.producer
    with pytest.raises(TypeError, match="items must be a list"):
        producer.send_many("batch.add", ((None, (), {}),), "q")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="item 1: a send_many\\(\\) item must have 3 or 5"):
        producer.send_many("batch.add", [(None, (), {}), (None, ())], "q")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="item 0: task kwargs must be a dict"):
        producer.send_many("batch.add", [(None, (), [])], "q")
    with pytest.raises(ValueError, match="unknown send\\(\\) option"):
        producer.send_many("batch.add", [(None, (), {})], "q", {"bogus": 1})


def test_delay_many_on_rabbitmq() -> None:
    import amqp  # type: ignore[import-untyped]

    queue = f"celeriac-test-batch-{uuid.uuid4().hex[:12]}"
    app = Celery("batch", broker=AMQP_URL)
    app.conf.task_default_queue = queue

    @app.task(name="batch.add")
    def add(x: int, y: int) -> int:
        return x + y

    conn = amqp.Connection(host="127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    channel = conn.channel()
    try:
        results = add.delay_many([(i, -i) for i in range(300)])
        app.producer.flush(10.0)
        received = []
        for _ in range(300):
            message = channel.basic_get(queue, no_ack=True)
            assert message is not None
            received.append(message)
        assert channel.basic_get(queue, no_ack=True) is None
        assert [m.headers["id"] for m in received] == [r.id for r in results]
        assert [json.loads(m.body)[0] for m in received] == [[i, -i] for i in range(300)]
        assert {m.headers["task"] for m in received} == {"batch.add"}
        assert all(m.properties["correlation_id"] == m.headers["id"] for m in received)
    finally:
        with contextlib.suppress(Exception):
            channel.queue_delete(queue)
        conn.close()
        app.close()
