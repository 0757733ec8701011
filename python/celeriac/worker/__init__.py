"""The celeriac worker: ``celeriac -A proj worker``."""

from celeriac.worker.options import WorkerOptions
from celeriac.worker.worker import Worker, WorkerError

__all__ = ["Worker", "WorkerError", "WorkerOptions"]
