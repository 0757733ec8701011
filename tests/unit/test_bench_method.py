"""The benchmark's method (``benches/``): the drain's tally, the statistics and marks of the
report, the busy-machine check, the re-rendered report. No broker: pure functions and files."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benches import machine, plan, report, run  # noqa: E402
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


# -- point 2: repeats, median and min-max, wide spreads marked, a busy machine said ---------


def test_defaults_are_three_repeats_of_20000() -> None:
    args = run.parse_args([])
    assert (args.repeats, args.n) == (3, 20_000)
    assert report.method_notes(vars(args), {"quiet_at_start": True}) == []


def test_cell_shows_median_and_range_and_marks_a_wide_spread() -> None:
    recs = [_rec("celeriac", v) for v in (100.0, 110.0, 130.0)]  # (130-100)/110 = 27 %
    recs += [_rec("celery", v) for v in (10.0, 11.0, 12.0)]  # 18 %
    rows = {r["metric"]: r for r in report.summarize(recs)}
    row = rows["rate"]
    assert row["values"] == {"celeriac": 110.0, "celery": 11.0}
    assert row["ranges"]["celeriac"] == [100.0, 130.0]
    assert row["wide"] == ["celeriac"]
    assert report.cell(row, "celeriac") == "110 [100-130]*"
    assert report.cell(row, "celery") == "11.0 [10.0-12.0]"
    assert report.cell(row, "huey") == "-"
    table = "\n".join(report.table_lines(list(rows.values())))
    assert "110 [100-130]*" in table


def test_one_repeat_shows_no_range() -> None:
    row = report.summarize([_rec("celeriac", 5.0)])[0]
    assert report.cell(row, "celeriac") == "5.00"
    assert row["wide"] == []


def test_method_notes_name_what_is_missing() -> None:
    notes = report.method_notes(
        {"repeats": 1, "n": 200},
        {"quiet_at_start": False, "busy_at_start": 0.8, "waited_for_quiet_seconds": 120},
    )
    assert notes == [
        "1 repeat(s): the method needs 3",
        "n = 200: the method needs 20,000 for the drain",
        "the CPUs were 80% busy when it started (waited 120 s)",
    ]
    assert report.method_notes({"repeats": 3, "n": 20_000}, {}) == [
        "the machine's load at the start was not checked"
    ]


def test_cpu_times_and_busy_share() -> None:
    before = machine.cpu_times("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
    after = machine.cpu_times("cpu  250 0 150 800 100 0 0 0 0 0\n")
    assert before == (200, 1000)
    assert machine.busy_share(before, after) == pytest.approx(200 / 300)
    with pytest.raises(ValueError, match="no 'cpu' line"):
        machine.cpu_times("intr 1 2 3\n")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sampler(values: list[float], clock: FakeClock) -> Callable[[], float]:
    it = iter(values)

    def sample() -> float:
        clock.now += 1.0
        return next(it)

    return sample


def test_a_busy_machine_is_waited_for() -> None:
    clock, said = FakeClock(), []
    q = machine.wait_quiet(10, 0.2, _sampler([0.9, 0.7, 0.1], clock), clock, said.append)
    assert (q.quiet, q.busy, q.waited_seconds, q.samples) == (True, 0.1, 3.0, [0.9, 0.7, 0.1])
    assert len(said) == 1 and "waiting up to 10 s" in said[0]


def test_a_machine_busy_all_along_is_said_so() -> None:
    clock, said = FakeClock(), []
    q = machine.wait_quiet(3, 0.2, _sampler([0.9] * 10, clock), clock, said.append)
    assert not q.quiet and q.waited_seconds == 3.0
    assert said[-1].startswith("NOT QUIET: the CPUs are 90% busy after 3 s")


def test_a_quiet_machine_starts_at_once() -> None:
    clock, said = FakeClock(), []
    q = machine.wait_quiet(10, 0.2, _sampler([0.05], clock), clock, said.append)
    assert q.quiet and said == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quiet-wait", "-1"], "need --quiet-wait >= 0"),
        (["--busy-threshold", "0"], "need 0 < --busy-threshold <= 1"),
        (["--busy-threshold", "1.5"], "need 0 < --busy-threshold <= 1"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_broken_options_get_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse %-formats each help text: a bare "%" in one made --help itself crash
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quiet-wait" in out and "20% busy" in out


# -- point 6: honest labels ------------------------------------------------------------------


def test_celery_on_sqlite_is_labelled_as_a_poll_once_a_second() -> None:
    recs = [_rec("celeriac", 50.0, broker="sqlite"), _rec("celery", 1.0, broker="sqlite"),
            _rec("huey", 4.0, broker="sqlite"), _rec("celery", 1.0)]  # fmt: skip
    rows = report.summarize(recs)
    table = report.table_lines(rows)
    sqlite = next(line for line in table if line.startswith("SQLite") and "tasks/s" in line)
    redis_line = next(line for line in table if line.startswith("Redis") and "tasks/s" in line)
    assert "1.00+" in sqlite and "50.00x+" in sqlite and "12.50x huey" in sqlite
    assert "+" not in redis_line
    (note,) = report.caveat_lines(rows)
    assert "polls the table once a second" in note and "SqliteHuey is the real peer" in note


def test_readme_puts_the_eta_timer_in_rust() -> None:
    text = (ROOT / "README.md").read_text()
    assert "ETA timer live in the Python worker" not in " ".join(text.split())
    assert "the ETA timer is Rust" in text and (ROOT / "src/scheduler/eta.rs").exists()


def test_celery_solo_worker_is_run_as_a_user_runs_it() -> None:
    """``celery worker -P solo`` with no ``-c``: Celery sizes the prefetch window by its
    concurrency (the CPU count by default) even for solo, and ``-c 1`` made the harness's
    RabbitMQ drain ~10x slower than the same worker started by hand (issue 18 point 5)."""
    from benches.peers import worker_spec

    for prefetch in (0, 64):
        spec = worker_spec("celery", "python", "q", "solo", 1, "amqp", prefetch)
        assert spec is not None
        assert "-c" not in spec.argv and "--concurrency" not in spec.argv
        assert " -c " not in spec.settings
    prefork = worker_spec("celery", "python", "q", "prefork", 4, "amqp")
    assert prefork is not None and prefork.argv[prefork.argv.index("-c") + 1] == "4"
