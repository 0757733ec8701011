"""Canvas on Celery 5.7's wire, with real Celery as the peer, both ways, on Redis and on
RabbitMQ (rpc:// results): chains, callbacks (``link``), errbacks (``link_error``) and
groups started by one library run on the other's workers, and on both at once.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import AMQP_URL, READY_TIMEOUT, WorkerProcess, celeriac_argv, delete_amqp, wait_until

if TYPE_CHECKING:
    from conftest import ResultKeys

    from compat.conftest import CompatDir


def _canvas(client: ModuleType) -> Any:
    """The canvas module of the client's library (``celery`` or ``celeriac``)."""
    return sys.modules[type(client.app).__module__.split(".")[0]]


def _forget_tree(result: Any, result_keys: ResultKeys) -> None:
    node = result
    while node is not None:
        result_keys.add(node.id)
        node = node.parent


def test_chain_runs_on_the_other_library(client: ModuleType, result_keys: ResultKeys) -> None:
    canvas = _canvas(client)
    result = canvas.chain(client.add.s(2, 2), client.add.s(4), client.add.s(8)).apply_async()
    _forget_tree(result, result_keys)
    assert result.get(timeout=15) == 16
    # The last step's result, with the earlier steps as parents (client memory).
    assert result.parent.get(timeout=5) == 8
    assert result.parent.parent.get(timeout=5) == 4
    assert result.parent.parent.parent is None
    # `|` is the same chain, and an immutable step ignores the previous value.
    piped = (client.add.s(1, 1) | client.add.si(10, 10) | client.add.s(5)).delay()
    _forget_tree(piped, result_keys)
    assert piped.get(timeout=15) == 25


def test_chain_lineage_and_children(client: ModuleType, result_keys: ResultKeys) -> None:
    """Every step has the first task as root and the step before as parent; each step's
    stored ``children`` names the next one (sent before its result was stored)."""
    canvas = _canvas(client)
    result = canvas.chain(client.info.si(), client.info.si(), client.info.si()).apply_async()
    _forget_tree(result, result_keys)
    last = result.get(timeout=15)
    middle = result.parent.get(timeout=5)
    first = result.parent.parent.get(timeout=5)
    assert first["root_id"] == first["id"] == result.parent.parent.id
    assert first["parent_id"] is None
    assert middle["root_id"] == last["root_id"] == first["id"]
    assert middle["parent_id"] == first["id"]
    assert last["parent_id"] == middle["id"]
    children = result.parent.parent.children
    assert [child.id for child in children] == [result.parent.id]


def test_link_callbacks_get_the_return_value(
    client: ModuleType, result_keys: ResultKeys, compat: CompatDir
) -> None:
    if compat.env["CELERIAC_TEST_BACKEND"] == "rpc://":
        # As in Celery: a callback's result goes to the reply queue of the worker that
        # sent it (the callback signature was never frozen by the client).
        pytest.skip("rpc:// results of callbacks reach the sending worker, not the client")
    one = client.add.apply_async((1, 1), link=client.add.s(10))
    result_keys.add(one.id)
    assert one.get(timeout=15) == 2
    assert wait_until(lambda: bool(one.children), timeout=15)
    (callback,) = one.children
    result_keys.add(callback.id)
    assert callback.get(timeout=15) == 12
    # Several callbacks are sent together as one group: children holds that group.
    sig = client.add.s(3, 4)
    sig.link(client.add.s(100))
    sig.link(client.add.s(200))
    many = sig.delay()
    result_keys.add(many.id)
    assert many.get(timeout=15) == 7
    (callbacks,) = many.children
    members = list(callbacks.results)
    for member in members:
        result_keys.add(member.id)
    assert sorted(member.get(timeout=15) for member in members) == [107, 207]


