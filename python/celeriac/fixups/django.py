"""The Django fix-up (Celery's ``celery.fixups.django``), on when ``DJANGO_SETTINGS_MODULE``
is set.

- The app's tasks get :class:`~celeriac.contrib.django.task.DjangoTask` as their base
  (``delay_on_commit``) unless the app was given its own ``task_cls``.
- ``autodiscover_tasks()`` without packages searches every app in ``INSTALLED_APPS``.
- The worker calls ``django.setup()`` before it imports task modules.
- Database connections are closed before and after each task (or every
  ``CELERY_DB_REUSE_MAX`` tasks), so a task never runs on a connection a previous task
  left broken or idle past the server's timeout; in the worker's main process before
  the pool starts, and in a forked child the inherited ones are dropped so each child
  opens its own.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any

from celeriac.exceptions import ImproperlyConfigured
from celeriac.fixups.base import Fixup

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["DjangoFixup", "fixup"]

logger = logging.getLogger("celeriac.fixups.django")

SETTINGS_VARIABLE = "DJANGO_SETTINGS_MODULE"


def fixup(app: Celeriac, env: str = SETTINGS_VARIABLE) -> DjangoFixup | None:
    """A :class:`DjangoFixup` for ``app`` when ``env`` names a settings module."""
    settings_module = os.environ.get(env)
    if not settings_module:
        return None
    try:
        import django  # noqa: F401
    except ImportError:
        warnings.warn(
            f"{env} is set but Django is not installed: the Django fix-up is off",
            stacklevel=3,
        )
        return None
    return DjangoFixup(app, settings_module, env)


def _check_settings_module(name: str, env: str) -> None:
    """Fail now, saying which variable is wrong, rather than at the first setting read."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImproperlyConfigured(
            f"{env}={name!r}: no such module (looked in {os.getcwd()} and sys.path); "
            f"set {env} to the project's settings module, e.g. 'proj.settings'"
        )


class DjangoFixup(Fixup):
    per_task = True

    def __init__(self, app: Celeriac, settings_module: str, env: str) -> None:
        self.app = app
        # As Celery: the project folder (the worker's) is importable, first.
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        _check_settings_module(settings_module, env)
        if not app._custom_task_cls:
            from celeriac.contrib.django.task import DjangoTask

            app._task_cls = DjangoTask
        self._recycles = 0
        self._fork_hook = False
        self._lock = threading.Lock()

    def autodiscover_packages(self) -> list[str]:
        from django.apps import apps

        return [config.name for config in apps.get_app_configs()]

    def on_import_modules(self) -> None:
        import django

        django.setup()
        if not os.environ.get("CELERY_SKIP_CHECKS"):  # as Celery: Django's system checks
            from django.core.checks import run_checks

            run_checks()

    def on_worker_init(self, worker: Any) -> None:
        # Connections opened while the worker started (imports) are closed before the
        # pool forks, and a forked child drops any it still inherits.
        with self._lock:
            if not self._fork_hook:
                self._fork_hook = True
                os.register_at_fork(after_in_child=self._after_fork_in_child)
        self._close_database()
        self._close_caches()

    def on_task_start(self) -> None:
        self._close_database_maybe()

    def on_task_end(self) -> None:
        self._close_database_maybe()
        self._close_caches()

    # -- connections ------------------------------------------------------------------

    def _reuse_max(self) -> int:
        from django.conf import settings

        value = getattr(settings, "CELERY_DB_REUSE_MAX", None)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def _close_database_maybe(self) -> None:
        reuse_max = self._reuse_max()
        if not reuse_max:
            self._close_database()
            return
        # Called twice per task: close once every reuse_max tasks.
        if self._recycles >= reuse_max * 2:
            self._recycles = 0
            self._close_database()
        self._recycles += 1

    def _after_fork_in_child(self) -> None:
        from django.db import connections

        for conn in connections.all(initialized_only=True):
            raw = getattr(conn, "connection", None)
            if raw is None:
                continue
            # Close the socket without a goodbye to the server: the parent still uses
            # that conversation (closing it politely would end it for the parent too).
            fileno = getattr(raw, "fileno", None)
            if callable(fileno):
                with contextlib.suppress(OSError, TypeError, ValueError):
                    os.close(fileno())
        self._close_database()
        self._recycles = 0

    def _close_database(self) -> None:
        from django.db import DatabaseError, InterfaceError, connections

        for conn in connections.all(initialized_only=True):
            try:
                conn.close()
            except InterfaceError:
                pass
            except DatabaseError as exc:
                text = str(exc)
                if "closed" not in text and "not connected" not in text:
                    logger.warning("Could not close the database connection %r: %s", conn, exc)

    def _close_caches(self) -> None:
        try:
            from django.core.cache import close_caches

            close_caches()
        except Exception as exc:
            logger.warning("Could not close Django's caches: %s", exc)
