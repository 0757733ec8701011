"""Mingle without a broker: the replies to a worker's start-up ``hello`` go through
``mingle.sync`` (the code path of the real thread) — good ones are merged (revoked ids,
logical clock; in prefork passed on to the children over real socket pairs), our own
is ignored, malformed ones are logged and skipped. The ``RevokedSet`` merge rules."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac import Celeriac, control
from celeriac.worker import Worker, WorkerOptions, mingle
from celeriac.worker.revoke import RevokedSet


def _worker(tmp_path: Path, name: str = "unit@test") -> Worker:
    """A worker that is built, not started: nothing connects."""
    app = Celeriac("unit", broker=f"sqlite:///{tmp_path}/unit.db")
    return Worker(app, WorkerOptions(hostname=name, pool="solo"))


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    yield _worker(tmp_path)


def test_replies_are_merged_and_our_own_ignored(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    box = control.Pidbox(worker)
    worker.revoked.add(["local-1"], 9)
    before = next(control.node_clock)
    replies: list[Any] = [
        {"unit@test": {"revoked": ["ours-only"], "clock": 10**6}},  # our own: ignored
        {"celery@a": {"revoked": ["a-1", "a-2", "local-1"], "clock": before + 500}},
        {"celeriac@b": {"revoked": {"b-1": [1700000000.0, "b-1"]}, "clock": 3}},  # older Celery
        {"celeriac@c": None},  # nothing to say
    ]
    with caplog.at_level(logging.DEBUG, logger="celeriac.worker.mingle"):
        assert mingle.sync(box, replies) == 2
    assert list(worker.revoked) == ["local-1", "a-1", "a-2", "b-1"]
    assert "ours-only" not in worker.revoked
    assert worker.revoked.terminate_signal("local-1") == 9  # kept as revoked here
    assert next(control.node_clock) > before + 500  # moved past celery@a's clock
    text = caplog.text
    assert "mingle: sync with 2 nodes" in text
    assert "mingle: sync complete" in text
    assert "failed" not in text


def test_all_alone(worker: Worker, caplog: pytest.LogCaptureFixture) -> None:
    box = control.Pidbox(worker)
    with caplog.at_level(logging.INFO, logger="celeriac.worker.mingle"):
        assert mingle.sync(box, []) == 0
        assert mingle.sync(box, [{"unit@test": None}]) == 0  # only our own reply
    assert caplog.text.count("mingle: all alone") == 2
    assert "sync with" not in caplog.text


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("not a dict", "the reply is not a mapping"),
        (["a-1"], "the reply is not a mapping"),
        ({"revoked": "a-1"}, "revoked is not a list of task ids"),
        ({"revoked": 7}, "revoked is not a list of task ids"),
        ({"revoked": ["good", 5, None]}, "revoked holds 2 entries that are not task ids"),
        ({"revoked": ["good", ""]}, "revoked holds 1 entries that are not task ids"),
        ({"revoked": ["good", ["nested"]]}, "revoked holds 1 entries"),
        ({"revoked": ["good"], "clock": "12"}, "clock is not a count"),
        ({"revoked": ["good"], "clock": -1}, "clock is not a count"),
        ({"revoked": ["good"], "clock": True}, "clock is not a count"),
    ],
)
def test_a_malformed_reply_is_logged_and_skipped(
    worker: Worker, caplog: pytest.LogCaptureFixture, answer: Any, why: str
) -> None:
    box = control.Pidbox(worker)
    replies = [{"bad@node": answer}, {"good@node": {"revoked": ["fine-1"], "clock": 1}}]
    with caplog.at_level(logging.INFO, logger="celeriac.worker.mingle"):
        assert mingle.sync(box, replies) == 1
    assert list(worker.revoked) == ["fine-1"]  # nothing of the bad reply taken
    assert f"mingle: sync with bad@node failed: {why}" in caplog.text
    assert "mingle: sync complete" in caplog.text


def test_a_reply_that_is_not_a_mapping_is_skipped(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    box = control.Pidbox(worker)
    with caplog.at_level(logging.INFO, logger="celeriac.worker.mingle"):
        assert mingle.sync(box, ["junk", None, {"n@x": {"revoked": ["x-1"]}}]) == 1
    assert list(worker.revoked) == ["x-1"]
    assert caplog.text.count("skipped a reply that is not a mapping") == 2


def test_prefork_supervisor_passes_the_ids_to_its_children(tmp_path: Path) -> None:
    """The supervisor merges the ids and every child takes them too (children here are
    threads serving real socket pairs, each with a worker of its own)."""
    supervisor = _worker(tmp_path, "node@test")
    children = [_worker(tmp_path, "node@test") for _ in range(2)]
    links = control.ChildLinks()
    try:
        for index, child in enumerate(children):
            child.child = object()  # type: ignore[assignment]  # a prefork child
            end = links.before_fork(index)
            threading.Thread(
                target=control.serve_child, args=(control.Pidbox(child), end), daemon=True
            ).start()
        box = control.Pidbox(supervisor)
        box.links = links
        assert mingle.sync(box, [{"celery@peer": {"revoked": ["p-1", "p-2"], "clock": 4}}]) == 1
        assert list(supervisor.revoked) == ["p-1", "p-2"]
        for child in children:
            assert list(child.revoked) == ["p-1", "p-2"]
        # A Celery worker's hello reaches the children the same way; a child builds no
        # reply of its own (only the supervisor's is sent).
        reply = box.dispatch("hello", {"from_node": "celery@new", "revoked": ["n-1"]})
        assert reply["revoked"] == ["p-1", "p-2", "n-1"]
        for child in children:
            assert list(child.revoked) == ["p-1", "p-2", "n-1"]
            assert control.Pidbox(child).dispatch("hello", {"from_node": "celery@x"}) is None
    finally:
        links.close()


def test_hello_takes_the_ids_a_starting_worker_sends(worker: Worker) -> None:
    box = control.Pidbox(worker)
    assert box.dispatch("hello", {"from_node": "unit@test", "revoked": ["self"]}) is None
    assert "self" not in worker.revoked
    reply = box.dispatch("hello", {"from_node": "celery@old", "revoked": {"old-1": 1.0}})
    assert reply["revoked"] == ["old-1"]  # older Celery sends a mapping keyed by id
    for garbage in ("old-2", 5, [None, 3], {"x": 1}.items()):
        reply = box.dispatch("hello", {"from_node": "celery@bad", "revoked": garbage})
        assert reply["revoked"] == ["old-1"], garbage
    assert isinstance(reply["clock"], int)


def test_revoked_set_merge_and_purge() -> None:
    revoked = RevokedSet(maxlen=3, expires=100.0)
    revoked.add(["t-1"], 15, now=1000.0)
    assert revoked.merge(["t-1", "m-1", "m-2"], now=1050.0) == 2
    assert revoked.ids["t-1"] == (1000.0, 15)  # known here: kept as it was
    assert revoked.merge(["m-3"], now=1060.0) == 1
    assert list(revoked) == ["m-1", "m-2", "m-3"]  # full: the oldest went first
    revoked.purge(now=1155.0)
    assert list(revoked) == ["m-3"]
    # an id that expired here is taken again (stamped now)
    assert revoked.merge(["m-1"], now=1170.0) == 1
    assert revoked.ids["m-1"] == (1170.0, 0)


def test_lamport_clock_adjust() -> None:
    clock = control.LamportClock()
    assert next(clock) == 1
    assert clock.adjust(10) == 11
    assert next(clock) == 12
    assert clock.adjust(3) == 13  # behind us: just a tick
    assert next(clock) == 14