def test_errbacks_are_called_as_celery_calls_them(
    client: ModuleType, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    """One that takes (request, exc, traceback) runs in the failing worker; one with
    a single argument left is sent as a message with the failed task's id."""
    key = f"celeriac-test-errbacks-{uuid.uuid4().hex}"
    try:
        failing = client.fail.s("value", "boom").on_error(client.record_failure.s(key))
        failing.link_error(client.on_error.s(key))
        result = failing.delay()
        result_keys.add(result.id)
        with pytest.raises(ValueError, match="boom"):
            result.get(timeout=15)
        assert wait_until(lambda: redis_client.llen(key) >= 2, timeout=15)
        seen = sorted(json.loads(item) for item in redis_client.lrange(key, 0, -1))
        assert seen == [
            ["inline", result.id, "compat.fail", "ValueError", "boom", True],
            ["message", result.id],
        ]
    finally:
        redis_client.delete(key)


def test_a_failing_step_fails_the_rest_of_the_chain(
    client: ModuleType, result_keys: ResultKeys, compat: CompatDir
) -> None:
    canvas = _canvas(client)
    result = canvas.chain(
        client.add.s(1, 1), client.fail.si("value", "broken"), client.add.s(1), client.add.s(2)
    ).apply_async()
    _forget_tree(result, result_keys)
    # The later steps never run: the failing worker stores their FAILURE at once.
    with pytest.raises(ValueError, match="broken"):
        result.get(timeout=15)
    if compat.env["CELERIAC_TEST_BACKEND"] != "rpc://":
        # (Celery's rpc:// client consumes a state message once: no state to read again.)
        assert result.state == "FAILURE"
        # The steps are failed last first: the one before may come a moment later.
        assert wait_until(lambda: result.parent.state == "FAILURE", timeout=15)
    with pytest.raises(ValueError, match="broken"):
        result.parent.get(timeout=5)
    assert result.parent.parent.parent.get(timeout=5) == 2


def test_group_results_in_order(client: ModuleType, result_keys: ResultKeys) -> None:
    canvas = _canvas(client)
    result = canvas.group(client.add.s(i, i) for i in range(5)).apply_async()
    for member in result.results:
        result_keys.add(member.id)
    assert result.get(timeout=15) == [0, 2, 4, 6, 8]
    assert result.ready()
    assert result.successful()
    assert not result.failed()
    assert not result.waiting()
    assert result.completed_count() == 5
    # Partial args go in front of every member's own.
    partial = canvas.group(client.add.s(1), client.add.s(2)).apply_async((10,))
    for member in partial.results:
        result_keys.add(member.id)
    assert partial.join(timeout=15) == [11, 12]


def test_group_members_carry_group_and_index(client: ModuleType, result_keys: ResultKeys) -> None:
    canvas = _canvas(client)
    result = canvas.group(client.info.si(), client.info.si(), client.info.si()).apply_async()
    for member in result.results:
        result_keys.add(member.id)
    infos = result.get(timeout=15)
    assert [info["id"] for info in infos] == [member.id for member in result.results]
    # What each worker read from its message: the group id and the member's index.
    assert [(info["group"], info["group_index"]) for info in infos] == [
        (result.id, 0),
        (result.id, 1),
        (result.id, 2),
    ]
    assert all(info["root_id"] == info["id"] for info in infos)


def test_group_with_a_failure(client: ModuleType, result_keys: ResultKeys) -> None:
    canvas = _canvas(client)
    result = canvas.group(client.add.s(1, 1), client.fail.s("value", "no")).apply_async()
    for member in result.results:
        result_keys.add(member.id)
    with pytest.raises(ValueError, match="no"):
        result.get(timeout=15)
    assert wait_until(result.ready, timeout=15)
    assert result.failed()
    assert not result.successful()
    assert result.completed_count() == 1
    assert result.get(timeout=15, propagate=False)[0] == 2


# -- both libraries' workers in one chain ------------------------------------------------


@pytest.fixture
def second_queue(compat: CompatDir) -> Any:
    name = compat.queue + ".b"
    yield name
    if compat.env["CELERIAC_TEST_BROKER"].startswith("amqp"):
        delete_amqp(AMQP_URL, name)


@pytest.fixture
def mixed_workers(
    compat: CompatDir, start_worker: Any, second_queue: str, result_keys: ResultKeys
) -> Iterator[WorkerProcess]:
    """A Celery worker on the test's queue and a celeriac worker on ``second_queue``
    (returned), both ready."""
    start_worker("celery")
    celeriac_worker = WorkerProcess(
        celeriac_argv(
            "-A", "compat_tasks", "worker", "-l", "info", "-P", "solo", "-Q", second_queue
        ),
        compat.path,
        compat.env,
    )
    try:
        celeriac_worker.wait_for(r" ready\.", timeout=READY_TIMEOUT)
        yield celeriac_worker
    finally:
        assert celeriac_worker.stop() == 0, celeriac_worker.log
        for task_id in celeriac_worker.task_ids():
            result_keys.add(task_id)


@pytest.fixture(params=["celery", "celeriac"])
def mixed_client(request: pytest.FixtureRequest, compat: CompatDir) -> ModuleType:
    """The client's task module (either library) for ``mixed_workers`` tests."""
    return compat.celery_app() if request.param == "celery" else compat.celeriac_app()


def test_one_chain_runs_on_both_libraries_at_once(
    compat: CompatDir, mixed_workers: WorkerProcess, second_queue: str, result_keys: ResultKeys,
    mixed_client: ModuleType,
) -> None:  # fmt: skip
    """Steps routed alternately to the Celery worker's queue and the celeriac worker's:
    each hands the chain on to the other."""
    client = mixed_client
    canvas = _canvas(client)
    queues = [compat.queue if i % 2 else second_queue for i in range(6)]
    steps = [client.info.si().set(queue=queue) for queue in queues]
    steps.append(client.add.si(1, 2).set(queue=compat.queue))
    result = canvas.chain(*steps).apply_async()
    _forget_tree(result, result_keys)
    assert result.get(timeout=20) == 3
    node = result.parent
    ran_on: list[str] = []
    while node is not None:
        ran_on.append(node.get(timeout=5)["id"])
        node = node.parent
    ran_on.reverse()
    assert len(ran_on) == 6
    # celeriac ran the even steps, Celery the odd ones: both took part.
    celeriac_ran = mixed_workers.task_ids()
    assert set(ran_on[::2]) <= celeriac_ran
    assert not set(ran_on[1::2]) & celeriac_ran


# -- the messages themselves ----------------------------------------------------------


def _message_shape(raw: bytes) -> dict[str, Any]:
    """A task message with ids replaced by what they must equal."""
    envelope = json.loads(raw)
    headers = envelope["headers"]
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    reply_to = envelope["properties"]["reply_to"]

    def sig_shape(sig: dict[str, Any]) -> dict[str, Any]:
        options = dict(sig["options"])
        assert options.pop("reply_to", reply_to) == reply_to
        options.pop("task_id", None)
        return {**sig, "options": options}

    return {
        "task": headers["task"],
        "root_id is id": headers["root_id"] == headers["id"],
        "parent_id": headers["parent_id"],
        "group": headers["group"] is not None,
        "group_index": headers["group_index"],
        "args": args,
        "kwargs": kwargs,
        "embed": {
            key: [sig_shape(sig) for sig in value] if isinstance(value, list) else value
            for key, value in embed.items()
        },
    }


def _take(redis_client: redis.Redis, queue: str, count: int) -> list[bytes]:
    assert wait_until(lambda: redis_client.llen(queue) >= count, timeout=10)
    return [redis_client.rpop(queue) for _ in range(count)]


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_messages_are_celerys(compat: CompatDir, redis_client: redis.Redis) -> None:
    """The same chain, link/link_error and group sent by both clients (no worker):
    the same messages, ids aside; the chain's rest is reversed (next step last)."""
    shapes: dict[str, list[dict[str, Any]]] = {}
    for module in (compat.celery_app(), compat.celeriac_app()):
        canvas = _canvas(module)
        add = module.add
        flow = canvas.chain(
            add.s(1, 2), add.s(3), add.si(4, 4).set(countdown=5), module.echo.s(k=1)
        )
        result = flow.apply_async()
        (first,) = _take(redis_client, compat.queue, 1)
        steps = json.loads(base64.b64decode(json.loads(first)["body"]))[2]["chain"]
        # next step last; every step frozen with the id of its result
        assert [step["options"]["task_id"] for step in steps] == [
            result.id,
            result.parent.id,
            result.parent.parent.id,
        ]
        add.apply_async((1, 1), link=add.s(10), link_error=add.si(0, 0))
        linked = _take(redis_client, compat.queue, 1)
        grouped = canvas.group(add.s(1, 1), add.s(2, 2)).apply_async()
        members = sorted(
            _take(redis_client, compat.queue, 2),
            key=lambda raw: json.loads(raw)["headers"]["group_index"],
        )
        for raw in members:
            assert json.loads(raw)["headers"]["group"] == grouped.id
        shapes[type(module.app).__module__] = [
            _message_shape(raw) for raw in (first, *linked, *members)
        ]
    theirs, ours = shapes.values()
    assert ours == theirs
    assert theirs[0]["embed"]["chain"][-1]["args"] == [3]
    assert [shape["group_index"] for shape in theirs[2:]] == [0, 1]


# -- chords (Redis) ---------------------------------------------------------------------


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_chord_joins_across_libraries(client: ModuleType, result_keys: ResultKeys) -> None:
    canvas = _canvas(client)
    result = canvas.chord([client.add.s(i, i) for i in range(10)], client.tsum.s())()
    result_keys.add(result.id)
    for member in result.parent.results:
        result_keys.add(member.id)
    assert result.get(timeout=20) == 90
    # a group piped into a task is a chord too; header results come in header order
    piped = (canvas.group(client.echo.s(i) for i in range(3)) | client.echo.s())()
    result_keys.add(piped.id)
    for member in piped.parent.results:
        result_keys.add(member.id)
    got = piped.get(timeout=20)
    assert [item["args"] for item in got["args"][0]] == [[0], [1], [2]]


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_chord_with_a_failing_header_task(client: ModuleType, result_keys: ResultKeys) -> None:
    """The body never runs; its result is Celery's ChordError naming the failed task;
    the other header tasks still succeed."""
    canvas = _canvas(client)
    header = [client.add.s(1, 1), client.fail.s("value", "boom"), client.add.s(2, 2)]
    result = canvas.chord(header, client.tsum.s())()
    result_keys.add(result.id)
    members = result.parent.results
    for member in members:
        result_keys.add(member.id)
    body = type(result)(result.id, app=client.app)  # no parent: the body's own state
    with pytest.raises(Exception) as raised:
        body.get(timeout=20)
    assert type(raised.value).__name__ == "ChordError"
    assert str(raised.value) == f"Dependency {members[1].id} raised ValueError('boom')"
    assert members[0].get(timeout=10) == 2
    assert members[2].get(timeout=10) == 4


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_chord_header_run_by_both_libraries(
    compat: CompatDir, mixed_workers: WorkerProcess, second_queue: str, result_keys: ResultKeys,
    mixed_client: ModuleType,
) -> None:  # fmt: skip
    """Header tasks alternate between the Celery and the celeriac worker; whichever
    records the last part sends the body, once."""
    client = mixed_client
    canvas = _canvas(client)
    header = [
        client.add.s(i, 1).set(queue=compat.queue if i % 2 else second_queue) for i in range(20)
    ]
    result = canvas.chord(header, client.tsum.s().set(queue=compat.queue))()
    result_keys.add(result.id)
    members = result.parent.results
    for member in members:
        result_keys.add(member.id)
    assert result.get(timeout=30) == sum(range(20)) + 20
    celeriac_ran = mixed_workers.task_ids()
    assert {m.id for m in members[::2]} <= celeriac_ran
    assert not {m.id for m in members[1::2]} & celeriac_ran
    assert result.id not in celeriac_ran  # the body went to the Celery worker's queue


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_a_chord_inside_a_celery_chain(
    compat: CompatDir, start_worker: Any, result_keys: ResultKeys
) -> None:
    """Celery's client puts a chord in ``embed.chain`` (and the steps after it in the
    body's chain); the celeriac worker runs it: the header gets the previous result."""
    start_worker("celeriac")
    client = compat.celery_app()
    canvas = _canvas(client)
    flow = canvas.chain(
        client.add.s(1, 1), canvas.chord([client.add.s(1), client.add.s(2)], client.tsum.s())
    )
    result = flow.apply_async()
    _forget_tree(result, result_keys)
    assert result.get(timeout=20) == 7  # (2 + 1) + (2 + 2)
    longer = canvas.chain(
        client.add.s(1, 1),
        canvas.chord([client.add.s(1), client.add.s(2)], client.tsum.s()),
        client.add.s(100),
    ).apply_async()
    _forget_tree(longer, result_keys)
    assert longer.get(timeout=20) == 107


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_group_then_task_inside_a_chain(client: ModuleType, result_keys: ResultKeys) -> None:
    """``a | group(...) | b | c``: the group and the task after it become a chord; the
    header gets a's result, c follows the body. Run by the other library's worker."""
    canvas = _canvas(client)
    add, tsum = client.add, client.tsum
    result = (add.s(1, 1) | canvas.group(add.s(1), add.s(2)) | tsum.s()).delay()
    _forget_tree(result, result_keys)
    assert result.get(timeout=20) == 7
    longer = canvas.chain(
        add.s(1, 1), canvas.group(add.s(1), add.s(2)), tsum.s(), add.s(100)
    ).apply_async()
    _forget_tree(longer, result_keys)
    assert longer.get(timeout=20) == 107
    first = (canvas.group(add.s(1, 1), add.s(2, 2)) | tsum.s() | add.s(10)).delay()
    _forget_tree(first, result_keys)
    assert first.get(timeout=20) == 16


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_a_redelivered_header_task_counts_once(
    compat: CompatDir, start_worker: Any, result_keys: ResultKeys, redis_client: redis.Redis
) -> None:
    """The same header message delivered twice (as after a crash under acks_late), and
    once more after the body was sent: the join counts it once, the body runs once."""
    process = start_worker("celeriac")
    client = compat.celeriac_app()
    app = client.app
    key = f"celeriac-test-chord-body-{uuid.uuid4().hex}"
    group_id = str(uuid.uuid4())
    body = client.record_failure.s(key)
    body_result = body.freeze(group_id=group_id)
    result_keys.add(body_result.id)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    result_keys.add(first)
    result_keys.add(second)
    app.taskset_backend.chord_set_size(group_id, 2, 3600)

    def send(task_id: str, index: int, x: int) -> None:
        options = {"group": group_id, "group_index": index, "chord": dict(body)}
        app.producer.send("compat.add", task_id, [x, x], {}, compat.queue, options)

    try:
        send(first, 0, 1)
        send(first, 0, 1)
        send(second, 1, 2)
        process.wait_for(rf"compat.add\[{first}\] succeeded", count=2, timeout=15)
        process.wait_for(rf"compat.add\[{second}\] succeeded", timeout=15)
        process.wait_for(rf"compat.record_failure\[{body_result.id}\] succeeded", timeout=15)
        send(first, 0, 1)  # late, after the body was sent
        process.wait_for(rf"compat.add\[{first}\] succeeded", count=3, timeout=15)
        assert [json.loads(item) for item in redis_client.lrange(key, 0, -1)] == [
            ["message", [2, 4]]
        ]
        assert len(re.findall(rf"record_failure\[{body_result.id}\] received", process.log)) == 1
    finally:
        redis_client.delete(key, *(f"celery-taskset-meta-{group_id}.{s}" for s in "cjtsd"))


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_canvas_on_a_prefork_worker(
    compat: CompatDir, start_worker: Any, result_keys: ResultKeys
) -> None:
    """The default pool: each child sends the next steps and joins chords itself."""
    start_worker("celeriac", "-c", "2", pool="prefork")
    client = compat.celery_app()
    canvas = _canvas(client)
    flow = canvas.chain(client.add.s(1, 1), client.add.s(2), client.add.s(3)).apply_async()
    _forget_tree(flow, result_keys)
    assert flow.get(timeout=20) == 7
    joined = canvas.chord([client.add.s(i, i) for i in range(8)], client.tsum.s())()
    result_keys.add(joined.id)
    for member in joined.parent.results:
        result_keys.add(member.id)
    assert joined.get(timeout=20) == 56


# -- map, starmap, chunks; nested chords --------------------------------------------------


# Celery's client finalizes its app to find celery.map; the modules of earlier tests in
# this process (shared tasks of apps of the same name) then warn as duplicates.
@pytest.mark.filterwarnings("ignore::celery.exceptions.DuplicateTaskNameWarning")
def test_map_starmap_and_chunks_across_libraries(
    client: ModuleType, result_keys: ResultKeys
) -> None:
    """``celery.map``/``celery.starmap`` messages of one library run on the other's
    built-in tasks; chunks is a group of starmap messages."""
    mapped = client.tsum.map([[1, 2], [3, 4]]).delay()
    result_keys.add(mapped.id)
    assert mapped.get(timeout=15) == [3, 7]
    starred = client.add.starmap([(1, 2), (3, 4)]).delay()
    result_keys.add(starred.id)
    assert starred.get(timeout=15) == [3, 7]
    chunked = client.add.chunks(zip(range(5), range(5), strict=True), 2)()
    for member in chunked.results:
        result_keys.add(member.id)
    assert chunked.get(timeout=15) == [[0, 2], [4, 6], [8]]


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_nested_chords_across_libraries(client: ModuleType, result_keys: ResultKeys) -> None:
    """A chord in a chord's header (its body is one part of the outer join) and a chord
    as a chord's body, started by one library and joined by the other's worker."""
    canvas = _canvas(client)
    add, tsum = client.add, client.tsum
    in_header = canvas.chord(
        [canvas.chord([add.s(1, 1), add.s(2, 2)], tsum.s()), add.s(10, 10)], tsum.s()
    )()
    _forget_tree(in_header, result_keys)
    assert in_header.get(timeout=20) == 26
    in_body = canvas.chord(
        [add.s(1, 1), add.s(2, 2)], canvas.chord([tsum.s(), tsum.s()], tsum.s())
    )()
    _forget_tree(in_body, result_keys)
    assert in_body.get(timeout=20) == 12


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_get_follows_parents_as_celery_does(client: ModuleType, result_keys: ResultKeys) -> None:
    """A chord with a failing header task: ``get()`` on its result raises the header
    task's own error, in both libraries' clients."""
    canvas = _canvas(client)
    result = canvas.chord([client.fail.s("value", "boom"), client.add.s(1, 1)], client.tsum.s())()
    _forget_tree(result, result_keys)
    for member in result.parent.results:
        result_keys.add(member.id)
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=20)


