"""Broker and result-backend URLs: which transport a scheme names, which ones celeriac
speaks, and the transport options a few settings turn into."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# Transports the core speaks now. Anything else fails at first use with a clear error.
# ``sentinel://`` (a ``;``-separated list of sentinels, kombu's) is Redis: the sentinels
# name the master, which the core asks them for on every (re)connect.
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "unix", "socket", "sentinel"})
AMQP_SCHEMES = frozenset({"amqp", "pyamqp", "amqps"})
SUPPORTED_BROKERS = REDIS_SCHEMES | AMQP_SCHEMES | {"sqlite"}
SUPPORTED_BACKENDS = REDIS_SCHEMES | {"sqlite", "rpc"}
DISABLED_BACKENDS = frozenset({"", "disabled", "disabled://"})

_CERT_REQS = {0: "none", 1: "optional", 2: "required"}


def ssl_option(value: Any) -> Any:
    """``broker_use_ssl`` for the transport: True, or its dict with paths as text and
    ``cert_reqs`` (``ssl.CERT_*``, or kombu's ``"required"``-style text) as a word.
    Anything else goes through as it is, for the transport to refuse by name."""
    if not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in ("ca_certs", "certfile", "keyfile") and isinstance(item, os.PathLike):
            item = os.fspath(item)
        elif key == "cert_reqs" and isinstance(item, int) and not isinstance(item, bool):
            item = _CERT_REQS.get(int(item), item)
        elif key == "cert_reqs" and isinstance(item, str):
            item = item.lower().removeprefix("cert_")
        out[str(key)] = item
    return out


def redis_ssl_option(value: Any) -> Any:
    """``broker_use_ssl`` / ``redis_backend_use_ssl`` for a Redis URL: a dict of kombu's
    ``ssl_*`` keys with paths as text (``ssl_cert_reqs`` as ``ssl.CERT_*`` or its name
    goes through: the core reads both); True, False and None as they are."""
    if not isinstance(value, Mapping):
        return value
    return {
        str(key): os.fspath(item) if isinstance(item, os.PathLike) else item
        for key, item in value.items()
    }


def scheme_of(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else url.lower()


def transport_of(url: str) -> str:
    """``"redis"``, ``"amqp"`` or ``"sqlite"`` for a broker URL of any of their schemes
    (``rediss``, ``unix``, ``amqps``, ``pyamqp`` ...); another scheme as it is."""
    scheme = scheme_of(url)
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in AMQP_SCHEMES:
        return "amqp"
    return scheme
