"""Tasks: ``@app.task`` functions and ``Task`` subclasses, with Celery's attributes.

A :class:`Task` is typed by its function's parameters and return type, so a type
checker flags ``add.delay(1, "x")`` for ``def add(x: int, y: int) -> int``.

The call site checks what it can before anything is sent: the arguments are bound
against the function's signature (Celery's ``typing=True``), ``args`` must be a list or
tuple and ``kwargs`` a mapping, and an argument JSON cannot carry raises ``TypeError``.
"""

from __future__ import annotations

import datetime
import inspect
import socket
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar, cast

from celeriac import canvas_map, signals, states
from celeriac.canvas import Signature
from celeriac.canvas_links import call_errbacks, send_callbacks, signature_list
from celeriac.canvas_replace import replace_task
from celeriac.conf import parse_rate_limit
from celeriac.exceptions import Ignore, Reject, Retry
from celeriac.exceptions import MaxRetriesExceededError as _MaxRetriesExceededError
from celeriac.local import (
    get_current_app,
    get_current_worker_task,
    pop_task,
    push_task,
    set_async_task,
)
from celeriac.result import AsyncResult as _AsyncResult
from celeriac.result import EagerResult, meta_for
from celeriac.sending import send_sent_event, send_task_message
from celeriac.task_context import (
    ASYNC_REQUEST,
    DEFAULT_REQUEST,
    Request,
    is_async_task,
    run_coroutine,
)
from celeriac.task_options import (
    ATTRIBUTE_CHECKS,
    DISPATCH_ATTRIBUTES,
    UNBUILT,
    DispatchDefaults,
    FromConf,
    build_argcheck,
)

if TYPE_CHECKING:
    from celeriac.app import Celeriac

# Request, is_async_task and DispatchDefaults live in task_context and task_options;
# importable here too.
__all__ = ["DispatchDefaults", "Request", "Task", "is_async_task", "rate"]

P = ParamSpec("P")
R = TypeVar("R")

#: Tokens per second for a rate limit string (``"10/m"``); 0.0 = no limit.
rate = parse_rate_limit
#: ``Request`` inside ``Task``'s body, where the class attribute of that name hides it.
_Request = Request


