"""Celery's signals: the same names, senders and keyword arguments, sent from the same
process at the same point of a task's or a worker's life.

``connect`` a receiver (a callable taking ``**kwargs``), directly or as a decorator,
optionally for one ``sender`` only; ``send`` calls every live receiver and returns
``[(receiver, response)]``. A receiver that raises is logged and its exception is its
response: it never stops the worker.

Senders are matched by identity (a string by value), as Celery does: for the task
signals the sender is the task object (``before/after_task_publish``: its name).

Sending costs nothing while a signal has no receivers: the worker and the client look
at ``signal.receivers`` before they build any keyword argument.
"""

from __future__ import annotations

import inspect
import logging
import signal
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from celeriac.task_context import Request as Context
from celeriac.utils.einfo import ExceptionInfo
from celeriac.utils.nodenames import client_origin

__all__ = [
    "Signal",
    "after_setup_logger",
    "after_setup_task_logger",
    "after_task_publish",
    "beat_embedded_init",
    "beat_init",
    "before_task_publish",
    "celeryd_after_setup",
    "celeryd_init",
    "heartbeat_sent",
    "import_modules",
    "setup_logging",
    "task_failure",
    "task_internal_error",
    "task_postrun",
    "task_prerun",
    "task_received",
    "task_rejected",
    "task_retry",
    "task_revoked",
    "task_success",
    "task_unknown",
    "worker_init",
    "worker_process_init",
    "worker_process_shutdown",
    "worker_ready",
    "worker_shutdown",
    "worker_shutting_down",
]

logger = logging.getLogger("celeriac.signals")

Receiver = Callable[..., Any]


def _identity(target: Any) -> Hashable:
    """What a receiver or sender is matched by: a string by value, a bound method by
    its instance and function (a new bound method object is made at each access),
    anything else by ``id``."""
    if isinstance(target, (str, bytes)):
        return target
    func = getattr(target, "__func__", None)
    if func is not None:
        return (id(getattr(target, "__self__", None)), id(func))
    return id(target)


_ANY_SENDER = _identity(None)


