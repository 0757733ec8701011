"""The task class of a Django project's app (Celery's ``celery.contrib.django.task``)."""

from __future__ import annotations

import functools
from typing import Any

from celeriac.task import Task

__all__ = ["DjangoTask"]


class DjangoTask(Task[Any, Any]):
    """A task that can be sent when the current database transaction commits."""

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """``delay(*args, **kwargs)`` in ``transaction.on_commit``: sent after the
        transaction commits, never when it rolls back."""
        from django.db import transaction

        transaction.on_commit(functools.partial(self.delay, *args, **kwargs))

    def apply_async_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """``apply_async(*args, **kwargs)`` in ``transaction.on_commit``."""
        from django.db import transaction

        transaction.on_commit(functools.partial(self.apply_async, *args, **kwargs))
