"""The benchmark's ceiling (issue 18 point 4): bare clients with the drain's window bound
celeriac's one-process drain; the report gives celeriac's share of the fastest of them and
flags a share above 100 % (the bound is then wrong). Plan and report: no broker; the pika
client: against the real RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benches import plan, report, run  # noqa: E402
from benches.peers import PEERS  # noqa: E402


def test_ceiling_runs_every_repeat_right_after_the_drain_it_bounds() -> None:
    # CI's smoke run: --extra-repeats 0 keeps the ceiling cells (it drops io, cpu...).
    args = run.parse_args(["--repeats", "2", "--extra-repeats", "0"])
    jobs = plan.plan(args, list(PEERS), ["redis", "amqp"])
    for broker, clients in (("redis", ["redis-rs + Lua script", "redis-benchmark"]),
                            ("amqp", ["lapin", "pika"])):  # fmt: skip
        for rep in (0, 1):
            mine = [j for j in jobs if (j.broker, j.repeat) == (broker, rep)]
            ceiling = [j.shape for j in mine if j.scenario == "ceiling"]
            assert ceiling == clients, (broker, rep)
            at = next(i for i, j in enumerate(mine) if j.scenario == "ceiling")
            drains = [j for j in mine[:at] if j.scenario == "drain"]
            assert drains and all(j.shape == "1 process" for j in drains)
    # Their queue is filled by celeriac's client: celeriac's messages, its durability.
    assert {j.client_peer for j in jobs if j.scenario == "ceiling"
            and j.shape != plan.REDIS_BENCHMARK} == {"celeriac"}  # fmt: skip


def test_no_ceiling_without_celeriac() -> None:
    jobs = plan.plan(run.parse_args([]), ["celery", "huey"], ["redis", "amqp"])
    assert not [j for j in jobs if j.scenario == "ceiling"]


def _drain(broker: str, rate: float) -> dict[str, Any]:
    return {"ok": True, "broker": broker, "scenario": "drain", "shape": "1 process",
            "peer": "celeriac", "rate": rate, "seconds": 1.0}  # fmt: skip


def _bare(broker: str, client: str, rate: float) -> dict[str, Any]:
    return {"ok": True, "broker": broker, "scenario": "ceiling", "shape": client,
            "peer": plan.BARE, "rate": rate, "window": 4, "consumed": 12, "seconds": 1.0,
            "settings": f"{client}: bare"}  # fmt: skip


def _lines(results: list[dict[str, Any]]) -> list[str]:
    return report.table_block(report.summarize(results), results)


def test_share_of_the_fastest_bare_client() -> None:
    results = [
        _drain("amqp", 3000.0), _bare("amqp", "lapin", 5000.0), _bare("amqp", "lapin", 6000.0),
        _bare("amqp", "lapin", 7000.0), _bare("amqp", "pika", 2000.0),
    ]  # fmt: skip
    (entry,) = report.ceiling_summary(report.summarize(results), results)
    assert entry["clients"] == {"lapin": 6000.0, "pika": 2000.0}
    assert (entry["bound_client"], entry["bound_rate"]) == ("lapin", 6000.0)
    assert entry["drain_pct"] == pytest.approx(50.0) and entry["over_bound"] is False
    lines = _lines(results)
    assert (
        "RabbitMQ ceiling: a bare client drains with the drain's window (4), one ack per "
        "message, no celeriac code: lapin 6,000 [5,000-7,000], pika 2,000 tasks/s"
    ) in lines
    assert "  celeriac's drain 1 process: 3,000 tasks/s = 50 % of the bound (lapin)" in lines
    assert not [line for line in lines if "NOT A RESULT" in line or "DOES NOT BOUND" in line]


def test_a_drain_faster_than_the_bound_is_flagged() -> None:
    results = [_drain("redis", 9000.0), _bare("redis", "redis-rs + Lua script", 6000.0)]
    lines = _lines(results)
    assert "  celeriac's drain 1 process: 9,000 tasks/s = 150 % of the bound" in "\n".join(lines)
    assert any("THE REDIS CEILING DOES NOT BOUND" in line for line in lines)
    assert (
        "NOT A RESULT TO PUBLISH: celeriac drained faster than the Redis ceiling: it does not bound"
    ) in lines


def test_redis_benchmark_is_shown_beside_the_bound_not_as_it() -> None:
    bench = {"ok": True, "broker": "redis", "scenario": "ceiling", "shape": "redis-benchmark",
             "peer": plan.BARE, "rate": 50000.0, "lpush_rate": 40000.0,
             "lpop_rate": 50000.0}  # fmt: skip
    results = [_drain("redis", 9000.0), _bare("redis", "redis-rs + Lua script", 20000.0), bench]
    (entry,) = report.ceiling_summary(report.summarize(results), results)
    assert entry["bound_rate"] == 20000.0 and entry["drain_pct"] == pytest.approx(45.0)
    assert (
        "  redis-benchmark -c 1 -P 1 (one command per round trip; a reference, not the same "
        "work): LPUSH 40,000/s, LPOP 50,000/s"
    ) in _lines(results)


def test_the_old_ceiling_is_not_read_as_a_bound(tmp_path: Path) -> None:
    """A file of the former method (celeriac's own consumer as the "pure Rust" ceiling)."""
    doc = json.loads((ROOT / "benches" / "results" / "README-run.json").read_text())
    doc["runs"].append({"broker": "redis", "scenario": "ceiling", "shape": "pure Rust",
                        "peer": "celeriac", "ok": True, "drain_rate": 1.0,
                        "enqueue_rate": 1.0, "prefetch": 4})  # fmt: skip
    with pytest.raises(report.ReportError, match="unknown ceiling client 'pure Rust'"):
        report.render(doc)


# -- the pika client, against the real RabbitMQ --------------------------------------------


AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _pika(queue: str, n: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benches.bare_pika", "--url", AMQP_URL, "--queue", queue,
         "-n", str(n), *extra], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


@pytest.fixture
def filled_queue() -> Any:
    """A durable queue of its own holding 5 persistent messages; deleted after."""
    pika = pytest.importorskip("pika")
    from benches.bare_pika import pika_url

    queue = f"test_bare_pika_{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(pika_url(AMQP_URL)))
    channel = conn.channel()
    channel.queue_declare(queue, durable=True)
    for i in range(5):
        channel.basic_publish("", queue, str(i).encode(),
                              pika.BasicProperties(delivery_mode=2))  # fmt: skip
    yield channel, queue
    channel.queue_delete(queue)
    conn.close()


def test_bare_pika_consumes_and_acks_all(filled_queue: Any) -> None:
    channel, queue = filled_queue
    done = _pika(queue, 5)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out["client"], out["consumed"], out["window"]) == ("pika", 5, 4)
    assert out["seconds"] > 0
    # Every message acked: none left, none waiting for redelivery.
    assert channel.queue_declare(queue, passive=True).method.message_count == 0


def test_bare_pika_on_a_short_queue_fails_clearly(filled_queue: Any) -> None:
    _channel, queue = filled_queue
    done = _pika(queue, 6, "--idle", "0.5")
    assert done.returncode != 0
    assert "bare_pika: the queue ran dry after 5 of 6" in done.stderr
    bad = _pika(queue, 0)
    assert bad.returncode == 2 and "need -n >= 1" in bad.stderr and "Traceback" not in bad.stderr
