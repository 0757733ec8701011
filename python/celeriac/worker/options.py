"""Worker options: what the command line chose, and the platform facts behind defaults."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: Pools that run today; ``prefork`` is the default, as in Celery.
POOLS = ("prefork", "solo", "threads")
#: Other names for a pool (Celery's ``processes``).
POOL_ALIASES = {"processes": "prefork"}
PLANNED_POOLS = ("eventlet", "gevent")

DEFAULT_NODENAME = "celery@%h"
#: ``-c auto`` (Celery 5.7): as many as the CPUs this process may use (affinity mask,
#: cgroup quota), whatever ``worker_concurrency`` says.
AUTO_CONCURRENCY = "auto"
#: ``--pool-start-method`` values Celery knows; celeriac forks its prefork children.
START_METHODS = ("fork", "spawn")


@dataclass
class WorkerOptions:
    """The worker's settings after the command line and ``app.conf`` were merged."""

    hostname: str = DEFAULT_NODENAME
    #: None: ``worker_concurrency``, else the CPUs; ``"auto"``: the CPUs.
    concurrency: int | Literal["auto"] | None = None
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
    #: ``-f``: the log file template (``%n``, ``%i``, ... expanded per process); None: stderr.
    logfile: str | None = None
    #: ``--pidfile``, already expanded: the supervisor's pid is written there.
    pidfile: str | None = None
    #: ``--purge``: empty the consumed queues before consuming.
    purge: bool = False
    #: False with ``--without-heartbeat``: no worker-online/heartbeat/offline events.
    heartbeat: bool = True
    #: ``--heartbeat-interval``: seconds between worker-heartbeat events (None: 2).
    heartbeat_interval: float | None = None
    #: False with ``--without-mingle``: no start-up ``hello`` to learn the other
    #: workers' revoked ids (``celeriac.worker.mingle``); theirs are answered either way.
    mingle: bool = True
    #: False with ``--without-gossip``. celeriac does not gossip (it never reads other
    #: workers' events); accepted so Celery command lines run unchanged.
    gossip: bool = True
    #: ``-I/--include``: modules imported at start (the command line imports them and
    #: adds them to the ``include`` setting, as Celery does).
    include: list[str] = field(default_factory=list)
    #: ``--pool-start-method`` (None: ``worker_pool_start_method``, else ``fork``).
    pool_start_method: str | None = None
    #: ``--disable-prefetch`` (None: ``worker_disable_prefetch``): take a message only
    #: when a pool slot is free, i.e. a prefetch multiplier of 1.
    disable_prefetch: bool | None = None


def split_names(values: list[str] | None) -> list[str]:
    """``-Q a,b -Q c`` -> ``["a", "b", "c"]`` (order kept, duplicates and blanks dropped)."""
    names: list[str] = []
    for value in values or ():
        for part in value.split(","):
            name = part.strip()
            if name and name not in names:
                names.append(name)
    return names


def is_module_name(name: str) -> bool:
    """Whether ``name`` can be imported by name (``pkg.module``, each part an identifier)."""
    return all(part.isidentifier() for part in name.split("."))


def parse_umask(value: str) -> int:
    """``--umask``: an octal number with a leading 0 (``022``, ``0o22``, ``0``), read
    as Celery reads one. Celery takes a number without the leading 0 as decimal (``22``
    is ``0o026``), a trap: refused here. ``ValueError`` with the reason."""
    text = value.strip()
    if text.isdigit() and not text.startswith("0"):
        example = f"0{text}" if set(text) <= set("01234567") else "022"
        raise ValueError(
            f"{value!r} has no leading 0: write the umask in octal, e.g. {example} "
            f"(Celery reads {text} as a decimal number)"
        )
    try:
        if not text.startswith("0"):
            raise ValueError
        mask = int(text, 8)
    except ValueError:
        raise ValueError(f"{value!r} is not an octal umask (e.g. 022)") from None
    if mask > 0o777:
        raise ValueError(f"{value!r} is more than 0777")
    return mask


@dataclass(frozen=True)
class Identity:
    """The user and group ``--uid``/``--gid`` ask the worker to run as (resolved,
    not applied); None where nothing changes."""

    uid: int | None = None
    gid: int | None = None
    #: The user's name, for its supplementary groups (None: no passwd entry).
    user: str | None = None


