"""Worker logging: Celery's line format, on stderr or in the ``-f`` file."""

from __future__ import annotations

import io
import logging
import logging.handlers
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celeriac.utils.log import REDIRECT_LOGGER, TASK_LOGGER
from celeriac.worker.options import node_format, per_process

#: Celery's ``worker_log_format`` default.
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

#: Celery's ``worker_task_log_format`` default.
TASK_LOG_FORMAT = (
    "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"
)

#: Accepted ``--loglevel`` names (case-insensitive), as Celery accepts them.
LEVELS: dict[str, int] = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
}

logger = logging.getLogger("celeriac.worker")


def parse_loglevel(value: str) -> int:
    """The ``logging`` level for a ``--loglevel`` value; ``ValueError`` if unknown."""
    level = LEVELS.get(value.strip().upper())
    if level is None:
        choices = ", ".join(name.lower() for name in LEVELS if name not in ("WARN", "FATAL"))
        raise ValueError(f"unknown log level {value!r} (choose from {choices})")
    return level


@dataclass(frozen=True)
class LogSettings:
    """The app's logging settings (Celery's names), read once at worker start."""

    hijack_root_logger: bool = True
    log_format: str = LOG_FORMAT
    task_log_format: str = TASK_LOG_FORMAT
    redirect_stdouts: bool = False
    redirect_stdouts_level: int = logging.WARNING

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> LogSettings:
        """``ValueError`` naming the setting when one is unusable."""
        level = conf.get("worker_redirect_stdouts_level", "WARNING")
        try:
            redirect_level = level if isinstance(level, int) else parse_loglevel(str(level))
        except ValueError as exc:
            raise ValueError(f"setting worker_redirect_stdouts_level: {exc}") from None
        formats = {}
        for name, default in (
            ("worker_log_format", LOG_FORMAT),
            ("worker_task_log_format", TASK_LOG_FORMAT),
        ):
            text = conf.get(name) or default
            try:
                logging.Formatter(str(text), validate=True)
            except ValueError as exc:
                raise ValueError(f"setting {name}: {exc}") from None
            formats[name] = str(text)
        return cls(
            hijack_root_logger=bool(conf.get("worker_hijack_root_logger", True)),
            log_format=formats["worker_log_format"],
            task_log_format=formats["worker_task_log_format"],
            redirect_stdouts=bool(conf.get("worker_redirect_stdouts", True)),
            redirect_stdouts_level=redirect_level,
        )


#: What the worker was set up with, reused by prefork children opening their own file.
_settings = LogSettings()


class TaskFormatter(logging.Formatter):
    """Celery's task formatter: ``%(task_name)s``/``%(task_id)s`` from the task running in
    this thread (or coroutine), ``???`` outside a task, as Celery writes."""

    def format(self, record: logging.LogRecord) -> str:
        from celeriac.local import get_current_worker_task

        task = get_current_worker_task()
        if task is not None and task.request.id is not None:
            record.task_name, record.task_id = task.name, task.request.id
        else:
            record.__dict__.setdefault("task_name", "???")
            record.__dict__.setdefault("task_id", "???")
        return super().format(record)


class LoggingProxy(io.TextIOBase):
    """A ``sys.stdout``/``sys.stderr`` stand-in writing each complete line to ``logger``
    at ``level`` (``worker_redirect_stdouts``)."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        super().__init__()
        self.logger = logger
        self.level = level
        self._partial = ""
        self._writing = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._writing, "busy", False):
            return len(text)  # a handler printing while we log: drop it, never recurse
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        self._writing.busy = True
        try:
            for line in lines:
                if line.strip():
                    self.logger.log(self.level, line.rstrip())
        finally:
            self._writing.busy = False
        return len(text)

    def flush(self) -> None:
        if self._partial.strip():
            partial, self._partial = self._partial, ""
            self.write(partial + "\n")

    def isatty(self) -> bool:
        return False


def setup_logging(
    level: int,
    logfile: str | None = None,
    nodename: str = "",
    index: int | None = None,
    settings: LogSettings | None = None,
) -> str | None:
    """Send every record at ``level`` and above to stderr, or with ``logfile`` (a
    ``-f`` template, see ``node_format``) to that file, in Celery's format. Returns the
    file's path. ``OSError`` when the file cannot be opened (the handlers are kept).

    As Celery: with ``worker_hijack_root_logger`` (the default) the root logger's
    handlers are replaced, so task code that logs through ``logging`` shows up in the
    same stream; without it, handlers the app installed are kept. Task loggers
    (``get_task_logger``) get their own handler in ``worker_task_log_format``. The file
    is reopened when it is moved or removed (``logrotate``), as Celery's handler does.
    """
    global _settings
    if settings is not None:
        _settings = settings
    else:
        settings = _settings
    path = None
    if logfile:
        path = node_format(logfile, nodename, index)

    def handler(fmt: logging.Formatter) -> logging.Handler:
        made: logging.Handler
        if path is not None:
            made = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        else:
            made = logging.StreamHandler(sys.stderr)
        made.setFormatter(fmt)
        return made

    root_handler = handler(logging.Formatter(settings.log_format))
    task_handler = handler(TaskFormatter(settings.task_log_format))
    root = logging.getLogger()
    task_logger = logging.getLogger(TASK_LOGGER)
    if settings.hijack_root_logger:
        _replace_handlers(root, root_handler, bool(logfile))
    elif not root.handlers:
        root.addHandler(root_handler)
    else:
        root_handler.close()
    _replace_handlers(task_logger, task_handler, bool(logfile))
    task_logger.propagate = False
    task_logger.setLevel(level)
    root.setLevel(level)
    logging.captureWarnings(True)
    return path


def _replace_handlers(target: logging.Logger, new: logging.Handler, close: bool) -> None:
    for old in list(target.handlers):
        target.removeHandler(old)
        if close and isinstance(old, logging.FileHandler):
            old.close()
    target.addHandler(new)


def redirect_stdouts(settings: LogSettings | None = None) -> None:
    """``worker_redirect_stdouts``: ``print()`` and ``sys.stderr`` writes become log
    records of ``celery.redirected`` at ``worker_redirect_stdouts_level``."""
    settings = settings or _settings
    if not settings.redirect_stdouts:
        return
    target = logging.getLogger(REDIRECT_LOGGER)
    sys.stdout = LoggingProxy(target, settings.redirect_stdouts_level)
    sys.stderr = LoggingProxy(target, settings.redirect_stdouts_level)


def setup_child_logging(level: int, logfile: str | None, nodename: str, index: int) -> None:
    """In a prefork child (``index`` from 1): its own file when the ``-f`` template has
    ``%i``/``%I``; otherwise it keeps the file or stream it inherited."""
    if not logfile or not per_process(logfile):
        return
    try:
        setup_logging(level, logfile, nodename, index)
    except OSError as exc:
        logger.error(
            "Cannot open the log file of process %d: %s; logging to the main log.", index, exc
        )