@pytest.mark.parametrize("compat", ["redis"], indirect=True)
def test_replace_in_the_other_librarys_workflow(
    client: ModuleType, result_keys: ResultKeys
) -> None:
    """A task that replaces itself inside a chain and a chord started by the other
    library: the replacement keeps the task's id, the chain tail and the chord part."""
    canvas = _canvas(client)
    alone = client.replaced.delay(1)
    result_keys.add(alone.id)
    assert alone.get(timeout=15) == 101
    chained = (client.replaced.s(1) | client.add.s(1)).delay()
    _forget_tree(chained, result_keys)
    assert chained.get(timeout=15) == 102
    joined = canvas.chord([client.replaced.s(1), client.add.s(1, 1)], client.tsum.s())()
    _forget_tree(joined, result_keys)
    for member in joined.parent.results:
        result_keys.add(member.id)
    assert joined.get(timeout=20) == 103


def test_collect_walks_the_graph_the_other_library_recorded(
    client: ModuleType, result_keys: ResultKeys, compat: CompatDir
) -> None:
    """``collect()`` on one side follows the ``children`` the other side's worker stored:
    a chain's steps, and several callbacks sent as one group (a GroupResult node, then
    its members), in Celery's order."""
    if compat.env["CELERIAC_TEST_BACKEND"] == "rpc://":
        pytest.skip("rpc:// results of tasks a worker sent reach that worker, not the client")
    canvas = _canvas(client)
    last = canvas.chain(client.add.s(1, 1), client.add.s(2), client.add.s(3)).apply_async()
    _forget_tree(last, result_keys)
    first = last.parent.parent
    collected = list(first.collect(timeout=15))
    assert [value for _, value in collected] == [2, 4, 7]
    assert [node.id for node, _ in collected] == [first.id, last.parent.id, last.id]

    sig = client.add.s(3, 4)
    sig.link(client.add.s(100))
    sig.link(client.add.s(200))
    root = sig.delay()
    result_keys.add(root.id)
    collected = list(root.collect(timeout=15))
    for node, _ in collected:
        result_keys.add(node.id)
    assert [value for _, value in collected] == [7, [107, 207], 107, 207]
    assert type(collected[1][0]).__name__ == "GroupResult"
    assert [value for node, value in collected if not node.children] == [107, 207]


