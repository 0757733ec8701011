"""The benchmark's method (``benches/``): the drain's tally, the statistics and marks of the
report, the busy-machine check, the re-rendered report. No broker: pure functions and files."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benches import run  # noqa: E402
from benches.peers import common  # noqa: E402


@pytest.fixture
def counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``common`` reloaded with ``BENCH_COUNTER_DIR`` set to a fresh folder."""
    monkeypatch.setenv("BENCH_COUNTER_DIR", str(tmp_path))
    importlib.reload(common)
    yield tmp_path
    monkeypatch.delenv("BENCH_COUNTER_DIR")
    importlib.reload(common)


def test_tally_adds_every_thread_and_process(counter: Path) -> None:
    threads = [threading.Thread(target=lambda: [common.bump() for _ in range(500)])
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    pid = os.fork()
    if pid == 0:  # a prefork child: counts in a file of its own
        try:
            for _ in range(300):
                common.bump()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert common.tally(counter) == 4 * 500 + 300
    assert len(list(counter.iterdir())) == 2


def test_no_counter_dir_counts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_COUNTER_DIR", raising=False)
    importlib.reload(common)
    common.bump()
    assert common.tally(tmp_path) == 0


def test_wait_count_reports_a_short_count(counter: Path) -> None:
    for _ in range(9):
        common.bump()
    at_end, _ = run.wait_count(counter, 10, grace=0.05)
    assert at_end == 9
    assert common.tally(counter) == 9  # the drain fails the cell: 9 ran, not 10


def test_wait_count_does_not_move_the_clock_when_all_ran(counter: Path) -> None:
    for _ in range(10):
        common.bump()
    assert run.wait_count(counter, 10, grace=5.0) == (10, 0.0)
