"""The startup banner, in the shape of Celery's (docs/wire.md §8) with our own art."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

#: A celeriac root: leaves on top, a knobbly bulb, rootlets below.
#: Twelve lines, each 15 characters; text starts after one more space.
ART: tuple[str, ...] = (
    r"   \   |   /   ",
    r"    \  |  /    ",
    r"  \  \ | /  /  ",
    r"   '-.\|/.-'   ",
    r"  .-'     '-.  ",
    r" /  o  .  o  \ ",
    r" |  .  ~  o  | ",
    r" | o   .   ~ | ",
    r" \  ~  o  .  / ",
    r"  '-.,_,_,.-'  ",
    r"    /  |  \    ",
    r"   /   |   \   ",
)

#: Lines past the art are indented by this much, as in Celery.
INDENT = " " * 16

EVENTS_ON = "ON"
EVENTS_OFF = "OFF (enable -E to monitor tasks in this worker)"


@dataclass(frozen=True)
class QueueInfo:
    """One consumed queue as the banner shows it."""

    name: str
    exchange: str
    exchange_type: str = "direct"
    routing_key: str = ""

    def line(self) -> str:
        key = self.routing_key or self.name
        return f".> {self.name:<16} exchange={self.exchange}({self.exchange_type}) key={key}"


@dataclass(frozen=True)
class BannerInfo:
    """Everything the banner shows. URLs must already be masked."""

    nodename: str
    version: str
    app: str
    transport: str
    results: str
    concurrency: int
    pool: str
    task_events: bool
    queues: Sequence[QueueInfo]
    tasks: Iterable[str] = ()
    platform: str = field(default_factory=platform.platform)
    timestamp: datetime = field(default_factory=lambda: datetime.now().replace(microsecond=0))


def _queue_lines(queues: Sequence[QueueInfo]) -> str:
    lines = [q.line() for q in sorted(queues, key=lambda q: q.name)]
    if not lines:
        return ""
    # Celery ends a single queue with a newline (its art then shows an empty line).
    return lines[0] + "\n" + "\n".join(lines[1:])


def describe_url(masked: str) -> str:
    """A masked URL as the banner shows it: the embedded SQLite file is shown with its
    absolute path and a reminder that it is for one machine."""
    if masked.startswith("sqlite://"):
        path = masked[len("sqlite://") :]
        return f"sqlite://{os.path.abspath(path)} (embedded SQLite: for one machine)"
    return masked


def render(info: BannerInfo, loglevel: int = logging.INFO) -> str:
    """The banner text: a blank line, the art block, then ``[tasks]`` at INFO or below."""
    events = EVENTS_ON if info.task_events else EVENTS_OFF
    text = (
        f"{info.nodename} v{info.version} (celeriac)\n"
        "\n"
        f"{info.platform} {info.timestamp}\n"
        "\n"
        "[config]\n"
        f".> app:         {info.app}\n"
        f".> transport:   {describe_url(info.transport)}\n"
        f".> results:     {describe_url(info.results)}\n"
        f".> concurrency: {info.concurrency} ({info.pool})\n"
        f".> task events: {events}\n"
        "\n"
        "[queues]\n"
        f"{_queue_lines(info.queues)}\n"
    )
    lines = text.splitlines()
    for i, line in enumerate(lines):
        prefix = ART[i] if i < len(ART) else INDENT[:-1]
        lines[i] = f"{prefix} {line}"
    out = " \n" + "\n".join(lines) + "\n"
    if loglevel <= logging.INFO:
        include_builtins = loglevel <= logging.DEBUG
        names = sorted(
            name for name in info.tasks if include_builtins or not name.startswith("celery.")
        )
        out += "\n[tasks]\n" + "\n".join(f"  . {name}" for name in names) + "\n"
    return out
