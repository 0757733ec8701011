"""``get_task_logger`` and ``get_logger``, as Celery's ``celery.utils.log`` has them."""

from __future__ import annotations

import logging

__all__ = ["get_logger", "get_task_logger"]

#: Celery's logger names, kept so logging configurations written for Celery apply.
TASK_LOGGER = "celery.task"
REDIRECT_LOGGER = "celery.redirected"


def get_logger(name: str) -> logging.Logger:
    """The standard library's logger ``name``."""
    return logging.getLogger(name)


def get_task_logger(name: str) -> logging.Logger:
    """A logger for task modules: its records go through the worker's task logger
    (``worker_task_log_format``, with the running task's name and id), as Celery's.
    ``ValueError`` for the task logger's own name, which Celery refuses too."""
    if name in (TASK_LOGGER, "celery", "celeriac"):
        raise ValueError(f"logger name {name!r} is reserved for the worker's own loggers")
    logger = logging.getLogger(name)
    logger.parent = logging.getLogger(TASK_LOGGER)
    return logger
