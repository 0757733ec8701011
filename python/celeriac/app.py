"""The application: settings, its tasks, and its connections.

``Celeriac`` (also ``Celery``) is Celery's app with the same constructor, decorator and
methods. Sending goes straight to the Rust producer: ``add.delay(2, 2)`` checks the
arguments, looks up a cached route and calls ``Producer.send`` once (``sending.py``);
the registry and ``@shared_task`` are in ``registry.py``.

Connections are per process: the producer and the result store are created on first
use and again in a forked child, and what was sent is flushed at interpreter exit.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import logging
import os
import threading
import types
import uuid
import weakref
import zoneinfo
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from celeriac import sending
from celeriac import signals as _signals
from celeriac._core import Backend, Producer, mask_url
from celeriac.canvas import Signature, signature
from celeriac.canvas_map import register_builtins
from celeriac.conf import DEFAULT_BROKER_URL, Settings, import_object, read_object
from celeriac.exceptions import ImproperlyConfigured
from celeriac.fixups import install_fixups
from celeriac.local import (
    get_current_app,
    get_current_worker_task,
    set_current_app,
    set_default_app,
    set_default_app_maker,
)
from celeriac.registry import SHARED_TASKS, TaskRegistry, create_task, gen_task_name, shared_task
from celeriac.result import AsyncResult as _AsyncResult
from celeriac.routes import Router
from celeriac.schedules import periodic_entry
from celeriac.serialization import (
    check_compression,
    check_serializer,
    prepare_accept_content,
)
from celeriac.task import Task as _Task
from celeriac.task_options import UNBUILT, DispatchDefaults, add_autoretry
from celeriac.transports import (
    AMQP_SCHEMES,
    DISABLED_BACKENDS,
    SUPPORTED_BACKENDS,
    SUPPORTED_BROKERS,
    redis_ssl_option,
    scheme_of,
    ssl_option,
    transport_of,
)
from celeriac.utils.nodenames import client_origin

if TYPE_CHECKING:
    from celeriac.routes import QueueSpec

# TaskRegistry, shared_task and transport_of live in their own modules; importable here too.
__all__ = ["Celeriac", "Celery", "TaskRegistry", "shared_task", "transport_of"]

logger = logging.getLogger("celeriac")

P = ParamSpec("P")
R = TypeVar("R")

_UTC = datetime.timezone.utc


# -- process state: fork and exit -------------------------------------------------------

_apps: weakref.WeakSet[Celeriac] = weakref.WeakSet()
# Connections inherited through fork(): never used or dropped in the child (their
# I/O threads do not exist there), only kept alive.
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    for app in list(_apps):
        app._drop_connections_after_fork()


def _flush_at_exit() -> None:
    for app in list(_apps):
        app._flush_at_exit()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_at_exit)


class Celeriac:
    """A celeriac application (Celery's ``Celery``).

    ``Celeriac("tasks", broker="redis://localhost", backend="redis://localhost")``;
    other keyword arguments are settings (``task_default_queue="q"``).
    """

    main: str | None

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        backend: str | None = None,
        include: Iterable[str] | str | None = None,
        config_source: Any = None,
        namespace: str | None = None,
        set_as_current: bool = True,
        task_cls: type[_Task[Any, Any]] | str | None = None,
        **settings: Any,
    ) -> None:
        self.main = main
        self.namespace = namespace
        self.conf = Settings()
        # Constructor arguments win over config_from_object, as in Celery.
        self._preconf: dict[str, Any] = dict(settings)
        if broker is not None:
            self._preconf["broker_url"] = broker
        if backend is not None:
            self._preconf["result_backend"] = backend
        if include is not None:
            self._preconf["include"] = include
        if config_source is not None:
            self.conf.update(read_object(config_source, namespace))
        self.conf.update(self._preconf)
        self._task_cls: type[_Task[Any, Any]] = (
            import_object(task_cls) if isinstance(task_cls, str) else task_cls or _Task
        )
        self._custom_task_cls = task_cls is not None
        self._app_task_cls: type[_Task[Any, Any]] | None = None
        self._tasks = TaskRegistry()
        self._shared_bound = 0
        self._autodiscover: list[tuple[Any, str | None]] = []
        self._lock = threading.RLock()
        self._local = threading.local()
        self._producer: Any = None
        self._producer_pid = 0
        #: AMQP: the queues this producer has sent to and seen declared (the first
        #: message to each is waited for, so that a queue that exists with other
        #: arguments fails that call with RabbitMQ's reason). None: other brokers.
        self.declared_queues: set[str] | None = None
        self._process_oid: tuple[int, str] | None = None
        self._backend: Any = UNBUILT
        self._backend_pid = 0
        #: ``task_send_sent_event``: this process's event dispatcher (made on first use).
        self.client_events: Any = None
        self._router: Router | None = None
        self._router_version = -1
        #: The send path's defaults of tasks sent by name only (sending.py).
        self.name_defaults: dict[str, DispatchDefaults] = {}
        self._annotations_source: Any = None
        self._annotations: list[Any] = []
        self._timezone: datetime.tzinfo = _UTC
        self._timezone_version = -1
        #: Celery's app signals (sender: the app), sent once by ``finalize``.
        self.on_configure, self.on_after_configure, self.on_after_finalize = _signals.app_signals()
        _apps.add(self)
        if set_as_current:
            self.set_current()
        #: Framework fix-ups (Django's when ``DJANGO_SETTINGS_MODULE`` is set).
        #: The frameworks' hooks (Django's), found when the app is made.
        self.fixups = install_fixups(self)
        register_builtins(self)  # celery.map, celery.starmap, ... (celeriac.canvas_map)

    def finalize(self, auto: bool = False) -> None:
        """Send ``on_configure``, ``on_after_configure`` and ``on_after_finalize``
        (once): the worker and beat call it after importing the app's modules, the
        client before its first message."""
        _signals.finalize_app(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.main or '__main__'} at {id(self):#x}>"

    def set_current(self) -> None:
        """Make this the app ``current_app`` and ``shared_task`` objects use."""
        set_current_app(self)

    def set_default(self) -> None:
        """Make this the app used when no app is current (Celery's ``set_default``)."""
        set_default_app(self)

    # -- configuration ----------------------------------------------------------------

    def config_from_object(
        self,
        obj: Any,
        namespace: str | None = None,
        *,
        silent: bool = False,
        force: bool = False,
    ) -> None:
        """Read settings from a module (or its name, e.g. ``"celeryconfig"``), a class,
        an object or a mapping. With ``namespace="CELERY"`` only ``CELERY_*`` names are
        read (``CELERY_BROKER_URL`` -> ``broker_url``). Constructor arguments keep
        precedence."""
        try:
            found = read_object(obj, namespace or self.namespace)
        except (ImportError, AttributeError):
            if silent:
                return
            raise
        self.conf.update(found)
        self.conf.update(self._preconf)

    def config_from_envvar(self, variable_name: str, silent: bool = False) -> None:
        """``config_from_object(os.environ[variable_name])``."""
        module_name = os.environ.get(variable_name)
        if not module_name:
            if silent:
                return
            raise ImproperlyConfigured(f"the environment variable {variable_name!r} is not set")
        self.config_from_object(module_name, silent=silent)

    def autodiscover_tasks(
        self,
        packages: Iterable[str] | Callable[[], Iterable[str]] | None = None,
        related_name: str | None = "tasks",
        force: bool = False,
    ) -> None:
        """Import ``<package>.<related_name>`` for each package when the worker starts
        (:meth:`import_modules`), or now with ``force``. A package without that module
        is skipped. Without ``packages``: the fix-ups' (Django's ``INSTALLED_APPS``)."""
        entry = (packages if packages is not None else self._fixup_packages, related_name)
        if force:
            self._import_related(*entry)
        else:
            self._autodiscover.append(entry)

    def _fixup_packages(self) -> list[str]:
        return [name for fixup in self.fixups for name in fixup.autodiscover_packages() or ()]

    def _import_related(self, packages: Any, related_name: str | None) -> list[types.ModuleType]:
        names = packages() if callable(packages) else packages
        if isinstance(names, str):
            names = [names]
        modules = []
        for package in names:
            module_name = f"{package}.{related_name}" if related_name else package
            try:
                modules.append(importlib.import_module(module_name))
            except ImportError as exc:
                if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
                    continue  # the package has no such module
                # The same error (as Celery propagates it), saying which module failed.
                message = f"importing {module_name} failed: {exc}"
                try:
                    named = type(exc)(message, name=exc.name)
                except TypeError:  # a subclass with its own constructor
                    named = ImportError(message, name=exc.name)
                raise named from exc
        return modules

    def import_modules(self) -> list[types.ModuleType]:
        """Import ``include`` and ``imports`` modules and the autodiscovered task
        modules (the worker calls this at start)."""
        _signals.import_modules.send(sender=self)
        for fixup in self.fixups:
            fixup.on_import_modules()
        names = [*self.conf["imports"], *self.conf["include"]]
        modules = [importlib.import_module(name) for name in dict.fromkeys(names)]
        for packages, related_name in self._autodiscover:
            modules.extend(self._import_related(packages, related_name))
        return modules

    def add_periodic_task(
        self,
        schedule: Any,
        sig: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        **opts: Any,
    ) -> str:
        """Add an entry to ``beat_schedule``: run ``sig`` (a signature, a task or a
        task name) on ``schedule``; returns the entry's name."""
        key, entry = periodic_entry(schedule, sig, args, kwargs, name, opts)
        self.conf["beat_schedule"][key] = entry
        return key

    # -- tasks ------------------------------------------------------------------------

    @property
    def Task(self) -> type[_Task[Any, Any]]:
        """The base class of this app's tasks (``task_cls``), bound to this app."""
        cls = self._app_task_cls
        if cls is None:
            base = self._task_cls
            cls = type(base.__name__, (base,), {"_app": self, "__module__": base.__module__})
            self._app_task_cls = cls
        return cls

    @property
    def tasks(self) -> TaskRegistry:
        """Every task of this app, including ``shared_task`` ones."""
        if self._shared_bound < len(SHARED_TASKS):
            self._bind_shared()
        if self.conf["task_annotations"] is not self._annotations_source:
            self.load_annotations()
        return self._tasks

    def _bind_shared(self) -> None:
        with self._lock:
            while self._shared_bound < len(SHARED_TASKS):
                fun, options = SHARED_TASKS[self._shared_bound]
                self._shared_bound += 1
                opts = dict(options)
                if opts["name"] not in self._tasks:
                    self._register(create_task(self, fun, opts.pop("base"), opts.pop("bind"), opts))

    @overload
    def task(self, fun: Callable[P, R], /, **options: Any) -> _Task[P, R]: ...
    @overload
    def task(
        self, /, *, bind: Literal[True], **options: Any
    ) -> Callable[[Callable[Concatenate[Any, P], R]], _Task[P, R]]: ...
    @overload
    def task(
        self, /, *, bind: Literal[False] = False, **options: Any
    ) -> Callable[[Callable[P, R]], _Task[P, R]]: ...
    def task(self, fun: Any = None, /, **options: Any) -> Any:
        """Make a task of a function: ``@app.task`` or ``@app.task(name=..., bind=True,
        ignore_result=..., rate_limit=..., time_limit=..., max_retries=...,
        autoretry_for=..., base=..., typing=...)``. Every option becomes a task
        attribute."""

        def decorate(fun: Callable[..., Any]) -> _Task[Any, Any]:
            opts = dict(options)
            base = opts.pop("base", None)
            bind = bool(opts.pop("bind", False))
            name = opts.get("name") or gen_task_name(
                self, getattr(fun, "__name__", "task"), getattr(fun, "__module__", "__main__")
            )
            existing = self._tasks.get(name)
            if existing is not None:
                return existing
            opts["name"] = name
            return self._register(create_task(self, fun, base, bind, opts))

        if fun is not None:
            if not callable(fun):
                raise TypeError("argument 1 to @task() must be a callable")
            return decorate(fun)
        return decorate

    def register_task(self, task: _Task[Any, Any] | type[_Task[Any, Any]]) -> _Task[Any, Any]:
        """Register a class-based task (an instance or the class)."""
        if isinstance(task, type):
            task = task()
        if task._app is None:
            object.__setattr__(task, "_app", self)
        if not task.name:
            cls = type(task)
            task.name = gen_task_name(self, cls.__name__, cls.__module__)
        task._check_attributes()
        add_autoretry(task)
        return self._register(task)

    def _register(self, task: _Task[Any, Any]) -> _Task[Any, Any]:
        self._annotate(task)
        self._tasks.register(task)
        return task

    # -- annotations ------------------------------------------------------------------

    def load_annotations(self) -> list[Any]:
        source = self.conf["task_annotations"]
        if source is self._annotations_source:
            return self._annotations
        if source is None:
            items: Sequence[Any] = ()
        elif isinstance(source, (list, tuple)):
            items = source
        else:
            items = (source,)
        loaded = [import_object(item) if isinstance(item, str) else item for item in items]
        loaded = [item() if isinstance(item, type) else item for item in loaded]
        self._annotations_source = source
        self._annotations = loaded
        for task in list(self._tasks.values()):
            self._annotate(task)
        return loaded

    def _annotate(self, task: _Task[Any, Any]) -> None:
        annotations = self.load_annotations()
        if not annotations:
            return
        specific = wildcard = None
        for annotation in annotations:
            if isinstance(annotation, Mapping):
                found = annotation.get(task.name)
            else:
                found = annotation.annotate(task)
            if found is not None:
                specific = found
                break
        for annotation in annotations:
            if isinstance(annotation, Mapping) and "*" in annotation:
                wildcard = annotation["*"]
                break
        # Celery's order: the task's own annotation, then the '*' one.
        for found in (specific, wildcard):
            for key, value in dict(found or {}).items():
                if key.startswith("@"):
                    _wrap_method(task, key[1:], value)
                else:
                    setattr(task, key, value)

    # -- sending ----------------------------------------------------------------------

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> _AsyncResult[Any]:
        """Send a task by name (it need not be registered here); takes the same
        options as ``apply_async``. ``task_always_eager`` does not apply."""
        return sending.send_task(self, name, args, kwargs, **options)

    def signature(self, *args: Any, **kwargs: Any) -> Signature[Any]:
        """``celeriac.signature`` bound to this app."""
        kwargs.setdefault("app", self)
        return signature(*args, **kwargs)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> _AsyncResult[Any]:
        """The result of the task with id ``task_id``."""
        return _AsyncResult(task_id, app=self, **kwargs)

    def _get_router(self) -> Router:
        router = self._router
        if router is None or self._router_version != self.conf._version:
            with self._lock:
                router = Router(self.conf)
                self._router = router
                self._router_version = self.conf._version
                self.name_defaults = {}
        return router

    @property
    def router(self) -> Router:
        """The router built from ``task_routes`` and ``task_queues``."""
        return self._get_router()

    @property
    def queues(self) -> dict[str, QueueSpec]:
        """The configured queues by name (the default queue when none are)."""
        return self._get_router().queues

    # -- connections ------------------------------------------------------------------

    @property
    def broker_url(self) -> str:
        """The broker URL in use: ``CELERY_BROKER_URL``, else ``broker_url``, else
        the default broker."""
        return self.conf.broker_url or DEFAULT_BROKER_URL

    @property
    def broker_url_masked(self) -> str:
        return mask_url(self.broker_url)

    @property
    def result_backend_url(self) -> str | None:
        """The result backend URL, or None when results are disabled."""
        url = self.conf.result_backend
        if url is None and not self.conf.broker_url:
            # Nothing configured at all: the embedded default keeps results too, so
            # the first-steps tutorial works with no server.
            return DEFAULT_BROKER_URL
        if url is None or url.strip() in DISABLED_BACKENDS:
            return None
        return url if "://" in url else url + "://"

    @property
    def backend_url_masked(self) -> str:
        url = self.result_backend_url
        return "disabled://" if url is None else mask_url(url)

    def transport_options(self) -> dict[str, Any]:
        """``broker_transport_options`` plus what the transport needs from other
        settings: for AMQP the heartbeat and the queue declarations (``task_queues``,
        priorities, quorum queues), declared with Celery's flags."""
        options = dict(self.conf["broker_transport_options"] or {})
        if transport_of(self.broker_url) == "redis":
            if self.conf.get("broker_use_ssl"):
                options.setdefault("ssl", redis_ssl_option(self.conf["broker_use_ssl"]))
            return options
        if scheme_of(self.broker_url) not in AMQP_SCHEMES:
            return options
        conf = self.conf
        options.setdefault("heartbeat", conf["broker_heartbeat"])
        if conf.get("broker_failover_strategy") is not None:
            options.setdefault("failover_strategy", conf["broker_failover_strategy"])
        if conf.get("broker_use_ssl"):
            options.setdefault("ssl", ssl_option(conf["broker_use_ssl"]))
        options.setdefault(
            "native_delayed_delivery_queue_type", conf["broker_native_delayed_delivery_queue_type"]
        )
        arguments: dict[str, Any] = {}
        if conf.get("task_queue_max_priority") is not None:
            arguments["x-max-priority"] = int(conf["task_queue_max_priority"])
        if conf.get("task_create_missing_queue_type") == "quorum":
            arguments["x-queue-type"] = "quorum"
        if arguments:
            options.setdefault("queue_arguments", arguments)
        queues: dict[str, Any] = {}
        for name, spec in self.queues.items():
            declaration = spec.declaration()
            if name == conf["task_default_queue"] and conf.get("task_default_queue_type") == (
                "quorum"
            ):
                declaration["queue_arguments"] = {
                    **declaration.get("queue_arguments", {}),
                    "x-queue-type": "quorum",
                }
            queues[name] = declaration
        options.setdefault("queues", queues)
        return options

    @property
    def producer(self) -> Any:
        """This process's ``celeriac.Producer``, connected on first use."""
        producer = self._producer
        if producer is None:
            producer = self._connect_producer()
        return producer

    def _connect_producer(self) -> Any:
        with self._lock:
            if self._producer is not None and self._producer_pid == os.getpid():
                return self._producer
            url = self.broker_url
            scheme = scheme_of(url)
            if scheme not in SUPPORTED_BROKERS:
                raise ImproperlyConfigured(
                    f"broker_url {mask_url(url)!r}: the {scheme!r} transport is not "
                    "supported; celeriac speaks amqp://, redis:// and sqlite://"
                )
            try:
                check_serializer("task_serializer", self.conf["task_serializer"])
                check_compression("task_compression", self.conf["task_compression"])
            except ValueError as exc:
                raise ImproperlyConfigured(str(exc)) from None
            self.finalize()
            result_url = self.result_backend_url
            if result_url is not None and scheme_of(result_url) == "rpc":
                # Declare our reply queue before the first task can answer into it.
                _ = self.backend
            producer = Producer(
                url,
                origin=client_origin(),
                reply_to=self.process_oid,
                transport_options=self.transport_options(),
                connect_timeout=float(self.conf["broker_connection_timeout"]),
            )
            self._producer = producer
            self._producer_pid = os.getpid()
            self.declared_queues = set() if scheme in AMQP_SCHEMES else None
            return producer

    @property
    def backend(self) -> Any:
        """This process's ``celeriac.Backend``, or None when results are
        disabled (the default)."""
        backend = self._backend
        if backend is UNBUILT:
            backend = self._connect_backend()
        return backend

    def _connect_backend(self) -> Any:
        with self._lock:
            if self._backend is not UNBUILT and self._backend_pid == os.getpid():
                return self._backend
            self._backend = self._build_backend("celery-task-meta-")
            self._backend_pid = os.getpid()
            return self._backend

    @property
    def taskset_backend(self) -> Any:
        """The store of saved groups (``celery-taskset-meta-<id>`` keys), a second
        ``Backend`` on the result backend's URL. ``NotImplementedError`` on ``rpc://``
        (as in Celery) or without a result backend."""
        store = self.__dict__.get("_taskset_backend")
        if store is None or store[0] != os.getpid():
            url = self.result_backend_url
            if url is None:
                raise NotImplementedError("groups can only be saved with a result backend")
            if scheme_of(url) == "rpc":
                raise NotImplementedError("the rpc:// result backend does not store groups")
            with self._lock:
                store = (os.getpid(), self._build_backend("celery-taskset-meta-"))
                self.__dict__["_taskset_backend"] = store
        return store[1]

    def _build_backend(self, key_name: str) -> Any:
        url = self.result_backend_url
        if url is None:
            return None
        scheme = scheme_of(url)
        if scheme not in SUPPORTED_BACKENDS:
            raise ImproperlyConfigured(
                f"result_backend {mask_url(url)!r}: the {scheme!r} backend is "
                "not supported; celeriac stores results in redis://, rpc:// and sqlite://"
            )
        options = dict(self.conf["result_backend_transport_options"])
        prefix = options.pop("global_keyprefix", None) or ""
        if prefix and not prefix.endswith((":", "_", "-", ".")):
            prefix += "_"
        expires = self.conf["result_expires"]
        if isinstance(expires, datetime.timedelta):
            expires = expires.total_seconds()
        rpc: dict[str, Any] = {}
        if scheme == "rpc":
            # Results come back through the broker, to this process's reply
            # queue: the `reply_to` every message of ours carries.
            rpc = {
                "broker_url": self.broker_url,
                "reply_to": self.process_oid,
                "persistent": bool(self.conf["result_persistent"]),
            }
            options = self.transport_options()
        ssl = None
        if transport_of(url) == "redis":
            ssl = redis_ssl_option(self.conf["redis_backend_use_ssl"])
        return Backend(
            url,
            ssl=ssl,
            expires=float(expires) if expires else None,
            key_prefix=prefix + key_name,
            transport_options=options,
            connect_timeout=float(self.conf["broker_connection_timeout"]),
            **rpc,
            **self._result_format(scheme),
        )

    def _result_format(self, scheme: str) -> dict[str, Any]:
        """``result_serializer``, ``result_compression`` and the formats results may be
        read in (``result_accept_content``, else ``accept_content``), for the store."""
        conf = self.conf
        try:
            serializer = check_serializer("result_serializer", conf["result_serializer"])
            compression = check_compression("result_compression", conf["result_compression"])
            if compression and scheme == "rpc":
                logger.warning(
                    "result_compression is ignored by the rpc:// result backend: its "
                    "results are messages, stored uncompressed (as Celery does)"
                )
                compression = None
            accept = conf["result_accept_content"]
            setting = "result_accept_content"
            if accept is None:
                accept, setting = conf["accept_content"], "accept_content"
            accepted = prepare_accept_content(setting, accept)
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        return {"serializer": serializer, "compression": compression, "accept_content": accepted}

    def _drop_connections_after_fork(self) -> None:
        for connection in (self._producer, self._backend):
            if connection is not None and connection is not UNBUILT:
                _inherited.append(connection)
        self._producer = None
        self._backend = UNBUILT
        self._local = threading.local()

    def _flush_at_exit(self) -> None:
        pid = os.getpid()
        events = self.client_events
        if events is not None and events.pid == pid:
            events.close()
        if self._producer is not None and self._producer_pid == pid:
            try:
                self._producer.flush(10.0)
            except Exception as exc:
                logger.warning("celeriac: messages may not have been sent at exit: %s", exc)
        backend = self._backend
        if backend is not None and backend is not UNBUILT and self._backend_pid == pid:
            try:
                backend.flush(10.0)
            except Exception as exc:
                logger.warning("celeriac: results may not have been stored at exit: %s", exc)

    def close(self) -> None:
        """Flush and close this process's connections (they reconnect on next use)."""
        with self._lock:
            events, self.client_events = self.client_events, None
            if events is not None and events.pid == os.getpid():
                events.close()
            producer, backend = self._producer, self._backend
            self._producer = None
            self._backend = UNBUILT
            tasksets = self.__dict__.pop("_taskset_backend", None)
            if tasksets is not None and tasksets[0] == os.getpid():
                tasksets[1].close()
            if producer is not None and self._producer_pid == os.getpid():
                try:
                    producer.flush(10.0)
                finally:
                    producer.close()
            if backend not in (None, UNBUILT) and self._backend_pid == os.getpid():
                try:
                    backend.flush(10.0)
                finally:
                    backend.close()

    # -- identity and time ------------------------------------------------------------

    @property
    def process_oid(self) -> str:
        """The reply id of this process: every message it sends carries it as
        ``reply_to``, and an ``rpc://`` backend reads its results from the queue of that
        name. (Celery keeps one per thread; the producer here is one per process.)"""
        pid = os.getpid()
        if self._process_oid is None or self._process_oid[0] != pid:
            seed = f"{uuid.getnode():x}-{pid:x}-{id(self):x}"
            self._process_oid = (pid, str(uuid.uuid3(uuid.NAMESPACE_OID, seed)))
        return self._process_oid[1]

    @property
    def thread_oid(self) -> str:
        """This thread's id for replies (Celery's ``thread_oid``): a uuid3 of the host,
        the process, the thread and the app."""
        oid: str | None = getattr(self._local, "oid", None)
        if oid is None:
            seed = f"{uuid.getnode():x}-{os.getpid():x}-{threading.get_ident():x}-{id(self):x}"
            oid = str(uuid.uuid3(uuid.NAMESPACE_OID, seed))
            self._local.oid = oid
        return oid

    @property
    def timezone(self) -> datetime.tzinfo:
        """``timezone`` as a tzinfo (UTC when unset and ``enable_utc``)."""
        version = self.conf._version
        if self._timezone_version != version:
            name = self.conf["timezone"]
            if isinstance(name, datetime.tzinfo):
                tz = name
            elif name:
                tz = _UTC if name.upper() == "UTC" else zoneinfo.ZoneInfo(name)
            elif self.conf["enable_utc"]:
                tz = _UTC
            else:
                tz = datetime.datetime.now().astimezone().tzinfo or _UTC
            self._timezone = tz
            self._timezone_version = version
        return self._timezone

    def now(self) -> datetime.datetime:
        """The current time, aware, in the app's time zone."""
        return datetime.datetime.now(self.timezone)

    @property
    def control(self) -> Any:
        """Remote control of the workers (``app.control.revoke(task_id)``, ...)."""
        from celeriac.control import Control

        return Control(self)

    @property
    def current_task(self) -> _Task[Any, Any] | None:
        from celeriac.local import get_current_task

        return get_current_task()

    @property
    def current_worker_task(self) -> _Task[Any, Any] | None:
        return get_current_worker_task()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_app_by_main, (self.main,))


def _app_by_main(main: str | None) -> Celeriac:
    app = get_current_app()
    if app.main != main:
        for candidate in list(_apps):
            if candidate.main == main:
                return candidate
    return app


def _wrap_method(task: _Task[Any, Any], attr: str, around: Callable[..., Any]) -> None:
    original = getattr(task, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return around(task, *args, **kwargs)

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    object.__setattr__(task, attr, wrapper)


#: Celery's name for the app class.
Celery = Celeriac

set_default_app_maker(lambda: Celeriac("default", set_as_current=False))
