"""Worker logging: Celery's line format, on stderr."""

from __future__ import annotations

import logging
import sys

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


def setup_logging(level: int) -> None:
    """Send every record at ``level`` and above to stderr in Celery's format.

    Like Celery (``worker_hijack_root_logger``) this replaces the root logger's handlers,
    so task code that logs through ``logging`` shows up in the same stream.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
