"""Result helpers: Celery's exception format both ways, the stored meta, AsyncResult
and EagerResult without a broker."""

from __future__ import annotations

import datetime
import importlib
import pickle
import sys
import uuid
from pathlib import Path
from typing import Any

import celery
import pytest
from celeriac import Celeriac, states
from celeriac import exceptions as exc
from celeriac.result import (
    AsyncResult,
    EagerResult,
    exception_from_meta,
    exception_to_meta,
    meta_for,
    result_from_tuple,
)
from celeriac.task import Request
from celery.backends.base import BaseBackend


class CustomError(Exception):
    pass


class Outer:
    class NestedError(ValueError):
        pass


class NeedsTwoArguments(Exception):
    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(a, b)


@pytest.fixture(scope="module")
def celery_backend() -> BaseBackend:
    """The real Celery's (JSON) result encoding, to check both directions."""
    return BaseBackend(celery.Celery(set_as_current=False))


# -- exceptions -> meta ------------------------------------------------------------------


def test_builtin_exception_to_meta() -> None:
    assert exception_to_meta(ValueError("boom", 42)) == {
        "exc_type": "ValueError",
        "exc_message": ["boom", 42],
        "exc_module": "builtins",
    }


def test_user_exception_uses_qualname_and_module() -> None:
    meta = exception_to_meta(Outer.NestedError("x"))
    assert meta == {
        "exc_type": "Outer.NestedError",
        "exc_message": ["x"],
        "exc_module": __name__,
    }


@pytest.mark.parametrize(
    ("error", "module", "name"),
    [
        (exc.NotRegistered("tasks.nope"), "celery.exceptions", "NotRegistered"),
        (exc.TaskRevokedError("revoked"), "celery.exceptions", "TaskRevokedError"),
        (exc.MaxRetriesExceededError("too many"), "celery.exceptions", "MaxRetriesExceededError"),
        (exc.Reject("bad", False), "celery.exceptions", "Reject"),
        (exc.Ignore(), "celery.exceptions", "Ignore"),
        (exc.TimeoutError("slow"), "celery.exceptions", "TimeoutError"),
        (exc.CeleriacError("x"), "celery.exceptions", "CeleryError"),
        (exc.SoftTimeLimitExceeded(), "billiard.exceptions", "SoftTimeLimitExceeded"),
        (exc.TimeLimitExceeded(10.0), "billiard.exceptions", "TimeLimitExceeded"),
        (exc.WorkerLostError("gone"), "billiard.exceptions", "WorkerLostError"),
        (exc.OperationalError("down"), "kombu.exceptions", "OperationalError"),
    ],
)
def test_celery_module_names(error: BaseException, module: str, name: str) -> None:
    meta = exception_to_meta(error)
    assert (meta["exc_module"], meta["exc_type"]) == (module, name)
    back = exception_from_meta(meta)
    assert type(back) is type(error)
    assert back.args == error.args


def test_unencodable_arguments_become_repr() -> None:
    marker = object()
    meta = exception_to_meta(ValueError("text", marker, 3))
    assert meta["exc_message"] == ["text", repr(marker), 3]


def test_meta_matches_celery(celery_backend: BaseBackend) -> None:
    for error in (ValueError("boom", 42), KeyError("k"), CustomError()):
        ours = exception_to_meta(error)
        theirs = celery_backend.prepare_exception(error)
        assert ours == {**theirs, "exc_message": list(theirs["exc_message"])}


def test_celery_reads_ours_as_its_own_classes(celery_backend: BaseBackend) -> None:
    from celery import exceptions as celery_exceptions

    revoked = celery_backend.exception_to_python(exception_to_meta(exc.TaskRevokedError("expired")))
    assert type(revoked) is celery_exceptions.TaskRevokedError
    assert revoked.args == ("expired",)
    limit = celery_backend.exception_to_python(exception_to_meta(exc.TimeLimitExceeded(5.0)))
    assert type(limit) is celery_exceptions.TimeLimitExceeded
    value = celery_backend.exception_to_python(exception_to_meta(ValueError("boom", 42)))
    assert type(value) is ValueError
    assert value.args == ("boom", 42)


def test_we_read_celerys_as_our_classes(celery_backend: BaseBackend) -> None:
    from celery import exceptions as celery_exceptions

    for error, ours in (
        (celery_exceptions.NotRegistered("tasks.x"), exc.NotRegistered),
        (celery_exceptions.Retry("again"), exc.Retry),
        (celery_exceptions.SoftTimeLimitExceeded(), exc.SoftTimeLimitExceeded),
        (celery_exceptions.WorkerLostError("lost"), exc.WorkerLostError),
    ):
        meta = dict(celery_backend.prepare_exception(error))
        meta["exc_message"] = list(meta["exc_message"])
        back = exception_from_meta(meta)
        assert isinstance(back, ours), (meta, back)
    not_registered = exception_from_meta(
        {"exc_type": "NotRegistered", "exc_message": ["tasks.x"], "exc_module": "celery.exceptions"}
    )
    assert isinstance(not_registered, KeyError)
    assert "never registered" in repr(not_registered)