def _accepts_kwargs(receiver: Receiver) -> bool:
    try:
        parameters = inspect.signature(receiver).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: trust it
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class Signal:
    """A signal receivers connect to (Celery's ``celery.utils.dispatch.Signal``)."""

    def __init__(
        self,
        providing_args: Any = None,
        use_caching: bool = False,
        name: str | None = None,
    ) -> None:
        self.name = name
        self.providing_args = set(providing_args or ())
        #: ``((receiver key, sender key), receiver or weak reference)``; empty when
        #: nothing is connected (the senders test it before building arguments).
        self.receivers: list[tuple[tuple[Hashable, Hashable], Any]] = []
        self.lock = threading.Lock()
        self._dead_receivers = False

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"

    def connect(self, *args: Any, **options: Any) -> Any:
        """``connect(receiver, sender=None, weak=True, dispatch_uid=None)``; also
        ``@signal.connect`` and ``@signal.connect(sender=...)``. Returns the receiver.

        ``weak`` (the default) holds the receiver by a weak reference: a receiver that
        is garbage collected is disconnected. ``dispatch_uid`` connects one receiver
        per uid (and sender), however often the connecting code runs."""
        if args and callable(args[0]):
            return self._connect(args[0], *args[1:], **options)

        def decorate(receiver: Receiver) -> Receiver:
            return self._connect(receiver, *args, **options)

        return decorate

    def _connect(
        self,
        receiver: Receiver,
        sender: Any = None,
        weak: bool = True,
        dispatch_uid: Hashable | None = None,
        retry: bool = False,
    ) -> Receiver:
        if not callable(receiver):
            raise TypeError(f"signal receivers must be callable, not {receiver!r}")
        if not _accepts_kwargs(receiver):
            raise ValueError(f"signal receiver {receiver!r} must accept keyword arguments")
        if retry:
            raise ValueError("connect(retry=True) is not supported by celeriac")
        key = (dispatch_uid if dispatch_uid else _identity(receiver), _identity(sender))
        held: Any = receiver
        if weak:
            if hasattr(receiver, "__self__") and hasattr(receiver, "__func__"):
                held, owner = weakref.WeakMethod(receiver), receiver.__self__
            else:
                held, owner = weakref.ref(receiver), receiver
            weakref.finalize(owner, self._mark_dead)
        with self.lock:
            self._clear_dead_receivers()
            if all(existing != key for existing, _ in self.receivers):
                # A new list, so a send running meanwhile keeps iterating its own.
                self.receivers = [*self.receivers, (key, held)]
        return receiver

    def disconnect(
        self,
        receiver: Receiver | None = None,
        sender: Any = None,
        weak: Any = None,
        dispatch_uid: Hashable | None = None,
    ) -> bool:
        """Disconnect what ``connect`` connected with the same receiver (or
        ``dispatch_uid``) and sender; True when something was disconnected."""
        key = (dispatch_uid if dispatch_uid else _identity(receiver), _identity(sender))
        with self.lock:
            self._clear_dead_receivers()
            kept = [entry for entry in self.receivers if entry[0] != key]
            found = len(kept) != len(self.receivers)
            self.receivers = kept
        return found

    def has_listeners(self, sender: Any = None) -> bool:
        return bool(self._live_receivers(sender))

    def send(self, sender: Any, **named: Any) -> list[tuple[Receiver, Any]]:
        """Call each receiver connected for ``sender`` (or for any sender) with
        ``signal=self, sender=sender, **named``; ``[(receiver, response)]``, a
        receiver's exception being its response (logged, not raised)."""
        if not self.receivers:
            return []
        responses: list[tuple[Receiver, Any]] = []
        for receiver in self._live_receivers(sender):
            try:
                response = receiver(signal=self, sender=sender, **named)
            except Exception as exc:
                logger.exception("Signal handler %r raised: %r", receiver, exc)
                responses.append((receiver, exc))
            else:
                responses.append((receiver, response))
        return responses

    send_robust = send  # Django's name; Celery's send is already robust

    def _live_receivers(self, sender: Any) -> list[Receiver]:
        if self._dead_receivers:
            with self.lock:
                self._clear_dead_receivers()
        wanted = _identity(sender)
        live: list[Receiver] = []
        for (_, sender_key), held in self.receivers:
            if sender_key != _ANY_SENDER and sender_key != wanted:
                continue
            if isinstance(held, weakref.ReferenceType):
                held = held()
                if held is None:
                    continue
            live.append(held)
        return live

    def _mark_dead(self) -> None:
        # Called by the garbage collector, maybe while this thread holds the lock:
        # only flag it; connect/disconnect/send clear the dead entries.
        self._dead_receivers = True

    def _clear_dead_receivers(self) -> None:
        if self._dead_receivers:
            self._dead_receivers = False
            self.receivers = [
                entry
                for entry in self.receivers
                if not (isinstance(entry[1], weakref.ReferenceType) and entry[1]() is None)
            ]


# -- client -------------------------------------------------------------------------------

#: sender: task name; body, exchange, routing_key, headers, properties, declare,
#: retry_policy. Receivers may add message headers (``headers[...] = ...``).
before_task_publish = Signal(name="before_task_publish")
#: sender: task name; body, exchange, routing_key, headers.
after_task_publish = Signal(name="after_task_publish")

# -- tasks (in the process that runs the task; sender: the task object) --------------------

#: sender: the worker (Celery: its consumer); request.
task_received = Signal(name="task_received")
#: task_id, task, args, kwargs.
task_prerun = Signal(name="task_prerun")
#: task_id, task, args, kwargs, retval, state.
task_postrun = Signal(name="task_postrun")
#: result, runtime.
task_success = Signal(name="task_success")
#: request, reason, einfo.
task_retry = Signal(name="task_retry")
#: task_id, exception, args, kwargs, traceback, einfo.
task_failure = Signal(name="task_failure")
#: task_id, args, kwargs, request, exception, traceback, einfo.
task_internal_error = Signal(name="task_internal_error")
#: request, terminated, signum, expired.
task_revoked = Signal(name="task_revoked")
#: sender: the worker; message, exc.
task_rejected = Signal(name="task_rejected")
#: sender: the worker; message, exc, name, id.
task_unknown = Signal(name="task_unknown")

