"""Signatures, chains and groups as data: the same dicts (and JSON) as Celery 5.7's,
read both ways, and whole workflows run in-process (``task_always_eager``, ``apply``).

The real ``celery`` package builds the reference dicts; nothing is sent anywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import celeriac
import celery
import pytest
from celeriac import Celeriac, GroupResult, Signature, chain, group, signature
from celeriac.canvas import _chain, maybe_signature
from celery import canvas as celery_canvas


@pytest.fixture
def apps() -> Iterator[tuple[Any, Any, Any, Any]]:
    """A celeriac app and a Celery app, each with ``t.add`` and ``t.fail``."""
    ours = Celeriac("canvas-test", broker="memory://unused", backend=None)
    theirs = celery.Celery("canvas-test", broker="memory://", backend="cache+memory://")

    @ours.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @theirs.task(name="t.add")
    def celery_add(x: int, y: int) -> int:
        return x + y

    yield ours, theirs, add, celery_add


def as_json(sig: Any) -> Any:
    """What goes on the wire (kombu's JSON: tuples become lists)."""
    return json.loads(json.dumps(sig, default=dict))


def test_signature_dicts_are_celerys(apps: tuple[Any, Any, Any, Any]) -> None:
    _, _, add, celery_add = apps
    pairs = [
        (add.s(2, 2), celery_add.s(2, 2)),
        (add.si(1, 1), celery_add.si(1, 1)),
        (add.s(2).set(countdown=10, queue="q"), celery_add.s(2).set(countdown=10, queue="q")),
        (add.s(x=1), celery_add.s(x=1)),
        (
            add.signature((1,), {"y": 2}, countdown=3),
            celery_add.signature((1,), {"y": 2}, countdown=3),
        ),
        (
            add.s(1).clone((5,), {"z": 1}, queue="w"),
            celery_add.s(1).clone((5,), {"z": 1}, queue="w"),
        ),
        (
            add.s(1).replace(args=(7,), options={"a": 1}),
            celery_add.s(1).replace(args=(7,), options={"a": 1}),
        ),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, dict)
        assert as_json(ours) == as_json(theirs)
        assert list(ours) == list(theirs)  # same keys, same order
        assert repr(ours) == repr(theirs)


def test_composites_are_celerys(apps: tuple[Any, Any, Any, Any]) -> None:
    _, _, add, celery_add = apps
    assert as_json(chain(add.s(2, 2), add.s(4))) == as_json(
        celery.chain(celery_add.s(2, 2), celery_add.s(4))
    )
    assert as_json(add.s(1) | add.s(2) | add.s(3)) == as_json(
        celery_add.s(1) | celery_add.s(2) | celery_add.s(3)
    )
    assert as_json(group(add.s(1, 1), add.s(2, 2))) == as_json(
        celery.group(celery_add.s(1, 1), celery_add.s(2, 2))
    )
    # links and errbacks are lists of signature dicts in the options
    ours = add.s(1, 1)
    theirs = celery_add.s(1, 1)
    assert ours.link(add.s(5)) == add.s(5)
    theirs.link(celery_add.s(5))
    assert ours.on_error(add.si(0, 0)) is ours
    theirs.on_error(celery_add.si(0, 0))
    assert as_json(ours) == as_json(theirs)


def test_celerys_dicts_read_back(apps: tuple[Any, Any, Any, Any]) -> None:
    ours_app, _, _, celery_add = apps
    flow = celery.chain(celery_add.s(2, 2), celery.group(celery_add.s(1), celery_add.s(2)))
    read = signature(as_json(flow), app=ours_app)
    assert isinstance(read, _chain)
    first, second = read.tasks
    assert type(first) is Signature
    assert first.task == "t.add"
    assert first.args == (2, 2)
    assert isinstance(second, group)
    assert [t.args for t in second.tasks] == [(1,), (2,)]
    # An unknown subtask_type is read as a plain signature (as Celery does).
    plain = maybe_signature({**as_json(celery_add.s(1)), "subtask_type": "martian"})
    assert type(plain) is Signature


def test_partial_arguments(apps: tuple[Any, Any, Any, Any]) -> None:
    _, _, add, celery_add = apps
    for sig in (add.s(2, z=1), celery_add.s(2, z=1)):
        args, kwargs, options = sig._merge((4,), {"w": 2}, {"queue": "q"})
        assert (tuple(args), kwargs, options) == ((4, 2), {"z": 1, "w": 2}, {"queue": "q"})
    for sig in (add.si(2, 2), celery_add.si(2, 2)):
        args, kwargs, _ = sig._merge((4,), {"w": 2}, {})
        assert (tuple(args), kwargs) == ((2, 2), {})
    # group_id, once set, is not replaced by a merge
    for sig in (add.s(1).set(group_id="g"), celery_add.s(1).set(group_id="g")):
        assert sig._merge((), {}, {"group_id": "other"})[2]["group_id"] == "g"
    assert add.s(2)(3) == 5  # called here, now


@pytest.mark.parametrize(
    "bad",
    [
        {"task": 42, "args": [], "kwargs": {}, "options": {}},
        {"task": "t.add", "args": "12", "kwargs": {}, "options": {}},
        {"task": "t.add", "args": [], "kwargs": [], "options": {}},
        {"task": "t.add", "args": [], "kwargs": {}, "options": "fast"},
        {"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": "abc"}},
        {"task": "celery.group", "subtask_type": "group", "kwargs": {"tasks": [1, 2]}},
    ],
)
def test_malformed_signature_dicts_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        signature(bad)