# -- meta -> exceptions ------------------------------------------------------------------


def test_round_trip() -> None:
    for error in (ValueError("boom", 42), CustomError("a"), Outer.NestedError("n"), KeyError("k")):
        back = exception_from_meta(exception_to_meta(error))
        assert type(back) is type(error)
        assert back.args == error.args


def test_unknown_module_synthesizes_a_class() -> None:
    meta = {"exc_type": "Boom", "exc_message": ["x", 1], "exc_module": "nowhere.errors"}
    error = exception_from_meta(meta)
    assert isinstance(error, Exception)
    assert type(error).__name__ == "Boom"
    assert type(error).__module__ == "nowhere.errors"
    assert error.args == ("x", 1)
    # The same name gives the same class, so it can be caught by type.
    assert type(exception_from_meta(meta)) is type(error)
    assert exception_to_meta(error) == meta


def test_unknown_class_in_known_module() -> None:
    error = exception_from_meta(
        {"exc_type": "NoSuchError", "exc_message": ["m"], "exc_module": "builtins"}
    )
    assert type(error).__name__ == "NoSuchError"
    assert type(error).__module__ == "builtins"
    assert error.args == ("m",)


def test_non_exception_class_is_never_called() -> None:
    called: list[Any] = []
    meta = {"exc_type": "system", "exc_message": ["echo pwned"], "exc_module": "os"}
    error = exception_from_meta(meta)
    assert isinstance(error, Exception)
    assert type(error).__name__ == "system"
    assert error.args == ("echo pwned",)
    # A class that is not an exception: also synthesized.
    globals()["NotAnError"] = type("NotAnError", (), {"__init__": lambda s, *a: called.append(a)})
    try:
        other = exception_from_meta(
            {"exc_type": "NotAnError", "exc_message": [1], "exc_module": __name__}
        )
    finally:
        del globals()["NotAnError"]
    assert not called
    assert isinstance(other, Exception)


def test_modules_are_not_imported_for_stored_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"celeriac_test_errors_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("class MyError(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    meta = {"exc_type": "MyError", "exc_message": ["m"], "exc_module": name}
    error = exception_from_meta(meta)
    assert name not in sys.modules
    assert type(error).__module__ == name
    # Once the program itself imported the module, its class is used.
    module = importlib.import_module(name)
    try:
        assert type(exception_from_meta(meta)) is module.MyError
    finally:
        del sys.modules[name]


def test_bad_arguments_and_odd_input() -> None:
    error = exception_from_meta(
        {"exc_type": "NeedsTwoArguments", "exc_message": ["only one"], "exc_module": __name__}
    )
    assert type(error) is Exception
    assert "NeedsTwoArguments" in str(error)
    assert exception_from_meta({"exc_type": "ValueError", "exc_message": "text"}).args == ("text",)
    assert isinstance(
        exception_from_meta({"exc_type": "KeyError", "exc_module": "builtins"}), KeyError
    )
    with pytest.raises(ValueError, match="exc_type"):
        exception_from_meta({"exc_message": ["x"]})
    original = ValueError("as is")
    assert exception_from_meta(original) is original


# -- stored meta -------------------------------------------------------------------------


def test_meta_for_success() -> None:
    meta = meta_for("id-1", states.SUCCESS, 5)
    assert list(meta) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == 5
    assert meta["traceback"] is None
    assert meta["children"] == []
    assert meta["task_id"] == "id-1"
    date_done = meta["date_done"]
    assert isinstance(date_done, str) and date_done.endswith("+00:00")
    when = datetime.datetime.fromisoformat(date_done)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 60


def test_meta_for_failure_and_unready_states() -> None:
    failure = meta_for("id-2", states.FAILURE, ValueError("boom", 42), "Traceback...")
    assert failure["result"] == {
        "exc_type": "ValueError",
        "exc_message": ["boom", 42],
        "exc_module": "builtins",
    }
    assert failure["traceback"] == "Traceback..."
    assert failure["date_done"] is not None
    retry = meta_for("id-3", states.RETRY, CustomError("again"), "tb")
    assert retry["date_done"] is None
    assert retry["result"]["exc_type"] == "CustomError"
    started = meta_for("id-4", states.STARTED, {"pid": 1, "hostname": "w@h"})
    assert started["date_done"] is None


def test_meta_for_request_fields() -> None:
    child = AsyncResult("child-1", parent=AsyncResult("parent-0"))
    request = Request(id="id-5", group="g-1", parent_id="p-1")
    request.children.append(child)
    meta = meta_for("id-5", states.SUCCESS, None, request=request)
    assert list(meta) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "group_id",
        "parent_id",
        "task_id",
    ]
    assert meta["group_id"] == "g-1"
    assert meta["parent_id"] == "p-1"
    assert meta["children"] == [(("child-1", (("parent-0", None), None)), None)]
    plain = meta_for("id-6", states.SUCCESS, 1, request={"group": None, "parent_id": None})
    assert "group_id" not in plain and "parent_id" not in plain
    extended = meta_for(
        "id-7",
        states.SUCCESS,
        1,
        request=Request(
            task="tasks.add",
            args=[1],
            kwargs={},
            hostname="w@h",
            retries=2,
            delivery_info={"routing_key": "q"},
        ),
        extended=True,
    )
    assert extended["name"] == "tasks.add"
    assert extended["worker"] == "w@h"
    assert extended["queue"] == "q"
    assert extended["retries"] == 2