class Task(Generic[P, R]):
    """A task: call it to run it here, ``delay``/``apply_async`` to send it.

    Class attributes are Celery's; ``@app.task(...)`` options set them per task.
    ``ignore_result``, ``acks_late``, ``track_started``, ``serializer``, ``priority``,
    ``rate_limit``, ``reject_on_worker_lost``, ``acks_on_failure_or_timeout``,
    ``store_errors_even_if_ignored`` and ``store_eager_result`` read the app setting
    while not set on the task.
    """

    name: str | None = None
    typing: bool = True
    max_retries: int | None = 3
    default_retry_delay: float = 180
    time_limit: float | None = None
    soft_time_limit: float | None = None
    expires: Any = None
    queue: Any = None
    exchange: Any = None
    routing_key: str | None = None
    autoretry_for: tuple[type[BaseException], ...] = ()
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    retry_kwargs: dict[str, Any] = {}  # noqa: RUF012 - Celery's class attribute
    retry_backoff: bool | float = False
    retry_backoff_max: int = 600
    retry_jitter: bool = True
    throws: tuple[type[BaseException], ...] = ()
    trail: bool = True
    send_events: bool = True
    shadow_name: Any = None

    ignore_result = FromConf("task_ignore_result")
    store_errors_even_if_ignored = FromConf("task_store_errors_even_if_ignored")
    store_eager_result = FromConf("task_store_eager_result")
    serializer = FromConf("task_serializer")
    priority = FromConf("task_default_priority")
    rate_limit = FromConf("task_default_rate_limit")
    track_started = FromConf("task_track_started")
    acks_late = FromConf("task_acks_late")
    acks_on_failure_or_timeout = FromConf("task_acks_on_failure_or_timeout")
    reject_on_worker_lost = FromConf("task_reject_on_worker_lost")

    MaxRetriesExceededError: ClassVar[type[_MaxRetriesExceededError]] = _MaxRetriesExceededError
    Request: ClassVar[type[_Request]] = _Request

    _app: Celeriac | None = None
    _argcheck: Any = UNBUILT
    #: Send defaults the send path worked out for this task (sending.py), kept per class.
    dispatch_defaults: DispatchDefaults | None = None

    # -- attributes ---------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        check = ATTRIBUTE_CHECKS.get(name)
        if check is not None:
            value = check(name, value)
        object.__setattr__(self, name, value)
        if name in DISPATCH_ATTRIBUTES:
            object.__setattr__(self, "dispatch_defaults", None)
        elif name in ("run", "typing"):
            object.__setattr__(self, "_argcheck", UNBUILT)

    @property
    def app(self) -> Celeriac:
        """The app this task belongs to (the current app for a ``shared_task``)."""
        app = self._app
        return app if app is not None else get_current_app()

    @app.setter
    def app(self, app: Celeriac) -> None:
        self._app = app

    @property
    def backend(self) -> Any:
        return self.app.backend

    def _check_attributes(self) -> None:
        """Check attributes that may come from a subclass (not through setattr)."""
        for name, check in ATTRIBUTE_CHECKS.items():
            if name != "serializer" or "serializer" in self.__dict__:
                check(name, getattr(self, name))
        hard, soft = self.time_limit, self.soft_time_limit
        if hard and soft and soft > hard:
            raise ValueError(
                f"task {self.name}: soft_time_limit ({soft}) must not exceed time_limit ({hard})"
            )

    # -- running here -------------------------------------------------------------------

    def run(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """The task body. ``@app.task`` sets it to the decorated function."""
        raise NotImplementedError(f"task {self.name!r} has no run() method")

    def _request_stack(self) -> list[_Request]:
        local = self.__dict__.get("_local")
        if local is None:
            local = self.__dict__.setdefault("_local", threading.local())
        try:
            return cast("list[_Request]", local.stack)
        except AttributeError:
            local.stack = []
            return cast("list[_Request]", local.stack)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task body here, now, in this thread (an ``async def`` body returns
        its coroutine)."""
        if self._request_stack() or self._async_request() is not None:
            # A worker (or apply) already pushed this execution's request.
            return self.run(*args, **kwargs)
        self.push_request(args=args, kwargs=kwargs, called_directly=True)
        try:
            return self.run(*args, **kwargs)
        finally:
            self.pop_request()

    @property
    def request(self) -> _Request:
        """The request of the execution running in this thread, or in this asyncio
        task for an ``async def`` task (an empty one outside)."""
        stack = self._request_stack()
        if stack:
            return stack[-1]
        return self._async_request() or DEFAULT_REQUEST

    def _async_request(self) -> _Request | None:
        current = ASYNC_REQUEST.get()
        if current is not None and current[0] is self:
            return current[1]
        return None

    def enter_async_request(self, request: _Request | None = None, **fields: Any) -> _Request:
        """The worker's ``push_request`` for an ``async def`` execution: call it inside
        the asyncio task that runs it (the request lives in that task's context, so
        nothing needs popping). ``request``: a ready one, else ``Request(**fields)``."""
        if request is None:
            fields.setdefault("called_directly", False)
            request = Request(**fields)
        ASYNC_REQUEST.set((self, request))
        set_async_task(self)
        return request

    def push_request(self, **fields: Any) -> None:
        """Make ``Request(**fields)`` this thread's current request and this task the
        current task. ``called_directly`` defaults to False: pushing is what an
        executor does."""
        fields.setdefault("called_directly", False)
        self._request_stack().append(Request(**fields))
        push_task(self)

    def pop_request(self) -> None:
        stack = self._request_stack()
        if stack:
            stack.pop()
        pop_task()

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        link: Any = None,
        link_error: Any = None,
        task_id: str | None = None,
        retries: int | None = None,
        throw: bool | None = None,
        logfile: Any = None,
        loglevel: Any = None,
        headers: dict[str, Any] | None = None,
        **options: Any,
    ) -> EagerResult[R]:
        """Run the task here and now, as a worker would, and return its result.
        Exceptions are re-raised when ``throw`` (default ``task_eager_propagates``)."""
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        task_id = task_id or str(uuid.uuid4())
        retries = retries or 0
        app = self.app
        if throw is None:
            throw = bool(app.conf["task_eager_propagates"])
        parent = get_current_worker_task()
        parent_request = parent.request if parent is not None else None
        root_id = options.get("root_id") or (
            (parent_request.root_id or parent_request.id) if parent_request else task_id
        )
        ignore_result = options.get("ignore_result")
        self.push_request(
            id=task_id,
            task=self.name,
            args=args,
            kwargs=kwargs,
            retries=retries,
            is_eager=True,
            called_directly=False,
            delivery_info={
                "is_eager": True,
                "exchange": None,
                "routing_key": None,
                "priority": options.get("priority"),
            },
            hostname=socket.gethostname(),
            correlation_id=task_id,
            root_id=root_id,
            parent_id=options.get("parent_id") or (parent_request.id if parent_request else None),
            group=options.get("group_id"),
            group_index=options.get("group_index"),
            headers=headers,
            ignore_result=self.ignore_result if ignore_result is None else ignore_result,
            timelimit=(options.get("time_limit"), options.get("soft_time_limit")),
            callbacks=link,
            errbacks=link_error,
            loglevel=loglevel,
            logfile=logfile,
        )
        tb: str | None = None
        retry: Retry | None = None
        retval: Any = None
        state = states.FAILURE
        try:
            if signals.task_prerun.receivers:  # as Celery's eager runs send them too
                signals.task_prerun.send(
                    sender=self, task_id=task_id, task=self, args=args, kwargs=kwargs
                )
            started = time.monotonic()
            try:
                self.before_start(task_id, args, kwargs)
                retval = self(*args, **kwargs)
                if inspect.iscoroutine(retval):
                    retval = run_coroutine(retval)
                state = states.SUCCESS
            except Retry as exc:
                if exc.is_eager and isinstance(exc.sig, Mapping):
                    retry = exc
                retval, state, tb = exc, states.RETRY, traceback.format_exc()
            except Ignore as exc:
                retval, state = exc, states.IGNORED
            except Exception as exc:
                retval, state, tb = exc, states.FAILURE, traceback.format_exc()
                if link_error:
                    call_errbacks(signature_list(link_error, app), self.request, exc, tb, app, True)
                self.on_failure(exc, task_id, args, kwargs, None)
                if signals.task_failure.receivers:
                    signals.eager_failure(self, task_id, args, kwargs, exc, tb)
                if throw:
                    raise
            else:
                if link:  # sent as messages, unless task_always_eager runs them here
                    sigs = signature_list(link, app)
                    send_callbacks(sigs, retval, app, parent_id=task_id, root_id=root_id)
                self.on_success(retval, task_id, args, kwargs)
                if signals.task_success.receivers:
                    signals.task_success.send(
                        sender=self, result=retval, runtime=time.monotonic() - started
                    )
            self.after_return(state, retval, task_id, args, kwargs, None)
        finally:
            if signals.task_postrun.receivers:
                signals.task_postrun.send(sender=self, task_id=task_id, task=self, args=args,
                                          kwargs=kwargs, retval=retval, state=state)  # fmt: skip
            self.pop_request()
        if retry is not None:
            sig = cast("Mapping[str, Any]", retry.sig)
            return self.apply(
                sig.get("args"),
                sig.get("kwargs"),
                link=link,
                link_error=link_error,
                task_id=task_id,
                retries=retries + 1,
                throw=throw,
                headers=headers,
                **options,
            )
        return EagerResult(task_id, retval, state, traceback=tb, name=self.name)

    # -- signatures ---------------------------------------------------------------------

    def signature(
        self, args: Sequence[Any] | None = None, *starargs: Any, **starkwargs: Any
    ) -> Signature[R]:
        """A signature of this task: ``add.signature((2, 2), countdown=10)``
        (``apply_async``'s parameters: args, kwargs, then options)."""
        starkwargs.setdefault("app", self._app)
        return cast("Signature[R]", Signature(self, args, *starargs, **starkwargs))

    subtask = signature

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """``add.s(2, 2)``: a signature with these arguments (a partial: more can be
        given when it is called, e.g. by a chain)."""
        return cast("Signature[R]", Signature(self, args, kwargs, app=self._app))

    def si(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """An immutable signature: called by a chain or as a callback, it ignores the
        parent's return value."""
        return cast("Signature[R]", Signature(self, args, kwargs, immutable=True, app=self._app))

    # Canvas hooks: the logic is in celeriac.canvas_map and celeriac.canvas_replace.
    def map(self, it: Iterable[Any]) -> canvas_map.xmap:
        return canvas_map.task_map(self, it)

    def starmap(self, it: Iterable[Any]) -> canvas_map.xstarmap:
        return canvas_map.task_starmap(self, it)

    def chunks(self, it: Iterable[Any], n: int) -> canvas_map.chunks:
        return canvas_map.task_chunks(self, it, n)

    def replace(self, sig: Signature[Any]) -> Any:
        return replace_task(self, sig)

    # -- sending ------------------------------------------------------------------------

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> _AsyncResult[R]:
        """Send the task with these arguments (``apply_async`` with no options)."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | str | None = None,
        expires: float | datetime.datetime | str | None = None,
        queue: Any = None,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        ignore_result: bool | None = None,
        routing_key: str | None = None,
        exchange: Any = None,
        shadow: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        link: Any = None,
        link_error: Any = None,
        **options: Any,
    ) -> _AsyncResult[R]:
        """Send the task: one message to the broker, routed by ``task_routes``.

        Raises ``TypeError`` before sending when the arguments do not fit the
        function, ``args`` is not a list/tuple, ``kwargs`` not a mapping, or an
        argument cannot be encoded as JSON.
        """
        if args is None:
            args = ()
        elif type(args) is not tuple and not isinstance(args, (list, tuple)):
            raise TypeError(f"task args must be a list or tuple, not {type(args).__name__}")
        if kwargs is None:
            kwargs = {}
        elif type(kwargs) is not dict and not isinstance(kwargs, Mapping):
            raise TypeError(
                f"task keyword arguments must be a mapping, not {type(kwargs).__name__}"
            )
        app, task, check = self._sender()
        if check is not None:
            check(*args, **kwargs)
        return cast(
            "_AsyncResult[R]",
            send_task_message(
                app,
                task,
                cast(str, task.name),
                args,
                kwargs,
                task_id,
                countdown,
                eta,
                expires,
                queue,
                priority,
                headers,
                ignore_result,
                routing_key,
                exchange,
                shadow,
                time_limit,
                soft_time_limit,
                link,
                link_error,
                options,
            ),
        )

    def _sender(self) -> tuple[Any, Task[Any, Any], Callable[..., None] | None]:
        """The app that sends this task's messages, the task it has registered under
        this name (a shared task's app-bound copy, else this one) and that task's
        argument check, if any."""
        task = self
        app = self._app
        if app is None:
            app = get_current_app()
            registered = app.tasks.get(self.name or "")
            if registered is not None:
                task = registered
        check = task._argcheck
        if check is UNBUILT:
            check = task._build_argcheck()
        return app, task, check

    def delay_many(
        self, args_list: Iterable[Sequence[Any]], **options: Any
    ) -> list[_AsyncResult[R]]:
        """Send one message per item of ``args_list`` (each item: the positional
        arguments of one task, a tuple or list), all with the same ``apply_async``
        options, in one call to the producer. Returns their results, in order.

        ``add.delay_many([(1, 2), (3, 4)])`` sends what ``add.delay(1, 2)`` and
        ``add.delay(3, 4)`` would, with the same routing and headers. Every item is
        checked and encoded before anything is sent: a bad one raises ``TypeError``
        naming its index, and no message goes out.
        """
        return self.apply_async_many(args_list, **options)

    def apply_async_many(
        self,
        args_list: Iterable[Sequence[Any]],
        kwargs_list: Iterable[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> list[_AsyncResult[R]]:
        """``delay_many`` with keyword arguments too: item i of ``kwargs_list`` goes
        with item i of ``args_list`` (same length). ``options`` are ``apply_async``'s,
        shared by every message; each message gets its own task id (so ``task_id`` is
        refused)."""
        if "task_id" in options:
            raise TypeError("apply_async_many() gives every message its own id: no task_id")
        items = _batch_items(args_list, kwargs_list)
        if not items:
            return []
        app, task, check = self._sender()
        if check is not None:
            for index, (args, kwargs) in enumerate(items):
                try:
                    check(*args, **kwargs)
                except TypeError as exc:
                    raise TypeError(f"item {index}: {exc}") from exc
        if signals.before_task_publish.receivers or signals.after_task_publish.receivers:
            # Each message with its own publish signals (and the headers they add).
            return [self.apply_async(args, kwargs, **options) for args, kwargs in items]
        name = cast(str, task.name)
        named = {key: options.pop(key, None) for key in _APPLY_ASYNC_NAMED}

        def plan(args: Sequence[Any], kwargs: Mapping[str, Any], batch: list[Any]) -> Any:
            return send_task_message(
                app, task, name, args, kwargs, None, named["countdown"], named["eta"],
                named["expires"], named["queue"], named["priority"], named["headers"],
                named["ignore_result"], named["routing_key"], named["exchange"],
                named["shadow"], named["time_limit"], named["soft_time_limit"],
                named["link"], named["link_error"], dict(options), batch=batch,
            )  # fmt: skip

        planned: list[Any] = []
        first = plan(items[0][0], items[0][1], planned)
        if not planned:  # task_always_eager: run each one here, as apply_async does
            return [first] + [
                self.apply_async(args, kwargs, **named, **options) for args, kwargs in items[1:]
            ]
        queue, opts, static, parent, confirm, ignore_result = planned[0]
        sent: list[Any]
        if static:
            # One route and one set of options for all: only the ids and arguments vary.
            sent = [(None, args, kwargs) for args, kwargs in items]
        else:
            # task_routes with a router function: each message is routed on its own.
            for args, kwargs in items[1:]:
                plan(args, kwargs, planned)
            sent = [
                (None, args, kwargs, route[0], route[1] or None)
                for (args, kwargs), route in zip(items, planned, strict=True)
            ]
        producer = app.producer
        ids = producer.send_many(name, sent, queue, opts or None)
        if confirm:
            producer.flush(float(app.conf["broker_connection_timeout"]))
        results: list[_AsyncResult[R]] = []
        for task_id in ids:
            result: _AsyncResult[R] = _AsyncResult(task_id, app=app, task_name=name)
            if ignore_result:
                result.ignored = True
            results.append(result)
        if parent is not None:
            for result in results:
                parent.add_trail(result)
        if app.conf["task_send_sent_event"]:
            for task_id, (args, kwargs), route in zip(
                ids, items, planned if not static else [planned[0]] * len(items), strict=True
            ):
                send_sent_event(app, name, task_id, args, kwargs, route[0], route[1])
        return results

    def _build_argcheck(self) -> Callable[..., None] | None:
        check = build_argcheck(self.run) if self.typing else None
        object.__setattr__(self, "_argcheck", check)
        return check

    def AsyncResult(self, task_id: str, **kwargs: Any) -> _AsyncResult[R]:
        """The result of this task with id ``task_id``."""
        return _AsyncResult(task_id, app=self.app, task_name=self.name, **kwargs)

    def retry(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime.datetime | str | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Send this execution again (same task id, ``retries + 1``) and raise
        :class:`~celeriac.exceptions.Retry` so the worker records RETRY.

        Past ``max_retries``, raises ``exc`` (or ``MaxRetriesExceededError``) instead.
        Called outside a worker it raises ``exc`` (or ``Retry``) without sending.
        """
        request = self.request
        retries = request.retries + 1
        limit = self.max_retries if max_retries is None else max_retries
        if request.called_directly:
            if exc is not None:
                raise exc
            raise Retry("Task can be retried", None)
        if not eta and countdown is None:
            countdown = self.default_retry_delay
        args = request.args if args is None else args
        kwargs = request.kwargs if kwargs is None else kwargs
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if limit is not None and retries > limit:
            if exc is not None:
                raise exc
            raise self.MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{args} kwargs:{kwargs}",
                task_args=args,
                task_kwargs=kwargs,
            )
        sig = {"task": self.name, "args": args, "kwargs": kwargs, "options": dict(options)}
        when = eta or countdown
        ret = Retry(exc=exc, when=when, is_eager=request.is_eager, sig=sig)
        if request.is_eager:
            if throw:
                raise ret
            return ret
        try:
            self._send_retry(request, args, kwargs, retries, eta, countdown, options)
        except Exception as send_error:
            raise Reject(send_error, requeue=False) from send_error
        if throw:
            raise ret
        return ret

    def _send_retry(
        self,
        request: _Request,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retries: int,
        eta: Any,
        countdown: float | None,
        options: dict[str, Any],
    ) -> None:
        hard, soft = request.timelimit or (None, None)
        delivery_info = request.delivery_info or {}
        sent: dict[str, Any] = {
            "root_id": request.root_id,
            "parent_id": request.parent_id or request.id,
            "group_id": request.group,
            "group_index": request.group_index,
            "chord": request.chord,
            "chain": request.chain,
            "retries": retries,
            "reply_to": request.reply_to,
            "origin": request.origin,
            "replaced_task_nesting": request.replaced_task_nesting,
            "stamps": request.stamps,
            "stamped_headers": request.stamped_headers,
            "add_to_parent": False,
        }
        queue = options.pop("queue", None)
        exchange = options.pop("exchange", None)
        routing_key = options.pop("routing_key", None)
        if queue is None and exchange is None and routing_key is None:
            di_exchange = delivery_info.get("exchange")
            di_routing_key = delivery_info.get("routing_key")
            if not di_exchange and di_routing_key:
                queue = di_routing_key
            elif di_exchange:
                exchange, routing_key = di_exchange, di_routing_key
        priority = options.pop("priority", None)
        if priority is None:
            priority = delivery_info.get("priority")
        sent.update(options)
        self.apply_async(
            args,
            kwargs,
            task_id=request.id,
            countdown=countdown,
            eta=eta,
            expires=sent.pop("expires", request.expires),
            queue=queue,
            priority=priority,
            headers=sent.pop("headers", request.headers),
            ignore_result=sent.pop("ignore_result", request.ignore_result),
            routing_key=routing_key,
            exchange=exchange,
            shadow=sent.pop("shadow", request.shadow),
            time_limit=sent.pop("time_limit", hard),
            soft_time_limit=sent.pop("soft_time_limit", soft),
            link=sent.pop("link", request.callbacks),
            link_error=sent.pop("link_error", request.errbacks),
            **sent,
        )

    def update_state(
        self,
        task_id: str | None = None,
        state: str | None = None,
        meta: Any = None,
        **kwargs: Any,
    ) -> None:
        """Store a custom state (e.g. ``"PROGRESS"`` with ``meta={...}``)."""
        request = self.request
        if task_id is None:
            task_id = request.id
        if task_id is None:
            raise ValueError("update_state() needs a task_id outside a running task")
        backend = self.app.backend
        if backend is None:
            raise NotImplementedError("update_state() needs a result backend")
        own = request if request.id == task_id else None
        reply: dict[str, Any] = {}
        if own is not None:  # rpc:// sends it to the caller's reply queue
            reply = {
                "reply_to": getattr(own, "reply_to", None),
                "correlation_id": getattr(own, "correlation_id", None) or task_id,
            }
        backend.store(
            task_id, meta_for(task_id, state or states.PENDING, meta, request=own), **reply
        )

    # -- handlers the worker calls (override in a base class) ---------------------------

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Called before the task body runs."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Called after the task returned."""

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Called when the task is to be retried."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Called when the task raised."""

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Called after the task ran, whatever the outcome."""

    def add_trail(self, result: _AsyncResult[Any]) -> _AsyncResult[Any]:
        """Record ``result`` as a child of the running execution (``trail``)."""
        if self.trail:
            self.request.children.append(result)
        return result

    # -- identity -----------------------------------------------------------------------

    def __repr__(self) -> str:
        app = self._app
        owner = f" of {app.main}" if app is not None and app.main else ""
        return f"<@task: {self.name}{owner}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_task_by_name, (self.name,))


#: ``apply_async``'s named options, as ``apply_async_many`` passes them on
_APPLY_ASYNC_NAMED = (
    "countdown", "eta", "expires", "queue", "priority", "headers", "ignore_result",
    "routing_key", "exchange", "shadow", "time_limit", "soft_time_limit", "link", "link_error",
)  # fmt: skip


def _batch_items(
    args_list: Iterable[Sequence[Any]], kwargs_list: Iterable[Mapping[str, Any]] | None
) -> list[tuple[Sequence[Any], dict[str, Any]]]:
    """``apply_async_many``'s input as checked ``(args, kwargs)`` pairs."""
    if isinstance(args_list, (str, bytes, Mapping)) or not isinstance(args_list, Iterable):
        raise TypeError(
            f"args_list must be an iterable of argument tuples, not {type(args_list).__name__}"
        )
    all_args = list(args_list)
    if kwargs_list is None:
        all_kwargs: list[Any] = [{}] * len(all_args)
    else:
        if isinstance(kwargs_list, (str, bytes, Mapping)) or not isinstance(kwargs_list, Iterable):
            raise TypeError(
                f"kwargs_list must be an iterable of mappings, not {type(kwargs_list).__name__}"
            )
        all_kwargs = list(kwargs_list)
        if len(all_kwargs) != len(all_args):
            raise ValueError(
                f"kwargs_list has {len(all_kwargs)} items and args_list {len(all_args)}"
            )
    items: list[tuple[Sequence[Any], dict[str, Any]]] = []
    for index, (args, kwargs) in enumerate(zip(all_args, all_kwargs, strict=True)):
        if not isinstance(args, (list, tuple)):
            raise TypeError(
                f"item {index}: task args must be a list or tuple, not {type(args).__name__}"
            )
        if type(kwargs) is not dict:
            if not isinstance(kwargs, Mapping):
                raise TypeError(
                    f"item {index}: task keyword arguments must be a mapping, "
                    f"not {type(kwargs).__name__}"
                )
            kwargs = dict(kwargs)
        items.append((args, kwargs))
    return items


def _task_by_name(name: str) -> Task[Any, Any]:
    return get_current_app().tasks[name]


def bind_run(task: Task[Any, Any], fun: Callable[..., Any], bind: bool) -> None:
    """Make ``fun`` the body of ``task`` (receiving the task first when ``bind``)."""
    run = types.MethodType(fun, task) if bind else fun
    object.__setattr__(task, "run", run)
    object.__setattr__(task, "_argcheck", UNBUILT)
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        value = getattr(fun, attr, None)
        if value is not None:
            object.__setattr__(task, attr, value)
    object.__setattr__(task, "__wrapped__", fun)
