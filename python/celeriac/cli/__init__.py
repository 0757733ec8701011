"""The ``celeriac`` command line (also ``python -m celeriac``), shaped like Celery's: one
module per command family.

``common`` (exit statuses, errors, global options, loading the app) < ``worker``,
``remote`` (inspect/control/status), ``tasks`` (purge/call/result), ``events``, ``beat``,
``flower``, ``multi`` < ``main`` (the parser and the dispatch).
"""

from celeriac.cli.common import (
    EX_CANTCREAT,
    EX_FAILURE,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    PROG,
    AppError,
    UsageError,
    load_app,
)
from celeriac.cli.events import EventDumper
from celeriac.cli.main import build_parser, main, run
from celeriac.cli.remote import REMOTE_COMMANDS, RemoteCommand, remote_arguments

__all__ = [
    "EX_CANTCREAT",
    "EX_FAILURE",
    "EX_OK",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "PROG",
    "REMOTE_COMMANDS",
    "AppError",
    "EventDumper",
    "RemoteCommand",
    "UsageError",
    "build_parser",
    "load_app",
    "main",
    "remote_arguments",
    "run",
]
