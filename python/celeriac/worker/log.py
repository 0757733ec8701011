"""Worker logging: Celery's line format, on stderr or in the ``-f`` file."""

from __future__ import annotations

import logging
import logging.handlers
import sys

from celeriac.worker.options import node_format, per_process

#: Celery's ``worker_log_format`` default.
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

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


def setup_logging(
    level: int, logfile: str | None = None, nodename: str = "", index: int | None = None
) -> str | None:
    """Send every record at ``level`` and above to stderr, or with ``logfile`` (a
    ``-f`` template, see ``node_format``) to that file, in Celery's format. Returns the
    file's path. ``OSError`` when the file cannot be opened (the handlers are kept).

    Like Celery (``worker_hijack_root_logger``) this replaces the root logger's handlers,
    so task code that logs through ``logging`` shows up in the same stream. The file is
    reopened when it is moved or removed (``logrotate``), as Celery's handler does.
    """
    path = None
    handler: logging.Handler
    if logfile:
        path = node_format(logfile, nodename, index)
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if logfile and isinstance(old, logging.FileHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return path


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
