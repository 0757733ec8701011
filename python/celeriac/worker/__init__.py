"""The celeriac worker: ``celeriac -A proj worker``."""

from celeriac.worker.options import WorkerOptions
from celeriac.worker.settings import WorkerError, WorkerSettings
from celeriac.worker.worker import Worker

__all__ = ["Worker", "WorkerError", "WorkerOptions", "WorkerSettings"]