def test_eager_chain_group_and_links(apps: tuple[Any, Any, Any, Any]) -> None:
    app, _, add, _ = apps
    app.conf.task_always_eager = True
    result = chain(add.s(2, 2), add.s(4), add.s(8)).apply_async()
    assert result.get() == 16
    assert result.parent.get() == 8
    assert result.parent.parent.get() == 4
    assert (add.s(1, 1) | add.si(5, 5) | add.s(1)).delay().get() == 11
    assert chain(add.s(i) for i in range(3)).apply((10,)).get() == 13
    grouped = group(add.s(i, i) for i in range(4))()
    assert isinstance(grouped, GroupResult)
    assert grouped.get() == [0, 2, 4, 6]
    assert grouped.completed_count() == 4
    # link: the callback gets the return value (run here under task_always_eager)
    seen: list[Any] = []

    @app.task(name="t.collect")
    def collect(value: Any) -> None:
        seen.append(value)

    add.apply_async((20, 22), link=collect.s())
    assert seen == [42]


def test_a_long_chain_has_no_recursion_limit(apps: tuple[Any, Any, Any, Any]) -> None:
    app, _, add, _ = apps
    app.conf.task_always_eager = True
    flow = chain(add.s(0, 1), *(add.s(1) for _ in range(1999)))
    assert flow.apply_async().get() == 2000
    # Chains inside chains (spliced without recursion when run)
    nested: Any = add.s(0, 0)
    for _ in range(300):
        nested = _chain(nested, add.s(1))
    assert nested.apply().get() == 300


def test_group_and_chord_limits(apps: tuple[Any, Any, Any, Any]) -> None:
    _, _, add, _ = apps
    with pytest.raises(TypeError, match="use a chord"):
        group(add.s(1, 1)).apply_async(link=add.s(1))
    assert isinstance(group(add.s(1, 1), add.s(2, 2)) | add.s(1), celeriac.chord)
    in_chain = add.s(1, 1) | group(add.s(1), add.s(2)) | add.s(1)
    assert isinstance(in_chain.tasks[-1], celeriac.chord)


def test_chords_are_celerys_and_run_eagerly(apps: tuple[Any, Any, Any, Any]) -> None:
    app, _, add, celery_add = apps

    @app.task(name="t.tsum")
    def tsum(numbers: list[int]) -> int:
        return sum(numbers)

    ours = celeriac.chord([add.s(1, 1), add.s(2, 2)], tsum.s())
    theirs = celery.chord([celery_add.s(1, 1), celery_add.s(2, 2)], celery.signature("t.tsum"))
    assert as_json(ours) == as_json(theirs)
    read = signature(as_json(theirs), app=app)
    assert isinstance(read, celeriac.chord)
    assert [t.args for t in read.tasks.tasks] == [(1, 1), (2, 2)]
    app.conf.task_always_eager = True
    assert ours().get() == 6
    assert (group(add.s(i, i) for i in range(4)) | tsum.s()).delay().get() == 12
    assert celeriac.chord([], tsum.s()).apply().get() == 0
    assert (add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s()).apply().get() == 7


def test_reexports_match_celery() -> None:
    for name in ("Signature", "chain", "group", "chord", "signature", "maybe_signature", "subtask"):
        assert hasattr(celery, name)
        assert hasattr(celeriac, name)
    assert callable(celery_canvas.maybe_signature)


def test_eager_errbacks_by_celerys_rule(apps: tuple[Any, Any, Any, Any]) -> None:
    app, _, _, _ = apps
    app.conf.task_always_eager = True
    seen: list[Any] = []

    @app.task(name="t.boom")
    def boom() -> None:
        raise KeyError("gone")

    @app.task(name="t.by_id")
    def by_id(task_id: str) -> None:
        seen.append(("message", task_id))

    @app.task(name="t.inline")
    def inline(request: Any, exc: BaseException, traceback: Any) -> None:
        seen.append(("inline", request.id, type(exc).__name__, "KeyError" in traceback))

    result = boom.apply_async(link_error=[by_id.s(), inline.s()])
    assert result.failed()
    assert sorted(seen) == [("inline", result.id, "KeyError", True), ("message", result.id)]


def test_chords_are_refused_where_they_cannot_be_joined() -> None:
    """On rpc://, with Celery's error, before any message (Redis and SQLite join them)."""
    app = Celeriac("no-chords", broker="amqp://guest:guest@127.0.0.1:5672//", backend="rpc://")

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(NotImplementedError, match='The "rpc" result backend does not support'):
        celeriac.chord([add.s(1, 1), add.s(2, 2)], add.s(1)).apply_async()
    assert app._producer is None  # never connected: nothing was sent
