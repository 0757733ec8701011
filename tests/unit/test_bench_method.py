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

from benches import plan, report, run  # noqa: E402
from benches.peers import BROKERS, PEERS, common  # noqa: E402


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


# -- point 1: the defaults are the headline, the tuned rows below, on every broker ----------


def test_headline_drain_runs_every_peer_at_its_defaults_on_every_broker() -> None:
    args = run.parse_args([])
    jobs = plan.plan(args, list(PEERS), list(plan.ALL_BROKERS))
    for broker in plan.ALL_BROKERS:
        drains = [j for j in jobs if j.broker == broker and j.scenario == "drain"]
        headline = [j for j in drains if j.shape == "1 process" and j.repeat == 0]
        assert {j.peer for j in headline} == {p for p in PEERS if broker in BROKERS[p]}
        assert all(j.prefetch == 0 for j in headline)
        tuned = [j for j in drains if plan.TUNED in j.shape and j.repeat == 0]
        assert {j.peer for j in tuned} == {p for p in plan.TUNABLE_PEERS if broker in BROKERS[p]}, (
            broker
        )
        assert all(j.prefetch == args.prefetch == 64 for j in tuned)
        assert all(j.prefetch == 0 for j in drains if plan.TUNED not in j.shape)


def test_no_tuned_rows_with_prefetch_0() -> None:
    jobs = plan.plan(run.parse_args(["--prefetch", "0"]), list(PEERS), ["redis"])
    assert not [j for j in jobs if plan.TUNED in j.shape]


def _rec(peer: str, value: float, shape: str = "1 process", broker: str = "redis") -> dict:
    return {"ok": True, "broker": broker, "scenario": "drain", "shape": shape, "peer": peer,
            "rate": value, "seconds": 1.0}  # fmt: skip


def test_tuned_rows_come_below_the_defaults() -> None:
    tuned = plan.tuned_shape(64)
    recs = [_rec("celeriac", 9.0, tuned), _rec("celeriac", 5.0), _rec("celery", 1.0, tuned),
            _rec("celery", 1.0), _rec("celeriac", 4.0, broker="amqp")]  # fmt: skip
    rows = report.summarize(recs)
    shapes = [(r["broker"], r["shape"]) for r in rows if r["metric"] == "rate"]
    assert shapes == [("redis", "1 process"), ("redis", tuned), ("amqp", "1 process")]
