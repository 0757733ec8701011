"""The run's summary: medians per cell, ratios, the terminal table and the PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benches.peers import PEERS

# scenario -> [(metric key, label, higher is better, shown in the chart)]
METRICS: dict[str, list[tuple[str, str, bool, bool]]] = {
    "enqueue": [("rate", "tasks/s", True, True)],
    "drain": [
        ("rate", "tasks/s after start-up", True, True),
        ("seconds", "s incl. start-up", False, False),
    ],
    "io": [
        ("run_seconds", "s after start-up", False, True),
        ("seconds", "s incl. start-up", False, False),
    ],
    "roundtrip": [
        ("p50_ms", "p50 ms", False, True),
        ("p99_ms", "p99 ms", False, False),
    ],
    "memory": [
        ("idle_pss_mb", "PSS MB idle", False, True),
        ("after_pss_mb", "PSS MB after n", False, False),
        ("max_process_pss_mb", "max PSS MB/process", False, False),
    ],
}
BROKER_NAMES = {"redis": "Redis", "amqp": "RabbitMQ", "sqlite": "SQLite"}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (broker, scenario, shape, metric): the median of each peer's repeats,
    celeriac's ratio to Celery and to the best other peer (> 1: celeriac is better)."""
    cells: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}
    for rec in results:
        if rec["ok"]:
            cell = (rec["broker"], rec["scenario"], rec["shape"])
            cells.setdefault(cell, {}).setdefault(rec["peer"], []).append(rec)
    rows = []
    for (broker, scenario, shape), by_peer in cells.items():
        for key, label, higher, chart in METRICS[scenario]:
            values = {
                peer: statistics.median(r[key] for r in recs) for peer, recs in by_peer.items()
            }
            settings = {peer: recs[0].get("settings", "") for peer, recs in by_peer.items()}
            row: dict[str, Any] = {
                "broker": broker, "scenario": scenario, "shape": shape, "metric": key,
                "label": label, "higher_is_better": higher, "chart": chart,
                "values": values, "settings": settings,
                "repeats": {peer: len(recs) for peer, recs in by_peer.items()},
            }  # fmt: skip
            me = values.get("celeriac")
            row["vs_celery"] = _ratio(me, values.get("celery"), higher)
            others = {p: v for p, v in values.items() if p != "celeriac"}
            if others:
                best = (max if higher else min)(others, key=lambda p: others[p])
                row["best_peer"] = best
                row["vs_best"] = _ratio(me, others[best], higher)
            else:
                row["best_peer"], row["vs_best"] = None, None
            rows.append(row)
    return rows


def _ratio(me: float | None, other: float | None, higher: bool) -> float | None:
    if not me or not other:
        return None
    return me / other if higher else other / me


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The table, as the terminal shows it (and the README quotes it)."""
    peers = [p for p in PEERS if any(p in r["values"] for r in rows)]
    header = ["broker", "scenario", "metric", *peers, "x Celery", "x best peer"]
    body = []
    for r in rows:
        scen = r["scenario"] + (f" {r['shape']}" if r["shape"] else "")
        best = f"{r['vs_best']:.2f}x {r['best_peer']}" if r["vs_best"] else "-"
        body.append([
            BROKER_NAMES[r["broker"]], scen, r["label"],
            *(_fmt(r["values"].get(p)) for p in peers),
            f"{r['vs_celery']:.2f}x" if r["vs_celery"] else "-", best,
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *body]):
        cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in
                 enumerate(zip(row, widths, strict=True))]  # fmt: skip
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def print_table(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    print()
    print("\n".join(table_lines(rows)))
    print(
        "\nx Celery, x best peer: how many times better celeriac is (> 1: better; throughput"
        " divided, or time/latency/memory inverted); best peer = the best of the others,"
        " Celery included. Medians of the repeats."
    )
    print("\nhow each ran:")
    seen: set[str] = set()
    for rec in results:
        s = rec.get("settings")
        if s and s not in seen:
            seen.add(s)
            print(f"  {rec['peer']:<9} {s}")


def write_chart(rows: list[dict[str, Any]], path: Path, facts: dict[str, Any]) -> str | None:
    """A grid of bar charts, one per cell's main metric; None, or why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); pip install -e .[bench]"
    shown = [r for r in rows if r["chart"]]
    if not shown:
        return "nothing to draw"
    cols = 4
    nrows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, shown, strict=False):
        peers = [p for p in PEERS if p in row["values"]]
        vals = [row["values"][p] for p in peers]
        colors = ["#d9534f" if p == "celeriac" else "#5b7db1" for p in peers]
        ax.bar(peers, vals, color=colors)
        scen = row["scenario"] + (f" {row['shape']}" if row["shape"] else "")
        ratio = f"  ({row['vs_celery']:.1f}x Celery)" if row["vs_celery"] else ""
        ax.set_title(f"{BROKER_NAMES[row['broker']]}: {scen}{ratio}", fontsize=9)
        arrow = "higher is better" if row["higher_is_better"] else "lower is better"
        ax.set_ylabel(f"{row['label']}\n({arrow})", fontsize=8)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(
        f"celeriac vs Celery and pure-Python queues - {facts['cpu_count']} cores, "
        f"Python {facts['python']}, Redis {facts['redis_server']}, "
        f"RabbitMQ {facts.get('rabbitmq_server')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
