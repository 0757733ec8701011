"""``celeriac flower``: the real Flower (the ``flower`` package) for a celeriac app.

Flower is a Celery program: it gets a Celery app as ``celery -A proj flower`` would give
it one. That app is built here from the celeriac app's settings (same names as Celery's:
broker, result backend, transport options, default queue...), and each of the celeriac
app's tasks is declared on it by name, so Flower's ``async-apply`` and ``apply`` can
send them (the bodies stay in the celeriac workers; Flower never runs a task).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from celeriac.cli.common import EX_FAILURE, PROG, add_global_options, prepare_app

if TYPE_CHECKING:
    from celeriac.app import Celeriac

#: Settings that may hold celeriac objects Celery cannot read, and that Flower has no use
#: for (``task_routes`` has Celery's forms, and Flower's sends follow it).
NOT_FOR_CELERY = frozenset({"beat_schedule", "task_annotations", "task_queues"})
#: A task's own routing, which Flower's sends of it follow too.
ROUTING_OPTIONS = ("queue", "exchange", "routing_key")
INSTALL_HINT = "Flower is not installed: pip install flower"


def add_parser(commands: Any) -> None:
    flower = commands.add_parser(
        "flower",
        add_help=False,  # --help is Flower's: every option after the command is Flower's
        help="run Flower, the web monitor, for the app's broker and result backend",
        description="Run Flower (pip install flower) with the app's settings; the options "
        "after 'flower' are Flower's own (e.g. --port=5555, --address=127.0.0.1).",
    )
    add_global_options(flower, suppress=True)
    _HELP.append(flower)


#: The ``flower`` parser, for ``celeriac help flower`` (``flower --help`` is Flower's).
_HELP: list[argparse.ArgumentParser] = []


def print_help() -> int:
    for parser in _HELP:
        parser.print_help()
    return 0


def celery_app(app: Celeriac) -> Any:
    """A Celery app with ``app``'s settings and its tasks' names."""
    from celery import Celery  # type: ignore[import-untyped]  # flower brings it

    from celeriac.conf import DEFAULTS

    capp = Celery(app.main or "celeriac", set_as_current=True)
    changed = {
        name: app.conf[name]
        for name in app.conf
        if name not in NOT_FOR_CELERY and app.conf[name] != DEFAULTS.get(name)
    }
    changed["broker_url"] = app.broker_url
    changed["result_backend"] = app.result_backend_url
    capp.conf.update(changed)
    for name, task in app.tasks.items():
        if not name.startswith("celery."):
            routing = {o: getattr(task, o) for o in ROUTING_OPTIONS if getattr(task, o, None)}
            capp.task(name=name, shared=False, **routing)(_runs_in_celeriac_workers)
    return capp


def _runs_in_celeriac_workers(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("this task runs in celeriac workers; Flower only sends it")


def cmd_flower(ns: argparse.Namespace, flower_args: list[str]) -> int:
    try:
        import flower.command  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        print(f"{INSTALL_HINT} ({exc})", file=sys.stderr)
        return EX_FAILURE
    app = prepare_app(ns)
    capp = celery_app(app)
    # Celery's own CLI runs Flower's command with this app, as ``celery -A proj flower``.
    try:
        status = capp.start(["flower", *flower_args])
    except Exception as exc:  # Flower's own: a bad option value, a missing --conf file...
        print(f"{PROG} flower: error: Flower stopped: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return EX_FAILURE
    return int(status or 0)
