"""Fix-ups: what the app and the worker do for a framework (Celery's ``celery.fixups``).

An app installs them when it is created (:func:`install_fixups`); today there is one,
for Django, active when ``DJANGO_SETTINGS_MODULE`` is set (as in Celery). The app asks
them which packages ``autodiscover_tasks()`` searches and lets them prepare before task
modules are imported; the worker calls them at start and around each task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from celeriac.fixups.base import Fixup

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["Fixup", "install_fixups", "run_with_fixups"]

logger = logging.getLogger("celeriac.fixups")
R = TypeVar("R")


def install_fixups(app: Celeriac) -> list[Fixup]:
    """The fix-ups that apply to ``app`` in this process's environment."""
    from celeriac.fixups.django import fixup as django_fixup

    found = django_fixup(app)
    return [found] if found is not None else []


def run_with_fixups(fixups: Sequence[Fixup], execute: Callable[..., R], *args: Any) -> R:
    """``execute(*args)`` (the worker running one task) between the fix-ups'
    ``on_task_start`` and ``on_task_end``. A failing hook is logged: the task still runs
    and its outcome is kept."""
    active = [fixup for fixup in fixups if fixup.per_task]
    for fixup in active:
        _call_hook(fixup.on_task_start)
    try:
        return execute(*args)
    finally:
        for fixup in active:
            _call_hook(fixup.on_task_end)


def _call_hook(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:
        logger.exception("Fix-up hook %s raised", getattr(hook, "__qualname__", hook))
