"""Remote control's node side without a broker: request matching, the command table's
replies to good and bad input, and the prefork supervisor's links to its children
(real socket pairs, children served from threads)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from celeriac import Celeriac, control
from celeriac.worker import Worker, WorkerOptions


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    """A worker that is built, not started: nothing connects."""
    app = Celeriac("unit", broker=f"sqlite:///{tmp_path}/unit.db")

    @app.task(name="unit.add")
    def add(x: int, y: int) -> int:
        return x + y

    yield Worker(app, WorkerOptions(hostname="unit@test", pool="solo"))


def test_matches_destination_pattern_or_everyone() -> None:
    assert control.matches("w1@a", {})
    assert control.matches("w1@a", {"destination": ["w1@a", "w2@a"]})
    assert not control.matches("w3@a", {"destination": ["w1@a"]})
    assert control.matches("w1@a", {"pattern": "w*@a", "matcher": "glob"})
    assert not control.matches("x1@a", {"pattern": "w*@a", "matcher": "glob"})
    assert control.matches("w1@a", {"pattern": r"w\d@", "matcher": "pcre"})
    assert not control.matches("w1@a", {"pattern": "([", "matcher": "pcre"})  # bad regex


def _ours(reply: list[str]) -> list[str]:
    """``registered`` without the shared tasks other test modules attach to every app."""
    return [line for line in reply if line.startswith("unit.")]


def test_replies_to_good_and_bad_requests(worker: Worker) -> None:
    box = control.Pidbox(worker)
    assert box.dispatch("ping", {}) == {"ok": "pong"}
    assert _ours(box.dispatch("registered", {})) == ["unit.add"]
    assert box.dispatch("rate_limit", {"task_name": "unit.add", "rate_limit": "2/s"}) == {
        "ok": "new rate limit set successfully"
    }
    assert _ours(box.dispatch("registered", {})) == ["unit.add [rate_limit=2/s]"]
    assert _ours(box.dispatch("registered", {"taskinfoitems": ["name"]})) == [
        "unit.add [name=unit.add]"
    ]
    assert box.dispatch("rate_limit", {"task_name": "unit.add", "rate_limit": None}) == {
        "ok": "rate limit disabled successfully"
    }
    bad_rate = box.dispatch("rate_limit", {"task_name": "unit.add", "rate_limit": "1/x"})
    assert bad_rate["error"].startswith("Invalid rate limit string: ValueError(")
    assert box.dispatch("rate_limit", {"task_name": "no.such", "rate_limit": "1/s"}) == {
        "error": "unknown task"
    }
    assert box.dispatch("time_limit", {"task_name": "unit.add", "soft": 1, "hard": 2}) == {
        "ok": "time limits set successfully"
    }
    assert worker.app.tasks["unit.add"].time_limit == 2
    assert box.dispatch("time_limit", {"task_name": "no.such"}) == {"error": "unknown task"}
    assert (
        "ValueError" in box.dispatch("time_limit", {"task_name": "unit.add", "hard": -1})["error"]
    )
    assert box.dispatch("no_such", {}) == {"error": "KeyError('no_such')"}
    assert box.dispatch("ping", [1, 2]) == {"error": "arguments must be a mapping, not [1, 2]"}
    assert box.dispatch("ping", {"unexpected": 1}) == {"ok": "pong"}
    grow = box.dispatch("pool_grow", {"n": 2})
    assert grow == {"error": "AttributeError(\"'TaskPool' object has no attribute 'grow'\")"}
    assert box.dispatch("enable_events", {}) == {"error": "event dispatcher unavailable"}
    assert box.dispatch("add_consumer", {})["error"] == "add_consumer needs a queue name"
    assert box.dispatch("active", {}) == []
    assert box.dispatch("reserved", {}) == []
    assert box.dispatch("scheduled", {}) == []
    assert box.dispatch("query_task", {"ids": "some-id"}) == {}
    assert [q["name"] for q in box.dispatch("active_queues", {})] == ["celery"]
    assert box.dispatch("autoscale", {"max": 4}) == {"error": "ValueError('Autoscale not enabled')"}
    assert box.dispatch("report", {})["ok"].startswith("software -> celeriac:")
    # mingle: a Celery worker starting up swaps revoked ids with ours
    assert box.dispatch("hello", {"from_node": "unit@test"}) is None
    hello = box.dispatch("hello", {"from_node": "celery@peer", "revoked": ["id-1", 7]})
    assert hello["revoked"] == ["id-1"]
    assert "id-1" in worker.revoked
    assert box.dispatch("revoked", {}) == ["id-1"]
    stats = box.dispatch("stats", {})
    assert stats["pool"]["max-concurrency"] == 1
    assert stats["pool"]["timeouts"] == []
    assert stats["broker"]["transport"] == "sqlite"


def test_conf_masks_secrets(worker: Worker) -> None:
    worker.app.conf.update(
        result_backend="redis://:s3cret@127.0.0.1:6379/1",
        broker_transport_options={"visibility_timeout": 10},
    )
    worker.app.conf["security_key"] = "private"
    table = control.Pidbox(worker).dispatch("conf", {})
    assert "s3cret" not in str(table)
    assert table["security_key"] == "********"
    assert table["broker_transport_options"] == {"visibility_timeout": 10}
    everything = control.Pidbox(worker).dispatch("conf", {"with_defaults": "true"})
    assert "task_default_queue" in everything


def test_malformed_requests_are_logged_not_raised(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    box = control.Pidbox(worker)
    with caplog.at_level(logging.WARNING, logger="celeriac.control"):
        box.handle(None, "not an envelope")
        box.handle({}, b"{not json")
        box.handle({}, b"[1, 2]")
        box.handle({}, b'{"method": 7}')
        box.handle({}, b'{"method": "no_such"}')
    text = caplog.text
    assert "dropped a malformed message" in text
    assert "not JSON" in text
    assert text.count("without a method") == 2
    assert "no such control command: no_such" in text


def _serve(worker: Worker, end: socket.socket) -> None:
    box = control.Pidbox(worker)
    threading.Thread(target=control.serve_child, args=(box, end), daemon=True).start()


def test_supervisor_answers_once_with_its_children(worker: Worker) -> None:
    """Children (here threads over real socket pairs) answer the supervisor; one that
    stays silent or talks nonsense does not stop the node's reply."""
    links = control.ChildLinks()
    try:
        _serve(worker, links.before_fork(0))
        _serve(worker, links.before_fork(1))
        silent = links.before_fork(2)  # a child that never answers
        garbage_end = links.before_fork(3)

        def talk_nonsense() -> None:
            with contextlib.suppress(OSError), garbage_end, garbage_end.makefile("rb") as lines:
                for _ in lines:
                    garbage_end.sendall(b"nonsense\n" + b'{"seq": -1, "result": 1}\n')

        threading.Thread(target=talk_nonsense, daemon=True).start()
        box = control.Pidbox(worker)
        box.links = links
        worker.totals["unit.add"] = 2
        # merge: the lists of the two answering children, joined
        assert box.dispatch("active", {}) == []
        stats = box.dispatch("stats", {})
        assert stats["total"] == {"unit.add": 4}  # two children with 2 each
        # all: applied here and in the children; one reply
        assert box.dispatch("rate_limit", {"task_name": "unit.add", "rate_limit": "5/m"}) == {
            "ok": "new rate limit set successfully"
        }
        # node: the supervisor alone
        assert box.dispatch("ping", {}) == {"ok": "pong"}
        links.detach(0)
        links.detach(1)
        assert box.dispatch("stats", {})["total"] == {}
    finally:
        silent.close()
        links.close()


def test_every_command_is_documented() -> None:
    for name, found in control.COMMANDS.items():
        assert found.kind in ("inspect", "control"), name
        assert found.scope in ("node", "all", "merge"), name
    assert control.visible("inspect")[:2] == ["active", "active_queues"]