#: Tasks that send others while running (appended to both compat modules).
SENDING_TASKS = """

from {impl} import group


@app.task(name="compat.fanout")
def fanout(n):
    for i in range(n):
        add.delay(i, i)
    return n


@app.task(name="compat.fanout_group")
def fanout_group(n):
    group(add.s(i, 10) for i in range(n)).delay()
    return "sent"


@app.task(name="compat.nested")
def nested(n):
    fanout.delay(n)
    fanout_group.delay(n)
    return "nested"
"""


@pytest.mark.parametrize(
    ("client_kind", "worker_kind"), [("celeriac", "celery"), ("celery", "celeriac")]
)
def test_collect_follows_tasks_sent_inside_a_task_by_the_other_library(
    compat: CompatDir,
    start_worker: Any,
    result_keys: ResultKeys,
    client_kind: str,
    worker_kind: str,
) -> None:
    """The children a worker records for tasks and a group sent from inside a task are
    walked by the other library's collect() in the same order as Celery's own."""
    if compat.env["CELERIAC_TEST_BACKEND"] == "rpc://":
        pytest.skip("rpc:// results of tasks a worker sent reach that worker, not the client")
    from compat.conftest import compat_module

    for impl, module in (("celeriac", "compat_tasks"), ("celery", "celery_tasks")):
        compat.write(f"{module}.py", compat_module(impl, module) + SENDING_TASKS.format(impl=impl))
    start_worker(worker_kind)
    client = compat.celery_app() if client_kind == "celery" else compat.celeriac_app()
    root = client.nested.delay(2)
    collected = list(root.collect(timeout=20))
    for node, _ in collected:
        result_keys.add(node.id)
    assert [value for _, value in collected] == ["nested", 2, "sent", 0, 2, [10, 11], 10, 11]
    assert type(collected[5][0]).__name__ == "GroupResult"
    assert [value for node, value in collected if not node.children] == [0, 2, 10, 11]
