"""What every ``celeriac`` command shares: exit statuses, the two error kinds, the global
options (``-A``/``-b``/...), the argument types several commands use, and loading the app.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard

if TYPE_CHECKING:
    from celeriac.app import Celeriac

PROG = "celeriac"
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
#: No worker answered a remote-control command (Celery's exit status, sysexits' 69).
EX_UNAVAILABLE = 69
#: Celery couldn't create the pidfile (sysexits' EX_CANTCREAT), as ``celery worker`` exits.
EX_CANTCREAT = 73

LOGLEVELS = ("debug", "info", "warning", "error", "critical")


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


class AppError(Exception):
    """The app module failed while importing: reported with its traceback, status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``celeriac worker: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- argument types ------------------------------------------------------------------


def loglevel(value: str) -> str:
    name = value.strip().lower()
    if name == "warn":
        name = "warning"
    if name == "fatal":
        name = "critical"
    if name not in LOGLEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {value!r} (choose from {', '.join(LOGLEVELS)})"
        )
    return name


def seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if number != number or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {value}")
    return number


def plural(count: int, word: str) -> str:
    return word if count == 1 else f"{word}s"


# -- global options ------------------------------------------------------------------


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """``-A``/``-b``/... belong before the command, as in Celery; they are also
    accepted after it (hidden there) so ``celeriac worker -A tasks`` works too."""
    default = argparse.SUPPRESS if suppress else None

    def hide(text: str) -> str:
        return argparse.SUPPRESS if suppress else text

    parser.add_argument(
        "-A",
        "--app",
        default=default,
        metavar="APP",
        help=hide("the app: module (tasks), module:attribute (tasks:app) or module.attribute"),
    )
    parser.add_argument(
        "-b",
        "--broker",
        default=default,
        metavar="URL",
        help=hide("broker URL (overrides broker_url)"),
    )
    parser.add_argument(
        "--result-backend",
        default=default,
        metavar="URL",
        help=hide("result backend URL (overrides result_backend)"),
    )
    parser.add_argument(
        "--workdir",
        default=default,
        metavar="DIR",
        help=hide("change to this directory before loading the app"),
    )


def version() -> str:
    try:
        from celeriac import _core

        return str(_core.__version__)
    except ImportError:
        return "(extension not built)"


# -- loading the app -----------------------------------------------------------------


def import_module(name: str) -> ModuleType:
    """Import ``name``; None-like failures become ``UsageError``/``AppError``."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == name or name.startswith(missing + "."):
            raise
        raise AppError(f"importing {name!r} failed: {exc}") from exc
    except Exception as exc:
        raise AppError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def _is_app(obj: Any) -> TypeGuard[Celeriac]:
    from celeriac.app import Celeriac

    return isinstance(obj, Celeriac)


def _from_module(module: ModuleType, spec: str) -> Celeriac:
    for attr in ("app", "celery"):
        found = getattr(module, attr, None)
        if _is_app(found):
            return found
    apps: dict[str, Celeriac] = {
        name: value for name, value in vars(module).items() if _is_app(value)
    }
    unique = {id(value): name for name, value in apps.items()}
    if len(unique) == 1:
        return next(iter(apps.values()))
    if not unique:
        raise UsageError(
            f"module {module.__name__!r} has no celeriac app: define 'app = Celeriac(...)' "
            f"in it, or name the attribute with -A {spec}:NAME"
        )
    names = ", ".join(sorted(apps))
    raise UsageError(f"module {module.__name__!r} has several apps ({names}); use -A {spec}:NAME")


def _resolve(obj: Any, path: str, spec: str) -> Any:
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"cannot find {path!r} in {spec!r}") from None
    return obj


def load_app(spec: str) -> Celeriac:
    """Find the app like Celery's ``-A``: ``tasks``, ``tasks:app``, ``tasks.app``,
    ``proj`` (package with ``proj.celery``). The current directory is importable."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    spec = spec.strip()
    if not spec:
        raise UsageError("the app name is empty (use -A MODULE, e.g. -A tasks)")
    module_name, colon, attr = spec.partition(":")
    if colon:
        try:
            module = import_module(module_name)
        except ModuleNotFoundError:
            raise UsageError(_not_found(module_name, cwd)) from None
        found = _resolve(module, attr, spec) if attr else _from_module(module, module_name)
    else:
        try:
            module = import_module(spec)
        except ModuleNotFoundError:
            head, dot, tail = spec.rpartition(".")
            if not dot:
                raise UsageError(_not_found(spec, cwd)) from None
            try:
                parent = import_module(head)
            except ModuleNotFoundError:
                raise UsageError(_not_found(spec, cwd)) from None
            found = _resolve(parent, tail, spec)
        else:
            try:
                found = _from_module(module, spec)
            except UsageError:
                if not hasattr(module, "__path__"):
                    raise
                try:
                    sub = import_module(f"{spec}.celery")
                except ModuleNotFoundError:
                    raise UsageError(
                        f"package {spec!r} has no celeriac app (nor a {spec}.celery module)"
                    ) from None
                found = _from_module(sub, f"{spec}.celery")
    if not _is_app(found):
        raise UsageError(f"{spec!r} is not a celeriac app (it is {type(found).__name__})")
    return found


def _not_found(name: str, cwd: str) -> str:
    return f"cannot load the app: module {name!r} not found (looked in {cwd} and sys.path)"


def prepare_app(ns: argparse.Namespace, include: Sequence[str] = ()) -> Celeriac:
    """Load the app (``-A``, ``-b``, ``--result-backend``) and import its modules, and
    the ``include`` ones (the worker's ``-I``), added to its ``include`` setting."""
    spec = ns.app or os.environ.get("CELERIAC_APP") or os.environ.get("CELERY_APP")
    if not spec:
        raise UsageError("no app given: use -A/--app MODULE (e.g. celeriac -A tasks worker)")
    # As Celery does: through the environment (which wins over the app's settings,
    # and is seen by the app module while it loads), and on the app itself.
    overrides: dict[str, Any] = {}
    if ns.broker:
        os.environ["CELERY_BROKER_URL"] = overrides["broker_url"] = ns.broker
    if ns.result_backend:
        os.environ["CELERY_RESULT_BACKEND"] = overrides["result_backend"] = ns.result_backend
    app = load_app(spec)
    if overrides:
        app.conf.update(overrides)
    try:
        app.import_modules()
    except Exception as exc:
        raise AppError(f"importing the app's modules failed: {type(exc).__name__}: {exc}") from exc
    for name in include:
        try:
            import_module(name)
        except ModuleNotFoundError:
            raise UsageError(
                f"argument -I/--include: module {name!r} not found "
                f"(looked in {os.getcwd()} and sys.path)"
            ) from None
        except AppError as exc:
            raise AppError(f"argument -I/--include: {exc}") from exc.__cause__
    if include:  # as Celery: part of the app's modules from now on (inspect conf)
        known = tuple(app.conf["include"])
        app.conf.include = known + tuple(name for name in include if name not in known)
    app.finalize()
    return app
