"""Serializers other than JSON, as kombu writes them: pickle, msgpack and yaml.

JSON is encoded and decoded by the Rust core (the hot path). A message or result in
another format is encoded here, by its package, and the bytes handed to the core; the
core calls back here to decode one. Compression is the core's (``celeriac._core``).

``msgpack`` and ``yaml`` are optional: ``pip install 'celeriac[msgpack]'`` /
``'celeriac[yaml]'``. Using one that is not installed raises
:class:`SerializerNotInstalled` where the setting is used.

The formats match kombu's registry: pickle protocol 4 (or ``PICKLE_PROTOCOL``),
``msgpack.packb(use_bin_type=True)`` / ``unpackb(raw=False)``, ``yaml.safe_dump`` /
``yaml.safe_load`` (through libyaml when PyYAML has it).
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from celeriac._core import (
    ContentDisallowed,
    compression_content_type,
    serializer_content_type,
)
from celeriac._core import dumps as _core_dumps
from celeriac._core import loads as _core_loads
from celeriac.exceptions import ImproperlyConfigured

__all__ = [
    "CONTENT_TYPES",
    "ContentDisallowed",
    "SerializerNotInstalled",
    "check_compression",
    "check_serializer",
    "dumps",
    "dumps_body",
    "loads",
    "prepare_accept_content",
    "worker_accept_content",
]

ContentDisallowed = ContentDisallowed

#: Serializer name -> (content type, content encoding), as kombu registers them.
CONTENT_TYPES: dict[str, tuple[str, str]] = {
    name: serializer_content_type(name) for name in ("json", "pickle", "msgpack", "yaml")
}

#: The package each optional serializer needs, and the extra that installs it.
_OPTIONAL = {"msgpack": ("msgpack", "msgpack"), "yaml": ("yaml", "yaml")}

PICKLE_PROTOCOL = int(os.environ.get("PICKLE_PROTOCOL", 4))


class SerializerNotInstalled(ImproperlyConfigured):
    """A serializer whose package is not installed (kombu's ``SerializerNotInstalled``)."""


def _missing(name: str) -> SerializerNotInstalled:
    module, extra = _OPTIONAL[name]
    return SerializerNotInstalled(
        f"the {name!r} serializer needs the {module!r} package: pip install 'celeriac[{extra}]'"
    )


_Codec = tuple[Callable[[Any], bytes], Callable[[bytes], Any]]

#: The codecs made so far (a missing package is looked for again on each use).
_CODECS: dict[str, _Codec] = {}


def _codec(name: str) -> _Codec:
    """The (dumps, loads) pair of a serializer; raises for an unknown or missing one."""
    codec = _CODECS.get(name)
    if codec is None:
        codec = _CODECS[name] = _make_codec(name)
    return codec


def _make_codec(name: str) -> _Codec:
    if name == "pickle":
        return (lambda value: pickle.dumps(value, protocol=PICKLE_PROTOCOL)), pickle.loads
    if name == "msgpack":
        try:
            msgpack = importlib.import_module("msgpack")
        except ImportError:
            raise _missing(name) from None
        return (
            lambda value: msgpack.packb(value, use_bin_type=True),
            lambda data: msgpack.unpackb(data, raw=False),
        )
    if name == "yaml":
        try:
            yaml = importlib.import_module("yaml")
        except ImportError:
            raise _missing(name) from None
        # libyaml's safe dumper and loader where PyYAML has them: the same documents
        # as safe_dump/safe_load (what kombu uses), many times faster.
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return (
            lambda value: yaml.dump(value, Dumper=dumper).encode(),
            lambda data: yaml.load(data, Loader=loader),
        )
    if name == "json":
        return _core_dumps, _core_loads
    raise ValueError(f"unknown serializer {name!r}: use one of {', '.join(CONTENT_TYPES)}")


def check_serializer(setting: str, name: Any) -> str:
    """``name`` if it is a serializer celeriac has, with its package installed.

    ``ValueError`` for an unknown name, :class:`SerializerNotInstalled` for a missing
    package; both say which setting or option held it."""
    if name is None:
        return "json"
    if not isinstance(name, str) or name not in CONTENT_TYPES:
        raise ValueError(
            f"{setting} {name!r} is not a serializer: use one of {', '.join(CONTENT_TYPES)}"
        )
    try:
        _codec(name)
    except SerializerNotInstalled as exc:
        raise SerializerNotInstalled(f"{setting}: {exc}") from None
    return name


def check_compression(setting: str, name: Any) -> str | None:
    """``name`` if it is one of kombu's compression methods (None/"": no compression)."""
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise ValueError(f"{setting} must be a compression name, not {name!r}")
    try:
        compression_content_type(name)
    except ValueError as exc:
        raise ValueError(f"{setting}: {exc}") from None
    return name


def prepare_accept_content(setting: str, names: Iterable[str]) -> list[str]:
    """Serializer names for ``accept_content``-style lists (names or content types);
    ``ValueError`` naming the setting for anything else. A listed serializer whose
    package is missing stays listed: its messages are refused with that reason."""
    by_type = {content_type: name for name, (content_type, _) in CONTENT_TYPES.items()}
    found: list[str] = []
    for item in names:
        name = by_type.get(item, item)
        if name not in CONTENT_TYPES:
            raise ValueError(
                f"{setting}: {item!r} is not a serializer: use one of "
                f"{', '.join(CONTENT_TYPES)} or their content types"
            )
        if name not in found:
            found.append(name)
    return found


def worker_accept_content(names: Iterable[str]) -> list[str]:
    """``accept_content`` for a worker: ``prepare_accept_content``, and, as Celery does,
    no pickle for a worker running as root unless ``C_FORCE_ROOT`` is set (unpickling a
    message can run any code, here with every privilege). ``ImproperlyConfigured``."""
    try:
        accepted = prepare_accept_content("accept_content", names)
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from None
    if "pickle" in accepted and os.geteuid() == 0 and not os.environ.get("C_FORCE_ROOT"):
        raise ImproperlyConfigured(
            "refusing to run as root with pickle in accept_content: unpickling a message "
            "runs whatever code it names. Run the worker as another user (--uid), take "
            "pickle out of accept_content, or set C_FORCE_ROOT=1 to take the risk"
        )
    return accepted


def _plain(value: Any) -> Any:
    """Mappings and sequences as plain dicts and lists (signatures are dict
    subclasses that ``yaml.safe_dump`` refuses and pickle would name by class)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def dumps(name: str, value: Any) -> bytes:
    """``value`` in serializer ``name``; ``TypeError`` (as for JSON) when it cannot be."""
    encode = _codec(name)[0]
    try:
        return encode(value)
    except Exception as exc:
        raise TypeError(f"cannot encode as {name}: {type(exc).__name__}: {exc}") from exc


def loads(name: str, data: bytes) -> Any:
    """Bytes in serializer ``name`` as Python objects."""
    return _codec(name)[1](data)


def dumps_body(name: str, args: Any, kwargs: Any, embed: Mapping[str, Any]) -> bytes:
    """A protocol v2 task body ``(args, kwargs, embed)``, as Celery writes it."""
    embed = {key: None if part is None else _plain(part) for key, part in embed.items()}
    if name == "yaml":
        # safe_dump writes a tuple as a list; a dict subclass it refuses.
        return dumps(name, [list(args), dict(kwargs), embed])
    return dumps(name, (args, kwargs, embed))
