"""Celery's "First steps with Django", on celeriac: ``examples/django`` against Redis.

Each test copies the example project into a temporary folder, migrates its SQLite
database there, and starts ``celeriac -A proj worker`` in it as a user would (the
project's ``proj/celery.py`` sets ``DJANGO_SETTINGS_MODULE``). The client side is the
project's own ``manage.py shell``: it sends tasks and reads the rows back through the ORM.
A second app, ``probe``, is added to the copy's ``INSTALLED_APPS`` for what only the
tests need (a task that does not touch the database, a connection probe).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import READY_TIMEOUT, REDIS_URL, WorkerProcess, celeriac_argv

if TYPE_CHECKING:
    from conftest import ResultKeys

pytestmark = pytest.mark.redis

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django"
RESULT_PREFIX = "RESULT:"
WAIT = 15

PROBE_TASKS = '''
import os

from celeriac import shared_task
from django.db import connection


@shared_task
def ping():
    """Touches no database: runs even while a client holds SQLite's write lock."""
    return "pong"


@shared_task
def connection_probe():
    """Whether this task's connection is one an earlier task used (its TEMP table,
    private to one SQLite connection, is there), and that it answers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM sqlite_temp_master WHERE name = 'probe_mark'")
        reused = cursor.fetchone()[0] == 1
        cursor.execute("CREATE TEMP TABLE IF NOT EXISTS probe_mark (x)")
        cursor.execute("SELECT count(*) FROM shop_order")
        orders = cursor.fetchone()[0]
    return {"reused": reused, "orders": orders, "pid": os.getpid()}
'''


class Project:
    """A migrated copy of the example project, its environment and its workers."""

    def __init__(self, path: Path, queue: str) -> None:
        self.path = path
        self.queue = queue
        env = dict(os.environ)
        for name in ("DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            env.pop(name, None)
        env.update(
            SHOP_DATABASE=str(path / "db.sqlite3"),
            SHOP_BROKER_URL=REDIS_URL,
            SHOP_RESULT_BACKEND=REDIS_URL,
            SHOP_QUEUE=queue,
            PYTHONUNBUFFERED="1",
        )
        self.env = env
        self.workers: list[WorkerProcess] = []

    def add_app(self, name: str, tasks: str) -> None:
        """A Django app ``name`` with ``tasks`` as its tasks.py, in INSTALLED_APPS."""
        package = self.path / name
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "tasks.py").write_text(textwrap.dedent(tasks))
        with (self.path / "proj" / "settings.py").open("a") as settings:
            settings.write(f"\nINSTALLED_APPS.append({name!r})\n")

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.path,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"manage.py {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def shell(self, code: str) -> Any:
        """Run ``code`` in ``manage.py shell``; the value it printed after RESULT:."""
        out = self.manage("shell", "-c", textwrap.dedent(code))
        for line in out.splitlines():
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        raise AssertionError(f"the shell printed no result:\n{out}")

    def worker(
        self, *extra: str, ready: bool = True, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        argv = celeriac_argv("-A", "proj", "worker", "-l", "INFO", "-c", "1", *extra)
        process = WorkerProcess(argv, self.path, env or self.env)
        self.workers.append(process)
        if ready:
            process.wait_for(r"ready\.", timeout=READY_TIMEOUT)
        return process


@pytest.fixture
def project(tmp_path: Path, queue_name: str, result_keys: ResultKeys) -> Iterator[Project]:
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE, site, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    made = Project(site, queue_name)
    made.add_app("probe", PROBE_TASKS)
    made.manage("migrate", "--verbosity", "0")
    yield made
    for process in made.workers:
        for task_id in process.task_ids():
            result_keys.add(task_id)
        if process.proc.poll() is None:
            assert process.stop() == 0, process.log


POOLS = [pytest.param((), id="prefork"), pytest.param(("-P", "threads"), id="threads")]


@pytest.mark.parametrize("pool", POOLS)
def test_shared_tasks_of_installed_apps_write_through_the_orm(
    project: Project, pool: tuple[str, ...]
) -> None:
    """autodiscover_tasks() found shop/tasks.py: its @shared_task tasks run in the
    worker and write rows the client reads back through the ORM."""
    worker = project.worker(*pool)
    rows = project.shell(
        f"""
        import json
        from shop.models import Order
        from shop.tasks import count_orders, create_order, ship_order

        order_id = create_order.delay("tea", 3).get(timeout={WAIT})
        shipped = ship_order.delay(order_id).get(timeout={WAIT})
        again = ship_order.delay(order_id).get(timeout={WAIT})
        order = Order.objects.get(pk=order_id)
        print("{RESULT_PREFIX}" + json.dumps({{
            "shipped": shipped, "again": again, "status": order.status,
            "product": order.product, "quantity": order.quantity,
            "shipped_by": order.shipped_by,
            "count": count_orders.delay("shipped").get(timeout={WAIT}),
        }}))
        """
    )
    assert rows["shipped"] is True
    assert rows["again"] is False  # the second one found it shipped already
    assert (rows["status"], rows["product"], rows["quantity"]) == ("shipped", "tea", 3)
    assert rows["count"] == 1
    if pool:  # threads run in the worker's own process
        assert rows["shipped_by"] == worker.proc.pid
    else:  # a prefork child
        assert rows["shipped_by"] != worker.proc.pid
    assert "shop.tasks.create_order" in worker.log  # listed in the banner's [tasks]


def test_delay_on_commit_sends_after_commit_and_never_on_rollback(project: Project) -> None:
    """ship_order.delay_on_commit inside transaction.atomic(): nothing is sent while
    the transaction is open (a ping sent meanwhile is received first), it is sent once
    it commits, and a rolled-back one is never sent (the marker ping after it is the
    next thing the worker receives: one queue, one process, first in first out)."""
    worker = project.worker()
    rows = project.shell(
        f"""
        import json
        from django.db import transaction
        from probe.tasks import ping
        from shop.models import Order
        from shop.tasks import ship_order

        with transaction.atomic():
            kept = Order.objects.create(product="tea", quantity=1)
            ship_order.delay_on_commit(kept.pk)
            inside = ping.delay().get(timeout={WAIT})
        try:
            with transaction.atomic():
                doomed = Order.objects.create(product="mistake", quantity=1)
                ship_order.apply_async_on_commit((doomed.pk,), countdown=0)
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        marker = ping.delay().get(timeout={WAIT})
        print("{RESULT_PREFIX}" + json.dumps({{
            "inside": inside, "marker": marker, "kept": kept.pk,
            "doomed_exists": Order.objects.filter(product="mistake").exists(),
        }}))
        """
    )
    assert rows["inside"] == rows["marker"] == "pong"
    assert rows["doomed_exists"] is False
    worker.wait_for(r"Task shop\.tasks\.ship_order\[.*\] succeeded in .*: True", timeout=WAIT)
    received = [
        "ship" if "ship_order" in line else "ping"
        for line in worker.log.splitlines()
        if " received" in line and ("ship_order" in line or "probe.tasks.ping" in line)
    ]
    assert received == ["ping", "ship", "ping"], worker.log
    status = project.shell(
        f"""
        from shop.models import Order
        print("{RESULT_PREFIX}" + '"' + Order.objects.get(pk={rows["kept"]}).status + '"')
        """
    )
    assert status == "shipped"


@pytest.mark.parametrize("pool", POOLS)
def test_each_task_gets_a_fresh_database_connection(
    project: Project, pool: tuple[str, ...]
) -> None:
    """The Django fix-up closes the connections after each task (and before the next):
    a task never sees the connection state (here a TEMP table) an earlier task left,
    and the new connection answers."""
    project.worker(*pool)
    probes = project.shell(
        f"""
        import json
        from probe.tasks import connection_probe

        print("{RESULT_PREFIX}" + json.dumps(
            [connection_probe.delay().get(timeout={WAIT}) for _ in range(3)]
        ))
        """
    )
    assert len({probe["pid"] for probe in probes}) == 1  # one process ran all three
    assert [probe["reused"] for probe in probes] == [False, False, False]
    assert [probe["orders"] for probe in probes] == [0, 0, 0]


@pytest.mark.parametrize("pool", POOLS)
def test_a_task_after_the_database_file_was_replaced_sees_the_new_file(
    project: Project, pool: tuple[str, ...]
) -> None:
    """A connection kept open across tasks goes stale when the database file is replaced
    (it still reads the old, unlinked file); the fix-up's per-task close means the next
    task opens the file that is there now."""
    project.worker(*pool)
    count = f"""
        from shop.tasks import count_orders
        print("{RESULT_PREFIX}" + str(count_orders.delay("new").get(timeout={WAIT})))
        """
    assert project.shell(count) == 0
    database = project.path / "db.sqlite3"
    replacement = project.path / "db-replacement.sqlite3"
    shutil.copyfile(database, replacement)
    with contextlib.closing(sqlite3.connect(replacement)) as db, db:
        db.execute("INSERT INTO shop_order (product, quantity, status) VALUES ('jam', 1, 'new')")
    os.replace(replacement, database)
    assert project.shell(count) == 1


# -- bad input ----------------------------------------------------------------------


def test_missing_settings_module_is_a_clear_error_at_worker_start(project: Project) -> None:
    env = dict(project.env, DJANGO_SETTINGS_MODULE="proj.no_such_settings")
    worker = project.worker(ready=False, env=env)
    status = worker.wait(READY_TIMEOUT)
    assert status != 0
    assert "DJANGO_SETTINGS_MODULE='proj.no_such_settings': no such module" in worker.stderr
    assert "ready." not in worker.log


def test_tasks_module_failing_to_import_is_named_at_worker_start(project: Project) -> None:
    project.add_app("broken", "import a_dependency_that_is_not_installed\n")
    worker = project.worker(ready=False)
    status = worker.wait(READY_TIMEOUT)
    assert status != 0
    assert "importing broken.tasks failed" in worker.stderr
    assert "a_dependency_that_is_not_installed" in worker.stderr
    assert "ready." not in worker.log


PARENT_CONNECTION = """
from django.db import connection

