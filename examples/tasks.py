"""The tutorial's app: Celery's "first steps" example with the import changed.

No broker is given, so celeriac uses its embedded default: a SQLite file
(``celeriac.sqlite3`` in the current directory) for the messages and the results, and
no server is needed. To use a server, name it as in Celery,
``Celery("tasks", broker="redis://localhost:6379/0", backend="redis://localhost:6379/0")``,
or set the ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` environment variables.

Run a worker for it from this folder:  celeriac -A tasks worker -l info
"""

from celeriac import Celery

app = Celery("tasks")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def div(x: float, y: float) -> float:
    return x / y
