"""celeriac's errors, with Celery's names and hierarchy.

The broker/transport errors (``CeleriacError``, ``OperationalError`` and its
``ClosedError``, ``TimeoutError``, ``DecodeError``) are raised by the Rust core and
re-exported here. The rest are the task-level errors a Celery program already
catches: ``except Retry``, ``except MaxRetriesExceededError``,
``except SoftTimeLimitExceeded`` ...

Results written by a Celery worker name these classes by their Celery module
(``celery.exceptions``, ``billiard.exceptions``); :mod:`celeriac.result` maps those
names to the classes below, and writes them the same way.
"""

from __future__ import annotations

import numbers
from typing import Any

from celeriac._core import (
    CeleriacError,
    ClosedError,
    DecodeError,
    OperationalError,
    TimeoutError,
)

__all__ = [
    "AlreadyRegistered",
    "AlwaysEagerIgnored",
    "BackendError",
    "CeleriacError",
    "CeleriacWarning",
    "CeleryError",
    "CeleryWarning",
    "ChordError",
    "ClosedError",
    "DecodeError",
    "Ignore",
    "ImproperlyConfigured",
    "IncompleteStream",
    "InvalidTaskError",
    "MaxRetriesExceededError",
    "NotRegistered",
    "OperationalError",
    "QueueNotFound",
    "Reject",
    "Retry",
    "SecurityError",
    "SoftTimeLimitExceeded",
    "TaskError",
    "TaskPredicate",
    "TaskRevokedError",
    "Terminated",
    "TimeLimitExceeded",
    "TimeoutError",
    "WorkerLostError",
    "WorkerShutdown",
    "WorkerTerminate",
]

#: Celery's name for the base error.
CeleryError = CeleriacError


class CeleriacWarning(UserWarning):
    """Base of celeriac's warnings (Celery's ``CeleryWarning``)."""


CeleryWarning = CeleriacWarning


class AlwaysEagerIgnored(CeleriacWarning):
    """``send_task`` ignores ``task_always_eager``: it has no function to run."""


class ImproperlyConfigured(CeleriacError):
    """A setting has a value celeriac cannot use."""


class SecurityError(CeleriacError):
    """Refused for security reasons."""


class TaskPredicate(CeleriacError):
    """Base of the exceptions a task raises to tell the worker what to do."""


class Retry(TaskPredicate):
    """The task is to be retried: a new message with the same id was sent.

    ``when`` is the countdown in seconds or the ETA; ``exc`` the exception that caused
    the retry; ``sig`` describes the message that was sent.
    """

    message: str | None
    exc: BaseException | None
    excs: str | None
    when: Any
    is_eager: bool
    sig: Any

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | str | None = None,
        when: Any = None,
        is_eager: bool = False,
        sig: Any = None,
    ) -> None:
        self.message = message
        if isinstance(exc, str):
            self.exc, self.excs = None, exc
        else:
            self.exc, self.excs = exc, (repr(exc) if exc is not None else None)
        self.when = when
        self.is_eager = is_eager
        self.sig = sig
        # ``args`` stays JSON-friendly so a stored Retry can be read back.
        when_arg = when if when is None or isinstance(when, (int, float, str)) else str(when)
        super().__init__(message, self.excs, when_arg)

    def humanize(self) -> str:
        if isinstance(self.when, numbers.Number):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.excs:
            return f"Retry {self.humanize()}: {self.excs}"
        return f"Retry {self.humanize()}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.message, self.excs, self.when)


RetryTaskError = Retry


class Ignore(TaskPredicate):
    """The task asks the worker to ack its message and store nothing."""


class Reject(TaskPredicate):
    """The task asks the worker to reject its message (``requeue`` puts it back)."""

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)

    def __repr__(self) -> str:
        return f"reject requeue={self.requeue}: {self.reason}"


class TaskError(CeleriacError):
    """Base of task-related errors."""


class QueueNotFound(KeyError, TaskError):
    """A task was routed to a queue missing from ``task_queues``
    (with ``task_create_missing_queues=False``)."""


class IncompleteStream(TaskError):
    """The end of a data stream was reached too early."""


class NotRegistered(KeyError, TaskError):
    """No task with this name is registered in this process."""

    def __repr__(self) -> str:
        return f"Task of kind {self} never registered, please make sure it's imported."


class AlreadyRegistered(TaskError):
    """A task with this name is already registered."""


class MaxRetriesExceededError(TaskError):
    """``Task.retry`` was called more than ``max_retries`` times."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.task_args: Any = kwargs.pop("task_args", [])
        self.task_kwargs: Any = kwargs.pop("task_kwargs", {})
        super().__init__(*args, **kwargs)


class TaskRevokedError(TaskError):
    """The task was revoked (``"revoked"``, ``"expired"`` or ``"terminated"``)."""


class InvalidTaskError(TaskError):
    """The message is not a task celeriac can run."""


class ChordError(TaskError):
    """A task in a chord raised."""


class BackendError(Exception):
    """The result store failed."""


class WorkerTerminate(SystemExit):
    """Exit the worker now (cold shutdown)."""


class WorkerShutdown(SystemExit):
    """Exit the worker after the running tasks (warm shutdown)."""


# The prefork pool's errors; Celery takes them from ``billiard.exceptions``.


class SoftTimeLimitExceeded(Exception):
    """The soft time limit ran out: raised inside the task so it can clean up."""

    def __str__(self) -> str:
        return f"SoftTimeLimitExceeded{self.args}"


class TimeLimitExceeded(Exception):
    """The hard time limit ran out and the process running the task was killed."""

    def __str__(self) -> str:
        return f"TimeLimitExceeded{self.args}"


class WorkerLostError(Exception):
    """The process running the task exited before the task finished."""


class Terminated(Exception):
    """The process running the task was terminated on request."""