# -- app ----------------------------------------------------------------------------------

#: sender: the app; before the worker (or beat) imports the app's modules.
import_modules = Signal(name="import_modules")

# -- worker -------------------------------------------------------------------------------

#: sender: the node name; instance (the worker), conf, options.
celeryd_init = Signal(name="celeryd_init")
#: sender: the node name; instance, conf.
celeryd_after_setup = Signal(name="celeryd_after_setup")
#: sender: the worker.
worker_init = Signal(name="worker_init")
#: sender: the node name; in each prefork child after the fork, and in a solo worker.
worker_process_init = Signal(name="worker_process_init")
#: sender: the node name; pid, exitcode; in each prefork child as it exits.
worker_process_shutdown = Signal(name="worker_process_shutdown")
#: sender: the worker (Celery: its consumer).
worker_ready = Signal(name="worker_ready")
#: sender: the node name; sig, how, exitcode.
worker_shutting_down = Signal(name="worker_shutting_down")
#: sender: the worker.
worker_shutdown = Signal(name="worker_shutdown")
#: sender: the heart (``celeriac.events.Heart``).
heartbeat_sent = Signal(name="heartbeat_sent")

# -- beat -----------------------------------------------------------------------------

#: sender: the beat service; when beat starts (standalone, or embedded with ``-B``).
beat_init = Signal(name="beat_init")
beat_embedded_init = Signal(name="beat_embedded_init")

# -- logging ----------------------------------------------------------------------------

#: sender None; loglevel, logfile, format, colorize. When it has receivers, the worker
#: leaves logging to them.
setup_logging = Signal(name="setup_logging")
#: sender None; logger, loglevel, logfile, format, colorize.
after_setup_logger = Signal(name="after_setup_logger")
after_setup_task_logger = Signal(name="after_setup_task_logger")


# -- helpers the client and the worker call (each only once a receiver is connected) ------


def app_signals() -> tuple[Signal, Signal, Signal]:
    """An app's ``on_configure``, ``on_after_configure``, ``on_after_finalize``."""
    return (
        Signal(name="app.on_configure"),
        Signal(name="app.on_after_configure"),
        Signal(name="app.on_after_finalize"),
    )


def finalize_app(app: Any) -> None:
    """Send the app's ``on_configure``, ``on_after_configure(source=conf)`` and
    ``on_after_finalize`` once, when the app is first used (a worker or beat starts,
    the first task is sent, or ``app.finalize()``): receivers are connected after
    the app is made, so this is the first point they can be called."""
    if getattr(app, "_signals_finalized", False):
        return
    app._signals_finalized = True
    app.on_configure.send(sender=app)
    app.on_after_configure.send(sender=app, source=app.conf)
    app.on_after_finalize.send(sender=app)


#: Celery's ``task_publish_retry_policy`` default (celeriac's producer retries by its
#: own rules; receivers get the policy Celery would report).
CELERY_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_max": 1,
    "interval_step": 0.2,
}