# -- AsyncResult / EagerResult -----------------------------------------------------------


def test_async_result_identity() -> None:
    app = Celeriac(set_as_current=False)
    result: AsyncResult[int] = app.AsyncResult("abc")
    assert result.id == result.task_id == "abc"
    assert repr(result) == "<AsyncResult: abc>"
    assert str(result) == "abc"
    assert result == AsyncResult("abc")
    assert result == "abc"
    assert result != AsyncResult("other")
    assert hash(result) == hash(AsyncResult("abc"))
    assert len({result, AsyncResult("abc")}) == 1
    assert result.as_tuple() == (("abc", None), None)
    assert pickle.loads(pickle.dumps(result)) == result
    with pytest.raises(ValueError):
        AsyncResult("")


def test_nothing_configured_keeps_results_in_the_embedded_default() -> None:
    app = Celeriac(set_as_current=False)
    assert app.broker_url == "sqlite://celeriac.sqlite3"
    assert app.result_backend_url == "sqlite://celeriac.sqlite3"


def test_no_backend() -> None:
    # A broker but no backend: results are disabled, as in Celery.
    app = Celeriac(set_as_current=False, broker="redis://127.0.0.1:6379/0")
    assert app.backend is None
    assert app.backend_url_masked == "disabled://"
    result = app.AsyncResult("abc")
    for action in (result.get, lambda: result.state, result.ready, result.forget):
        with pytest.raises(NotImplementedError, match="result backend"):
            action()


def test_unsupported_backend_is_reported_at_first_use() -> None:
    app = Celeriac(set_as_current=False, backend="mongodb://:secret@localhost/results")
    with pytest.raises(exc.ImproperlyConfigured, match="not supported") as raised:
        _ = app.backend
    assert "secret" not in str(raised.value)
    assert app.backend_url_masked == "mongodb://:**@localhost/results"
    assert Celeriac(set_as_current=False, backend="disabled").backend is None


def test_result_from_tuple() -> None:
    result = result_from_tuple([["child", ["parent", None]], None])
    assert result == "child"
    assert result is not None and result.parent == "parent"
    assert result_from_tuple(None) is None
    assert result_from_tuple("plain-id") == "plain-id"


def test_eager_result_success() -> None:
    result: EagerResult[int] = EagerResult("e-1", 4, states.SUCCESS)
    assert result.get() == 4
    assert result.state == result.status == "SUCCESS"
    assert result.result == result.info == 4
    assert result.ready() and result.successful() and not result.failed()
    assert result.traceback is None
    assert isinstance(result.date_done, datetime.datetime)
    assert repr(result) == "<EagerResult: e-1>"


def test_eager_result_collect() -> None:
    """An eager result has no children: collect() yields it alone; a failure raises."""
    result: EagerResult[int] = EagerResult("e-2", 4, states.SUCCESS)
    assert list(result.collect()) == [(result, 4)]
    assert result.get_leaf() == 4
    failed: EagerResult[int] = EagerResult("e-3", ValueError("bad"), states.FAILURE)
    with pytest.raises(ValueError, match="bad"):
        list(failed.collect())
    ((node, error),) = failed.collect(propagate=False)
    assert node is failed and error.args == ("bad",)


def test_eager_result_failure() -> None:
    error = ValueError("boom")
    result: EagerResult[int] = EagerResult("e-2", error, states.FAILURE, traceback="tb")
    with pytest.raises(ValueError, match="boom"):
        result.get()
    assert result.get(propagate=False) is error
    assert result.failed() and result.ready() and not result.successful()
    assert result.traceback == "tb"
    with pytest.raises(ValueError):
        result.maybe_throw()
    revoked: EagerResult[int] = EagerResult("e-3", None, states.REVOKED)
    with pytest.raises(exc.TaskRevokedError):
        revoked.get()


def test_states() -> None:
    assert {"SUCCESS", "FAILURE", "REVOKED"} == states.READY_STATES
    assert {"PENDING", "RECEIVED", "STARTED", "REJECTED", "RETRY"} == states.UNREADY_STATES
    assert {"RETRY", "FAILURE", "REVOKED"} == states.EXCEPTION_STATES
    assert {"FAILURE", "REVOKED"} == states.PROPAGATE_STATES
    assert states.state(states.SUCCESS) > states.state(states.PENDING)
    assert states.state("PROGRESS") > states.state(states.REVOKED)
    assert states.state(states.FAILURE) > states.state("PROGRESS")
    assert states.precedence(states.PENDING) > states.precedence(states.STARTED)
