"""``celeriac.signals.Signal``: connect (plain and as a decorator), sender matching by
identity, weak references, ``dispatch_uid``, ``disconnect``, ``send``'s answers and a
receiver that raises; the app's configure/finalize signals; the worker's logging set-up
handed to ``setup_logging`` receivers."""

from __future__ import annotations

import gc
import logging
import warnings
from typing import Any

import pytest
from celeriac import Celeriac, signals
from celeriac.signals import Signal


def test_connect_plain_and_as_decorators_and_send_answers() -> None:
    sig = Signal(name="s")
    calls: list[tuple[str, Any, dict[str, Any]]] = []

    def plain(sender: Any = None, **kwargs: Any) -> str:
        calls.append(("plain", sender, kwargs))
        return "a"

    assert sig.connect(plain) is plain

    @sig.connect
    def bare(sender: Any = None, **kwargs: Any) -> str:
        calls.append(("bare", sender, kwargs))
        return "b"

    @sig.connect(weak=False)
    def with_args(sender: Any = None, **kwargs: Any) -> str:
        calls.append(("with_args", sender, kwargs))
        return "c"

    answers = sig.send(sender="me", x=1)
    assert answers == [(plain, "a"), (bare, "b"), (with_args, "c")]
    assert [(name, sender, kw["x"], kw["signal"]) for name, sender, kw in calls] == [
        ("plain", "me", 1, sig),
        ("bare", "me", 1, sig),
        ("with_args", "me", 1, sig),
    ]


def test_sender_is_matched_by_identity_strings_by_value() -> None:
    sig = Signal()
    one, other = object(), object()
    got: list[Any] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        got.append(sender)

    sig.connect(receiver, sender=one)
    sig.connect(receiver, sender="tasks.add")
    sig.send(sender=other)
    sig.send(sender=one)
    sig.send(sender="tasks." + "add")  # an equal string, not the same object
    sig.send(sender="tasks.mul")
    assert got == [one, "tasks.add"]


