"""A task's options: the checks of its attributes, those that fall back to a setting,
the send defaults cached per task (:class:`DispatchDefaults`), the argument check built
from its function's signature, and ``autoretry_for``."""

from __future__ import annotations

import inspect
import keyword
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from celeriac.conf import parse_rate_limit
from celeriac.exceptions import Ignore, Retry
from celeriac.serialization import check_serializer
from celeriac.task_context import is_async_task

if TYPE_CHECKING:
    from celeriac.routes import Route
    from celeriac.task import Task


class FromConf:
    """A task attribute that falls back to an app setting while not set on the task."""

    def __init__(self, setting: str) -> None:
        self.setting = setting
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:
            return obj.app.conf[self.setting]

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


# -- attribute checks -----------------------------------------------------------------


def _check_time_limit(name: str, value: Any) -> Any:
    if value is not None and (
        not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
    ):
        raise ValueError(f"{name} must be None or a number of seconds >= 0, not {value!r}")
    return value


def _check_rate_limit(name: str, value: Any) -> Any:
    parse_rate_limit(value)
    return value


def _check_max_retries(name: str, value: Any) -> Any:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"max_retries must be None or an int >= 0, not {value!r}")
    return value


def _check_delay(name: str, value: Any) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, not {value!r}")
    return value


def _check_priority(name: str, value: Any) -> Any:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255
    ):
        raise ValueError(f"priority must be None or an int from 0 to 255, not {value!r}")
    return value


def _check_serializer(name: str, value: Any) -> Any:
    """A serializer name celeriac can write (its package installed), else raise."""
    if value is not None:
        check_serializer(name, value)
    return value


def _check_exception_classes(name: str, value: Any) -> Any:
    classes = tuple(value or ())
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{name} must list exception classes, not {cls!r}")
    return classes


ATTRIBUTE_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "time_limit": _check_time_limit,
    "soft_time_limit": _check_time_limit,
    "rate_limit": _check_rate_limit,
    "max_retries": _check_max_retries,
    "default_retry_delay": _check_delay,
    "priority": _check_priority,
    "serializer": _check_serializer,
    "autoretry_for": _check_exception_classes,
    "dont_autoretry_for": _check_exception_classes,
    "throws": _check_exception_classes,
}

# Attributes that the cached dispatch defaults depend on.
DISPATCH_ATTRIBUTES = frozenset(
    {
        "name",
        "queue",
        "exchange",
        "routing_key",
        "priority",
        "time_limit",
        "soft_time_limit",
        "ignore_result",
        "expires",
        "_app",
    }
)


class DispatchDefaults(NamedTuple):
    """Per task and settings version: what ``apply_async`` adds when not told."""

    conf: Any
    version: int
    route: Route | None
    priority: int | None
    time_limit: float | None
    soft_time_limit: float | None
    ignore_result: bool
    expires: Any
    eager: bool
    #: ``broker_transport_options["confirm_publish"]``: wait for the broker's confirm.
    confirm_publish: bool = False
    #: The task's ``serializer`` (else ``task_serializer``) and ``task_compression``.
    serializer: str = "json"
    compression: str | None = None


def build_argcheck(fun: Callable[..., Any]) -> Callable[..., None] | None:
    """A do-nothing function with ``fun``'s parameters: calling it raises the same
    ``TypeError`` calling ``fun`` would for wrong arguments, at C speed."""
    try:
        signature = inspect.signature(fun)
    except (TypeError, ValueError):
        return None
    kinds = inspect.Parameter
    parts: list[str] = []
    defaults: dict[str, Any] = {}
    positional_only = any(p.kind is kinds.POSITIONAL_ONLY for p in signature.parameters.values())
    slash_done = not positional_only
    star_done = False
    for index, param in enumerate(signature.parameters.values()):
        if not slash_done and param.kind is not kinds.POSITIONAL_ONLY:
            parts.append("/")
            slash_done = True
        if param.kind is kinds.VAR_POSITIONAL:
            parts.append("*" + param.name)
            star_done = True
            continue
        if param.kind is kinds.VAR_KEYWORD:
            parts.append("**" + param.name)
            continue
        if param.kind is kinds.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if param.default is param.empty:
            parts.append(param.name)
        else:
            placeholder = f"__default_{index}"
            defaults[placeholder] = param.default
            parts.append(f"{param.name}={placeholder}")
    if not slash_done:
        parts.append("/")
    name = getattr(fun, "__name__", "")
    if not name.isidentifier() or keyword.iskeyword(name):
        name = "task"
    source = f"def {name}({', '.join(parts)}):\n    pass\n"
    namespace: dict[str, Any] = dict(defaults)
    exec(compile(source, f"<celeriac signature of {name}>", "exec"), namespace)
    return cast("Callable[..., None]", namespace[name])


UNBUILT: Any = object()


def _exponential_backoff(factor: int, retries: int, maximum: int, full_jitter: bool) -> int:
    countdown: int = min(maximum, factor << retries)
    if full_jitter:
        countdown = random.randrange(countdown + 1)
    return max(0, countdown)


def add_autoretry(task: Task[Any, Any]) -> None:
    """Wrap ``task.run`` so ``autoretry_for`` exceptions call ``task.retry``."""
    autoretry_for = tuple(task.autoretry_for)
    if not autoretry_for or "_orig_run" in task.__dict__:
        return
    dont_autoretry_for = tuple(task.dont_autoretry_for)
    retry_kwargs = dict(task.retry_kwargs or {})
    backoff = float(task.retry_backoff)
    backoff_max = int(task.retry_backoff_max)
    jitter = bool(task.retry_jitter)
    orig_run = task.run

    def retry_for(exc: BaseException) -> Retry:
        options = dict(retry_kwargs)
        if backoff:
            options["countdown"] = _exponential_backoff(
                int(max(1.0, backoff)), task.request.retries, backoff_max, jitter
            )
        return task.retry(exc=exc, **options)

    run: Callable[..., Any]
    if is_async_task(task):

        async def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return await orig_run(*args, **kwargs)
            except (Ignore, Retry):
                raise
            except dont_autoretry_for:
                raise
            except autoretry_for as exc:
                raise retry_for(exc) from exc

    else:

        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return orig_run(*args, **kwargs)
            except (Ignore, Retry):
                raise
            except dont_autoretry_for:
                raise
            except autoretry_for as exc:
                raise retry_for(exc) from exc

    run.__wrapped__ = orig_run  # type: ignore[union-attr]
    object.__setattr__(task, "_orig_run", orig_run)
    object.__setattr__(task, "run", run)
    object.__setattr__(task, "_argcheck", UNBUILT)
