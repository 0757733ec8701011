"""``celeriac multi``: start and stop several detached workers, as ``celery multi``.

``celeriac multi start w1 w2 -A proj -l info --pidfile=/run/celeriac/%n.pid
--logfile=/var/log/celeriac/%n%I.log`` starts one ``worker -D`` per node. Nodes are names
(``w1``, ``w1@host``) or a number (``3``: ``celery1``..``celery3``); an option with a
node selector (``-c:w1 4``, ``--loglevel:2=debug``, ``-c:1-3 4``) applies to those nodes
only. ``stop`` sends SIGTERM to each node's pidfile, ``stopwait`` also waits for the
processes to end, ``restart`` stops-and-waits then starts each node, ``kill`` sends
SIGKILL, ``show`` prints the worker command lines, ``names`` the node names.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from celeriac.worker.options import Pidfile, node_format

PROG = "celeriac multi"
VERBS = ("start", "stop", "stopwait", "restart", "kill", "show", "names")
#: Celery's defaults for multi's nodes.
DEFAULT_PIDFILE = "%n.pid"
DEFAULT_LOGFILE = "%n%I.log"
#: ``celery multi`` options about its own output: accepted, no effect.
QUIET_FLAGS = ("--quiet", "-q", "--verbose", "--nosplash", "--no-color")
_SELECTED = re.compile(r"^(-{1,2}[A-Za-z][\w-]*):([^=]+)(?:=(.*))?$")
EX_USAGE = 2


class MultiError(Exception):
    """Bad ``multi`` input: one line, exit status 2."""


@dataclass
class Node:
    name: str
    #: 1-based position, for ``-c:2`` selectors.
    index: int
    pidfile: str = ""
    options: list[str] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.name.partition("@")[0]


def parse_nodes(names: Sequence[str], host: str) -> list[Node]:
    """``["3"]`` -> celery1..3; ``["w1", "w2@x"]`` -> ``w1@<host>``, ``w2@x``."""
    if len(names) == 1 and names[0].isdigit():
        count = int(names[0])
        if count < 1:
            raise MultiError(f"{names[0]!r} nodes: give at least 1")
        names = [f"celery{n}" for n in range(1, count + 1)]
    nodes: list[Node] = []
    for index, name in enumerate(names, 1):
        full = name if "@" in name else f"{name}@{host}"
        if not full.partition("@")[0] or any(n.name == full for n in nodes):
            raise MultiError(f"node name {name!r} is empty or given twice")
        nodes.append(Node(full, index))
    return nodes


def _selects(selector: str, node: Node) -> bool:
    for part in selector.split(","):
        low, dash, high = part.partition("-")
        if dash and low.isdigit() and high.isdigit():
            if int(low) <= node.index <= int(high):
                return True
        elif part in (node.name, node.short, str(node.index)):
            return True
    return False


def plan(argv: Sequence[str], host: str | None = None) -> tuple[list[Node], list[str], str]:
    """The nodes, the options every worker gets and the log file template, from the
    arguments after the verb. ``MultiError`` for bad input."""
    host = host or socket.gethostname()
    names: list[str] = []
    rest = list(argv)
    while rest and not rest[0].startswith("-"):
        names.append(rest.pop(0))
    if not names:
        raise MultiError("no nodes given (e.g. 'w1 w2', or a number: '3')")
    nodes = parse_nodes(names, host)
    common: list[str] = []
    pidfile, logfile = DEFAULT_PIDFILE, DEFAULT_LOGFILE
    while rest:
        arg = rest.pop(0)
        if arg in QUIET_FLAGS:
            continue
        selected = _SELECTED.match(arg)
        if selected:
            flag, selector, value = selected.groups()
            if value is None:
                if not rest:
                    raise MultiError(f"{arg}: no value given")
                value = rest.pop(0)
            chosen = [node for node in nodes if _selects(selector, node)]
            if not chosen:
                raise MultiError(f"{arg}: {selector!r} names none of the nodes")
            for node in chosen:
                node.options += [f"{flag}={value}"] if flag.startswith("--") else [flag, value]
            continue
        flag, eq, inline = arg.partition("=")
        if flag in ("--pidfile", "-f", "--logfile"):
            if not eq:
                if not rest:
                    raise MultiError(f"{flag}: no value given")
                inline = rest.pop(0)
            if flag == "--pidfile":
                pidfile = inline
            else:
                logfile = inline
            continue
        common.append(arg)
    for node in nodes:
        try:
            node.pidfile = node_format(pidfile, node.name)
            node_format(logfile, node.name)
        except ValueError as exc:
            raise MultiError(str(exc)) from None
    return nodes, common, logfile


def worker_argv(node: Node, common: Sequence[str], logfile: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "celeriac", "worker", "--detach", "-n", node.name),
        f"--pidfile={node.pidfile}",
        f"--logfile={logfile}",
        *common,
        *node.options,
    ]


def _pid(node: Node) -> int | None:
    """The running pid in the node's pidfile, else None."""
    try:
        pid = Pidfile(node.pidfile).read_pid()
    except OSError:
        return None
    return pid if pid is not None and _running(pid) else None