def collect() -> None:
    """``gc.collect()``, quiet about files other tests left to the collector."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_weak_receivers_go_when_collected_strong_ones_stay() -> None:
    sig = Signal()
    got: list[str] = []

    def make(name: str) -> Any:
        def receiver(**kwargs: Any) -> None:
            got.append(name)

        return receiver

    sig.connect(make("weak"))  # nothing else holds it
    sig.connect(make("strong"), weak=False)

    class Owner:
        def method(self, **kwargs: Any) -> None:
            got.append("method")

    owner = Owner()
    sig.connect(owner.method)  # a bound method: held while its instance lives
    collect()
    sig.send(sender=None)
    assert got == ["strong", "method"]
    del owner
    collect()
    got.clear()
    sig.send(sender=None)
    assert got == ["strong"]
    assert len(sig.receivers) == 1  # the dead entries were cleared


def test_dispatch_uid_connects_once_and_disconnects_by_uid() -> None:
    sig = Signal()
    got: list[str] = []

    def first(**kwargs: Any) -> None:
        got.append("first")

    def second(**kwargs: Any) -> None:
        got.append("second")

    sig.connect(first, dispatch_uid="uid")
    sig.connect(second, dispatch_uid="uid")
    sig.connect(first)  # no uid: a separate connection
    sig.connect(first)  # ... made once
    sig.send(sender=None)
    assert got == ["first", "first"]
    assert sig.disconnect(dispatch_uid="uid") is True
    assert sig.disconnect(dispatch_uid="uid") is False
    assert sig.disconnect(first) is True
    got.clear()
    assert sig.send(sender=None) == []
    assert got == []


def test_disconnect_needs_the_same_sender() -> None:
    sig = Signal()
    sender = object()

    def receiver(**kwargs: Any) -> None:
        pass

    sig.connect(receiver, sender=sender)
    assert sig.disconnect(receiver) is False  # connected for one sender only
    assert sig.has_listeners(sender)
    assert sig.disconnect(receiver, sender=sender) is True
    assert not sig.has_listeners(sender)


def test_a_raising_receiver_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sig = Signal()
    error = RuntimeError("broken")

    def broken(**kwargs: Any) -> None:
        raise error

    def fine(**kwargs: Any) -> int:
        return 7

    sig.connect(broken)
    sig.connect(fine)
    with caplog.at_level(logging.ERROR, logger="celeriac.signals"):
        answers = sig.send(sender=None)
    assert answers == [(broken, error), (fine, 7)]
    assert "Signal handler" in caplog.text and "RuntimeError('broken')" in caplog.text


def test_receivers_must_take_keyword_arguments() -> None:
    sig = Signal()

    def no_kwargs(sender: Any) -> None:
        pass

    with pytest.raises(ValueError, match="must accept keyword arguments"):
        sig.connect(no_kwargs)
    with pytest.raises(TypeError, match="must be callable"):
        sig._connect(42)  # type: ignore[arg-type]
    assert sig.receivers == []


def test_app_signals_fire_once_on_finalize() -> None:
    app = Celeriac("sigapp", broker="sqlite:///:memory:", set_as_current=False)
    got: list[tuple[str, Any, list[str]]] = []

    @app.on_configure.connect
    def configure(sender: Any = None, **kwargs: Any) -> None:
        got.append(("configure", sender, sorted(kwargs)))

    @app.on_after_configure.connect
    def after_configure(sender: Any = None, **kwargs: Any) -> None:
        got.append(("after_configure", sender, sorted(kwargs)))

    @app.on_after_finalize.connect
    def after_finalize(sender: Any = None, **kwargs: Any) -> None:
        got.append(("after_finalize", sender, sorted(kwargs)))

    app.finalize()
    app.finalize()
    assert got == [
        ("configure", app, ["signal"]),
        ("after_configure", app, ["signal", "source"]),
        ("after_finalize", app, ["signal"]),
    ]


def test_import_modules_is_sent_before_the_imports() -> None:
    app = Celeriac("sigapp", broker="sqlite:///:memory:", set_as_current=False)
    app.conf.imports = ("json",)
    senders: list[Any] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        senders.append(sender)

    signals.import_modules.connect(receiver)
    try:
        app.import_modules()
    finally:
        signals.import_modules.disconnect(receiver)
    assert senders == [app]


def test_setup_logging_receivers_replace_the_workers_logging() -> None:
    configured: list[str] = []
    seen: list[dict[str, Any]] = []

    def own_logging(**kwargs: Any) -> None:
        seen.append(kwargs)

    signals.setup_logging.connect(own_logging)
    try:
        signals.setup_worker_logging(lambda: configured.append("ours"), 20, None, "%(message)s")
    finally:
        signals.setup_logging.disconnect(own_logging)
    assert configured == []
    assert sorted(seen[0]) == ["colorize", "format", "logfile", "loglevel", "sender", "signal"]

    after: list[Any] = []

    def adjust(logger: Any = None, **kwargs: Any) -> None:
        after.append(logger)

    signals.after_setup_logger.connect(adjust)
    signals.after_setup_task_logger.connect(adjust)
    try:
        signals.setup_worker_logging(lambda: configured.append("ours"), 20, None, "%(message)s")
    finally:
        signals.after_setup_logger.disconnect(adjust)
        signals.after_setup_task_logger.disconnect(adjust)
    assert configured == ["ours"]
    assert after == [logging.getLogger(), logging.getLogger("celery.task")]


def test_every_celery_signal_is_defined() -> None:
    celery_signals = pytest.importorskip("celery.signals")
    wanted = {
        "before_task_publish", "after_task_publish", "task_received", "task_prerun",
        "task_postrun", "task_success", "task_failure", "task_retry", "task_revoked",
        "task_rejected", "task_unknown", "task_internal_error", "celeryd_init",
        "celeryd_after_setup", "worker_init", "worker_process_init",
        "worker_process_shutdown", "worker_ready", "worker_shutting_down",
        "worker_shutdown", "heartbeat_sent", "setup_logging", "after_setup_logger",
        "after_setup_task_logger", "import_modules", "beat_init", "beat_embedded_init",
    }  # fmt: skip
    for name in wanted:
        ours = getattr(signals, name)
        assert isinstance(ours, Signal) and ours.name == getattr(celery_signals, name).name


def test_apply_sends_the_task_signals_as_celerys_eager_run() -> None:
    app = Celeriac("sigapp", broker="sqlite:///:memory:", set_as_current=False)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def fail() -> None:
        raise ValueError("no")

    got: list[tuple[str, Any, Any]] = []
    runtimes: list[float] = []

    def make(name: str) -> Any:
        def receiver(sender: Any = None, **kwargs: Any) -> None:
            if name == "success":
                runtimes.append(kwargs["runtime"])
            got.append((name, sender, kwargs.get("state")))

        return receiver

    receivers = {name: make(name) for name in ("prerun", "success", "failure", "postrun")}
    for name, receiver in receivers.items():
        getattr(signals, f"task_{name}").connect(receiver)
    try:
        assert add.apply((1, 2)).get() == 3
        assert fail.apply().state == "FAILURE"
    finally:
        for name, receiver in receivers.items():
            getattr(signals, f"task_{name}").disconnect(receiver)
    assert got == [
        ("prerun", add, None),
        ("success", add, None),
        ("postrun", add, "SUCCESS"),
        ("prerun", fail, None),
        ("failure", fail, None),
        ("postrun", fail, "FAILURE"),
    ]
    assert len(runtimes) == 1 and runtimes[0] >= 0