def resolve_identity(uid: str | None, gid: str | None) -> Identity:
    """Celery's ``--uid``/``--gid``: a number or a user (group) name; with ``--uid``
    alone the group is the user's primary group. Only root may change them: another
    user may ask for itself only (a no-op). ``ValueError`` naming the option."""
    import grp
    import pwd

    user_id: int | None = None
    user_name: str | None = None
    primary: int | None = None
    if uid is not None:
        text = uid.strip()
        try:
            entry = pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
        except KeyError:
            entry = None
            if not text.isdigit():
                raise ValueError(f"argument --uid: no user named {text!r}") from None
        user_id = int(text) if entry is None else entry.pw_uid
        if entry is not None:
            user_name, primary = entry.pw_name, entry.pw_gid
    group_id: int | None = None
    if gid is not None:
        text = gid.strip()
        if text.isdigit():
            group_id = int(text)
        else:
            try:
                group_id = grp.getgrnam(text).gr_gid
            except KeyError:
                raise ValueError(f"argument --gid: no group named {text!r}") from None
    euid, egid = os.geteuid(), os.getegid()
    if user_id == euid:
        user_id = None  # already this user: nothing to change (nor its groups)
    elif user_id is not None and group_id is None:
        if primary is None:
            raise ValueError(
                f"argument --uid: no user has uid {user_id}, so it has no primary "
                "group: give --gid too"
            )
        group_id = primary
    if group_id == egid and user_id is None:
        group_id = None
    if euid != 0:
        me = _user_name(euid)
        if user_id is not None:
            raise ValueError(
                f"argument --uid: only root can switch the worker to another user; this "
                f"worker runs as uid {euid}{me} (start it as root, or drop --uid)"
            )
        if group_id is not None:
            raise ValueError(
                f"argument --gid: only root can switch the worker to another group; this "
                f"worker runs as uid {euid}{me}, gid {egid} (start it as root, or drop --gid)"
            )
    return Identity(user_id, group_id, user_name)


def _user_name(uid: int) -> str:
    import pwd

    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""


def drop_privileges(identity: Identity) -> None:
    """Become ``identity`` as Celery's ``maybe_drop_privileges`` does: the group
    first, then the user's groups, then the user; then check root cannot be taken
    back. ``OSError`` when the system refuses."""
    uid, gid = identity.uid, identity.gid
    if gid is not None:
        os.setgid(gid)
    if uid is None:
        return
    if gid is not None:
        if identity.user is not None:
            os.initgroups(identity.user, gid)
        else:
            os.setgroups([gid])
    os.setuid(uid)
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return  # as it should be
        raise PermissionError(errno.EPERM, f"uid {uid} could take root back after setuid")


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


def node_format(template: str, nodename: str, index: int | None = None) -> str:
    """Celery's expansion of file names (``-f``, ``--pidfile``) for node ``nodename``:
    ``%p`` (the full node name), ``%n`` (its name part), ``%h`` (its host), ``%d`` (the
    host's domain), ``%i`` (the prefork child's index from 1, or 0 in the main process),
    ``%I`` (``-<index>`` in a child, empty in the main process), ``%%``.
    Unknown ``%x`` keys raise ``ValueError``."""
    name, at, host = nodename.partition("@")
    if not at:
        name, host = "", nodename
    host = host or socket.gethostname()
    keys = {
        "p": nodename,
        "n": name or "celery",
        "h": host,
        "d": host.partition(".")[2],
        "i": str(index) if index else "0",
        "I": f"-{index}" if index else "",
        "%": "%",
    }

    def resolve(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in keys:
            raise ValueError(f"unknown format key %{key} in {template!r}")
        return keys[key]

    return _FORMAT_KEY.sub(resolve, template)


def per_process(template: str) -> bool:
    """Whether the file name differs per prefork child (it has ``%i`` or ``%I``)."""
    return any(m.group(1) in "iI" for m in _FORMAT_KEY.finditer(template))


class PidfileLocked(Exception):
    """The pidfile exists and names a process that runs."""

    def __init__(self, path: str, pid: int) -> None:
        super().__init__(path, pid)
        self.path = path
        self.pid = pid


class Pidfile:
    """The worker's pidfile, kept as Celery keeps it: created exclusively with the pid
    and a newline; one naming a process that runs refuses the start (``PidfileLocked``);
    a stale one (the process is gone, or the file cannot be read) is replaced; removed
    on exit by the process that wrote it (never by a forked child)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.pid: int | None = None
        #: Why an existing file was replaced (for the log), or None.
        self.replaced: str | None = None

    def read_pid(self) -> int | None:
        """The pid in the file; None if it has none (empty, partial, not a number).
        ``FileNotFoundError`` when there is no file."""
        with open(self.path, encoding="ascii", errors="replace") as fh:
            line = fh.readline()
        if not line.endswith("\n"):
            return None
        try:
            pid = int(line.strip())
        except ValueError:
            return None
        return pid if pid > 0 else None

    def acquire(self) -> None:
        """Write our pid. ``PidfileLocked`` if a running process holds the file,
        ``OSError`` if it cannot be written."""
        for _ in range(3):
            self._remove_if_stale()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # another process wrote it since we looked: look again
            pid = os.getpid()
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{pid}\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.pid = pid
            return
        raise OSError(errno.EEXIST, "the file keeps being recreated by another process")

    def _remove_if_stale(self) -> None:
        try:
            pid = self.read_pid()
        except FileNotFoundError:
            return
        if pid is None:
            self.replaced = "it holds no pid"
        elif pid == os.getpid():
            self.replaced = "it names this process"  # e.g. pid 1 again in a container
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self.replaced = f"no process {pid} runs"
            except PermissionError:
                # As Celery: another user's process took the pid; ours is gone.
                self.replaced = f"process {pid} is not this user's"
            else:
                raise PidfileLocked(self.path, pid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def release(self) -> None:
        """Remove the file if this process wrote it and it still names this process."""
        if self.pid is None or self.pid != os.getpid():
            return
        try:
            if self.read_pid() == self.pid:
                os.unlink(self.path)
        except OSError:
            pass
        self.pid = None


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