def _start(node: Node, common: Sequence[str], logfile: str) -> bool:
    done = subprocess.run(worker_argv(node, common, logfile), capture_output=True, text=True)
    if done.returncode == 0:
        print(f"\t> {node.name}: OK", flush=True)
        return True
    print(f"\t> {node.name}: FAILED (exit status {done.returncode})", flush=True)
    sys.stderr.write(done.stderr)
    return False


def _signal(nodes: Sequence[Node], signum: int) -> dict[str, int]:
    sent: dict[str, int] = {}
    for node in nodes:
        pid = _pid(node)
        if pid is None:
            print(f"\t> {node.name}: DOWN", flush=True)
            continue
        os.kill(pid, signum)
        print(f"\t> {node.name}: {signal.Signals(signum).name} -> {pid}", flush=True)
        sent[node.name] = pid
    return sent


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A zombie has ended: an init that never reaps (some containers) must not hang us.
    with (
        contextlib.suppress(OSError, IndexError),
        open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh,
    ):
        return fh.read().rpartition(")")[2].split()[0] != "Z"
    return True


def _wait_gone(sent: dict[str, int]) -> None:
    """Until every signalled process has ended, not only removed its pidfile
    (systemd's TimeoutStopSec bounds the wait)."""
    waiting = dict(sent)
    while waiting:
        for name, pid in list(waiting.items()):
            if not _running(pid):
                print(f"\t> {name}: stopped", flush=True)
                del waiting[name]
        if waiting:
            time.sleep(0.1)


def main(argv: Sequence[str], global_args: Sequence[str] = ()) -> int:
    """``celeriac multi VERB NODES... [OPTIONS]``; the exit status."""
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(__doc__)
            return 0 if argv else EX_USAGE
        verb = argv[0]
        if verb not in VERBS:
            raise MultiError(f"unknown command {verb!r} (choose from {', '.join(VERBS)})")
        nodes, common, logfile = plan(argv[1:])
    except MultiError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EX_USAGE
    common = [*global_args, *common]
    if verb == "names":
        print("\n".join(node.name for node in nodes))
        return 0
    if verb == "show":
        for node in nodes:
            print(subprocess.list2cmdline(worker_argv(node, common, logfile)))
        return 0
    if verb in ("stop", "stopwait", "kill", "restart"):
        print("> Stopping nodes...", flush=True)
        sent = _signal(nodes, signal.SIGKILL if verb == "kill" else signal.SIGTERM)
        if verb == "kill":
            for node in nodes:  # a killed worker cannot remove its pidfile
                if node.name in sent:
                    with contextlib.suppress(OSError):
                        os.unlink(node.pidfile)
        if verb in ("stopwait", "restart"):
            _wait_gone(sent)
        if verb != "restart":
            return 0
    print("> Starting nodes...", flush=True)
    failed = [node for node in nodes if not _start(node, common, logfile)]
    return 1 if failed else 0
