"""The benchmark's results file (``benches/``, issue 18 point 7): ``python -m benches --report
FILE`` prints the tables a run printed, from its JSON alone; a broken or older file is a
clear error; the README's results block is the committed run's file rendered.

The first test runs a tiny benchmark (celeriac on SQLite, its sentinels through the real
Redis); the others read files only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benches import report, run  # noqa: E402

README_RUN = ROOT / "benches" / "results" / "README-run.json"
#: the README's results block: this comment, then a ```text block of the rendered file
README_MARK = "<!-- python -m benches --report benches/results/README-run.json -->"


def _bench(*args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benches", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.redis
def test_report_prints_what_the_run_printed(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    ran = _bench(
        "-n", "20", "--calls", "10", "--repeats", "2", "--extra-repeats", "0",
        "--peers", "celeriac", "--brokers", "sqlite", "--scenarios", "enqueue,drain,roundtrip",
        "--prefetch", "0", "--quiet-wait", "0", "--no-chart", "--json", str(out),
        "--note", "a test's run",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    doc = json.loads(out.read_text())
    # What the rendering needs, and what says where the figures come from.
    assert doc["format"] == report.FORMAT and doc["note"] == "a test's run"
    assert doc["params"]["n"] == 20 and doc["params"]["repeats"] == 2
    assert doc["machine"]["versions"]["celeriac"] and doc["machine"]["cpu_count"]
    assert re.fullmatch(r"[0-9a-f]{40}", doc["machine"]["git_commit"])
    assert isinstance(doc["machine"]["git_dirty"], bool)
    assert len(doc["runs"]) == 2 * 3 and all(rec["ok"] for rec in doc["runs"])

    shown = _bench("--report", str(out), "--no-chart", timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.rstrip("\n").split("\n")
    head = report.summary_lines(doc)
    assert lines[: len(head)] == head
    tables = "\n".join(lines[len(head) :])
    assert re.search(r"^SQLite +enqueue +tasks/s", tables, re.MULTILINE)
    assert re.search(r"^SQLite +roundtrip +p50 ms", tables, re.MULTILINE)
    assert "NOT A RESULT TO PUBLISH: 2 repeat(s)" in tables
    # Exactly the lines the run printed after its measurements.
    assert "\n" + tables + "\n\nraw results:" in ran.stdout
    assert not list(tmp_path.glob("*.png"))


def test_report_draws_the_chart_where_told(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "chart.png"
    assert run.main(["--report", str(README_RUN), "--chart", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    assert text.count(README_MARK) == 1, "the README's results block has lost its marker"
    after = text.split(README_MARK, 1)[1]
    match = re.match(r"\s*```text\n(.*?)\n```\n", after, re.DOTALL)
    assert match, "the marker is not followed by a ```text block"
    return match.group(1)


def test_readme_results_are_the_committed_run_rendered() -> None:
    doc = report.load(README_RUN)
    assert _readme_block() == "\n".join(report.render(doc, str(README_RUN)))


def test_committed_run_says_it_is_not_the_quiet_machine_run() -> None:
    doc = report.load(README_RUN)
    assert "quiet-machine default run is still to come" in doc["note"]
    assert "a quiet-machine default run is still to come" in (ROOT / "README.md").read_text()


# -- broken files ----------------------------------------------------------------------------


def _good() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(README_RUN.read_text())
    return doc


def _without(key: str) -> dict[str, Any]:
    doc = _good()
    del doc[key]
    return doc


def _run_without(key: str) -> dict[str, Any]:
    doc = _good()
    del doc["runs"][0][key]
    return doc


def _ceiling_without_rate() -> dict[str, Any]:
    doc = _good()
    doc["runs"].append({"broker": "amqp", "scenario": "ceiling", "shape": "lapin",
                        "peer": "bare", "ok": True, "window": 4, "seconds": 1.0})  # fmt: skip
    return doc


def _metric_not_a_number() -> dict[str, Any]:
    doc = _good()
    rec = next(r for r in doc["runs"] if r["ok"] and r["scenario"] == "enqueue")
    rec["rate"] = "fast"
    return doc


BROKEN: dict[str, tuple[Any, str]] = {
    "empty": (b"", "is not JSON"),
    "truncated": (README_RUN.read_bytes()[:500], "is not JSON"),
    "binary": (b"\xff\xfe\x00garbage", "cannot read"),
    "a list": ([1, 2], "is not a benchmark results file"),
    "older format": (_without("format"), "written by an older version of the benchmark"),
    "newer format": ({**_good(), "format": report.FORMAT + 1}, f"reads format {report.FORMAT}"),
    "no runs": (_without("runs"), "'runs' is missing"),
    "no machine": (_without("machine"), "'machine' is missing"),
    "runs not a list": ({**_good(), "runs": {}}, "'runs' is missing or not a list"),
    "run without broker": (_run_without("broker"), "run record 0 has no 'broker'"),
    "run of no broker": (
        {**_good(), "runs": [{**_good()["runs"][0], "broker": "kafka"}]},
        "unknown broker 'kafka'",
    ),
    "ceiling without its rate": (_ceiling_without_rate(), "lacks what the table needs"),
    "metric not a number": (_metric_not_a_number(), "lacks what the table needs"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_results_file_is_a_clear_error(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, message = BROKEN[case]
    path = tmp_path / "bench-broken.json"
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    path.write_bytes(data)
    assert run.main(["--report", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()  # one line, no traceback
    assert line.startswith("python -m benches --report: ") and message in line
    assert str(path) in line
    assert path.read_bytes() == data  # nothing lost
    assert list(tmp_path.iterdir()) == [path]  # no chart of it


def test_missing_results_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(["--report", str(tmp_path / "nowhere.json")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot read" in line and "nowhere.json" in line


def test_report_needs_no_server() -> None:
    """``--report`` measures nothing: it does not connect to Redis (here: a closed port)."""
    shown = _bench("--report", str(README_RUN), "--no-chart", "--redis-url",
                   "redis://127.0.0.1:9/0", timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.rstrip("\n").split("\n") == report.render(report.load(README_RUN))
