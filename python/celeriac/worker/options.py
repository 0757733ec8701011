"""Worker options: what the command line chose, and the platform facts behind defaults."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

#: Pools that run today; ``prefork`` is the default, as in Celery.
POOLS = ("prefork", "solo", "threads")
#: Other names for a pool (Celery's ``processes``).
POOL_ALIASES = {"processes": "prefork"}
PLANNED_POOLS = ("eventlet", "gevent")

DEFAULT_NODENAME = "celery@%h"


@dataclass
class WorkerOptions:
    """The worker's settings after the command line and ``app.conf`` were merged."""

    hostname: str = DEFAULT_NODENAME
    concurrency: int | None = None
    pool: str | None = None
    queues: list[str] = field(default_factory=list)
    exclude_queues: list[str] = field(default_factory=list)
    loglevel: int = logging.WARNING
    prefetch_multiplier: int | None = None
    task_events: bool = False
    max_tasks_per_child: int | None = None
    #: KiB of resident memory after which a prefork child is replaced.
    max_memory_per_child: int | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None


def split_names(values: list[str] | None) -> list[str]:
    """``-Q a,b -Q c`` -> ``["a", "b", "c"]`` (order kept, duplicates and blanks dropped)."""
    names: list[str] = []
    for value in values or ():
        for part in value.split(","):
            name = part.strip()
            if name and name not in names:
                names.append(name)
    return names


_FORMAT_KEY = re.compile(r"%(.)")


def expand_nodename(template: str, host: str | None = None) -> str:
    """Celery's ``-n`` rules: ``name@host`` with ``%h`` (host), ``%n`` (host up to the
    first dot), ``%d`` (domain), ``%%``; a name without ``@`` is ``celery@<name>``.
    Unknown ``%x`` keys raise ``ValueError``."""
    host = host or socket.gethostname()
    if "@" in template:
        name, _, where = template.partition("@")
    else:
        name, where = "", template
    full = f"{name or 'celery'}@{where or host}"
    short, _, domain = host.partition(".")
    keys = {"h": host, "n": short, "d": domain, "%": "%", "i": "0", "I": ""}

    def resolve(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in keys:
            raise ValueError(f"unknown format key %{key} in node name {template!r}")
        return keys[key]

    return _FORMAT_KEY.sub(resolve, full)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    """The cgroup CPU limit in CPUs (v2 ``cpu.max``, else v1 CFS quota), or None."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None
