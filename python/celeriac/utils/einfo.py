"""``einfo``: what ``on_failure``/``on_retry`` and ``task_failure`` receivers get."""

from __future__ import annotations

__all__ = ["ExceptionInfo"]


class ExceptionInfo:
    """What ``on_failure``/``on_retry`` receive as ``einfo`` (Celery's ``ExceptionInfo``)."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exception = exc
        self.type = type(exc)
        self.tb = exc.__traceback__
        self.traceback = tb

    def __str__(self) -> str:
        return self.traceback
