"""Opt-in hop timestamps for the latency timeline (docs/latency.md).

With ``CELERIAC_TRACE=FILE`` set, :func:`hop` appends ``<CLOCK_MONOTONIC ns> <pid> <tid>
<hop>`` to FILE in one ``write(2)`` on an ``O_APPEND`` descriptor: the format and the
clock of the Rust core's ``src/trace.rs``, so both sides' lines make one timeline.
Unset, ``ENABLED`` is False and callers skip the call. A FILE that cannot be opened
turns tracing off with a warning (the core then records nothing either).
"""

from __future__ import annotations

import os
import threading
import time
import warnings

_PATH = os.environ.get("CELERIAC_TRACE", "")


def _open(path: str) -> int:
    if not path:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        warnings.warn(f"CELERIAC_TRACE: cannot open {path!r} ({exc}); not tracing", stacklevel=1)
        return -1


_FD = _open(_PATH)

#: Whether hops are recorded (checked by callers, so a hop costs nothing when off).
ENABLED = _FD >= 0


def hop(name: str) -> None:
    """Record that this thread reached ``name`` now."""
    if _FD >= 0:
        line = f"{time.monotonic_ns()} {os.getpid()} {threading.get_native_id()} {name}\n"
        os.write(_FD, line.encode())