def send_before_publish(
    app: Any,
    name: str,
    task_id: str,
    args: Any,
    kwargs: Any,
    queue: str,
    opts: dict[str, Any],
) -> None:
    """``before_task_publish`` with the message as Celery would send it; headers a
    receiver adds become the message's headers (how tracing tools pass context)."""
    user = dict(opts.get("headers") or {})
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": opts.get("shadow"),
        "eta": opts.get("eta"),
        "expires": opts.get("expires"),
        "group": opts.get("group_id"),
        "group_index": opts.get("group_index"),
        "retries": opts.get("retries", 0),
        "timelimit": list(opts.get("timelimit") or (None, None)),
        "root_id": opts.get("root_id", task_id),
        "parent_id": opts.get("parent_id"),
        "argsrepr": opts.get("argsrepr") or repr(args),
        "kwargsrepr": opts.get("kwargsrepr") or repr(kwargs),
        "origin": client_origin(),
        "ignore_result": bool(opts.get("ignore_result", False)),
        **user,
    }
    protocol = headers.keys() - user.keys()
    before = dict(headers)
    embed = {
        "callbacks": opts.get("callbacks"),
        "errbacks": opts.get("errbacks"),
        "chain": opts.get("chain"),
        "chord": opts.get("chord"),
    }
    exchange, routing_key = _route(opts, queue)
    before_task_publish.send(
        sender=name,
        body=(list(args), dict(kwargs), embed),
        exchange=exchange,
        routing_key=routing_key,
        headers=headers,
        properties={
            "correlation_id": task_id,
            "reply_to": opts.get("reply_to") or app.process_oid,
            "priority": opts.get("priority"),
        },
        declare=[queue],
        retry_policy=dict(CELERY_RETRY_POLICY),
    )
    changed = {
        key: value
        for key, value in headers.items()
        if key not in protocol and (key not in before or before[key] is not value)
    }
    if changed:
        opts["headers"] = {**user, **changed}


def send_after_publish(
    name: str, task_id: str, args: Any, kwargs: Any, queue: str, opts: Mapping[str, Any]
) -> None:
    exchange, routing_key = _route(opts, queue)
    headers = {"lang": "py", "task": name, "id": task_id, **(opts.get("headers") or {})}
    after_task_publish.send(
        sender=name,
        body=(list(args), dict(kwargs), None),
        exchange=exchange,
        routing_key=routing_key,
        headers=headers,
    )


def _route(opts: Mapping[str, Any], queue: str) -> tuple[str, str]:
    if "exchange" in opts:
        return str(opts["exchange"] or ""), str(opts.get("routing_key") or queue)
    return "", queue  # the default direct exchange, keyed by the queue's name


def shutting_down(nodename: str, signum: int, *, cold: bool) -> None:
    """``worker_shutting_down`` from the process that speaks for the node, in its
    signal handler (as Celery sends it)."""
    if worker_shutting_down.receivers:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        worker_shutting_down.send(
            sender=nodename, sig=name, how="Cold" if cold else "Warm", exitcode=1 if cold else 0
        )


def slot_revoked(app: Any, slot: Any, signum: int) -> None:
    """``task_revoked`` in a prefork supervisor whose child a terminate revoke
    stopped: the supervisor knows the task by the child's slot only."""
    if not task_revoked.receivers:
        return
    task = app.tasks.get(slot.name)
    context = Context(id=slot.task_id, task=slot.name, hostname=None)
    task_revoked.send(sender=task, request=context, terminated=True, signum=signum, expired=False)


def eager_failure(
    task: Any, task_id: str, args: Any, kwargs: Any, exc: BaseException, tb: str
) -> None:
    """``task_failure`` for a task run by ``apply()`` (or ``task_always_eager``)."""
    task_failure.send(
        sender=task,
        task_id=task_id,
        exception=exc,
        args=args,
        kwargs=kwargs,
        traceback=exc.__traceback__,
        einfo=ExceptionInfo(exc, tb),
    )


def setup_worker_logging(
    configure: Callable[[], Any], loglevel: int, logfile: str | None, format: str
) -> None:
    """The worker's logging as Celery sets it up: ``setup_logging`` receivers, if
    any, do it all (the worker's own ``configure`` is skipped; one that raises stops
    the start); else ``configure()``, then ``after_setup_logger`` and
    ``after_setup_task_logger`` with the loggers to adjust."""
    options = {"loglevel": loglevel, "logfile": logfile, "format": format, "colorize": False}
    responses = setup_logging.send(sender=None, **options)
    for _, response in responses:
        if isinstance(response, Exception):
            raise response
    if responses:
        return
    configure()
    after_setup_logger.send(sender=None, logger=logging.getLogger(), **options)
    after_setup_task_logger.send(sender=None, logger=logging.getLogger("celery.task"), **options)
