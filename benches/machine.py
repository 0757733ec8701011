"""Is the machine quiet? A run that starts while other processes keep the CPUs busy measures
them too: it waits (bounded) for the CPUs to calm down, and says so when they do not."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: a run starts when the other processes use at most this share of all CPUs
BUSY_THRESHOLD = 0.2
#: how long a run waits for that, seconds
QUIET_WAIT = 120.0
#: the CPUs' use is measured over this long, seconds
SAMPLE_SECONDS = 1.0


def cpu_times(stat: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from the text of ``/proc/stat``: idle and iowait
    are idle; guest time is already inside user and nice."""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            fields = [int(f) for f in line.split()[1:9]]
            total = sum(fields)
            return total - fields[3] - fields[4], total
    raise ValueError("no 'cpu' line in /proc/stat")


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of all CPUs (0..1) busy between two ``cpu_times`` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def sample_busy(seconds: float = SAMPLE_SECONDS) -> float:
    """The share of all CPUs busy over the next ``seconds``."""
    stat = Path("/proc/stat")
    before = cpu_times(stat.read_text())
    time.sleep(seconds)
    return busy_share(before, cpu_times(stat.read_text()))


@dataclass(frozen=True)
class Quiet:
    quiet: bool  # the last sample was at or under the threshold
    busy: float  # the last sample's busy share
    waited_seconds: float
    samples: list[float]


def wait_quiet(
    limit: float,
    threshold: float = BUSY_THRESHOLD,
    sample: Callable[[], float] = sample_busy,
    clock: Callable[[], float] = time.monotonic,
    say: Callable[[str], None] = print,
) -> Quiet:
    """Sample the CPUs until they are quiet or ``limit`` seconds passed; say why it waits."""
    t0 = clock()
    samples = [sample()]
    if samples[-1] > threshold and limit > 0:
        say(f"the CPUs are {samples[-1]:.0%} busy (over {threshold:.0%}): waiting up to "
            f"{limit:.0f} s for other processes to finish")  # fmt: skip
        while samples[-1] > threshold and clock() - t0 < limit:
            samples.append(sample())
    result = Quiet(samples[-1] <= threshold, samples[-1], clock() - t0, samples)
    if not result.quiet:
        say(f"NOT QUIET: the CPUs are {result.busy:.0%} busy after {result.waited_seconds:.0f} "
            "s; running anyway, the results say so")  # fmt: skip
    return result