# Opened in the worker's main process while it imports the task modules.
with connection.cursor() as cursor:
    cursor.execute("CREATE TEMP TABLE parent_mark (x)")
"""


def test_prefork_children_do_not_use_the_parents_connection(project: Project) -> None:
    """A connection the worker's main process opened (here while importing tasks) is
    never used by a prefork child: the child's task runs on its own connection, even
    with CELERY_DB_REUSE_MAX keeping connections across tasks."""
    with (project.path / "proj" / "settings.py").open("a") as settings:
        settings.write("\nCELERY_DB_REUSE_MAX = 100\n")
    (project.path / "probe" / "tasks.py").write_text(
        PROBE_TASKS.replace("import os\n", "import os\n" + PARENT_CONNECTION, 1)
        + """

@shared_task
def sees_parent_mark():
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM sqlite_temp_master WHERE name = 'parent_mark'")
        return cursor.fetchone()[0] == 1
"""
    )
    project.worker()
    seen = project.shell(
        f"""
        import json
        from probe.tasks import connection_probe, sees_parent_mark

        print("{RESULT_PREFIX}" + json.dumps({{
            "parent": sees_parent_mark.delay().get(timeout={WAIT}),
            "probes": [connection_probe.delay().get(timeout={WAIT})["reused"] for _ in range(2)],
        }}))
        """
    )
    assert seen["parent"] is False
    # CELERY_DB_REUSE_MAX is honoured: the second task reuses the first one's connection.
    assert seen["probes"] == [False, True]
