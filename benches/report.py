"""The run's summary: medians per cell, ratios, the terminal table and the PNG chart; and
the results JSON they are rendered from again (``python -m benches --report FILE``)."""

from __future__ import annotations

import json
import shlex
import statistics
import textwrap
import time
from pathlib import Path
from typing import Any

from benches.peers import DISTRIBUTIONS, PEERS
from benches.plan import CEILING_CLIENTS, REDIS_BENCHMARK, TUNED

# scenario -> [(metric key, label, higher is better, shown in the chart)]
METRICS: dict[str, list[tuple[str, str, bool, bool]]] = {
    "enqueue": [("rate", "tasks/s", True, True)],
    "drain": [
        ("rate", "tasks/s after start-up", True, True),
        ("seconds", "s incl. start-up", False, False),
    ],
    "io": [
        ("run_seconds", "s, workers ready", False, True),
        ("startup_seconds", "s to start", False, False),
    ],
    "cpu": [
        ("run_seconds", "s after start-up", False, True),
        ("seconds", "s incl. start-up", False, False),
    ],
    "roundtrip": [
        ("p50_ms", "p50 ms", False, True),
        ("p90_ms", "p90 ms", False, False),
        ("p99_ms", "p99 ms", False, False),
    ],
    "mixed": [
        ("rate", "tasks/s after start-up", True, True),
        ("p50_ms", "p50 ms", False, True),
        ("p90_ms", "p90 ms", False, False),
        ("p99_ms", "p99 ms", False, False),
    ],
    "serializer": [("rate", "tasks/s", True, False)],
    "memory": [
        ("idle_pss_mb", "PSS MB idle", False, True),
        ("after_pss_mb", "PSS MB after n", False, False),
        ("max_process_pss_mb", "max PSS MB/process", False, False),
    ],
    "soak": [
        ("baseline_own_pss_mb", "own PSS MB after warm-up", False, False),
        ("final_own_pss_mb", "own PSS MB after n", False, False),
        ("drift_pct", "own PSS drift % after warm-up", False, False),
        ("baseline_pss_mb", "PSS MB after warm-up", False, False),
        ("final_pss_mb", "PSS MB after n", False, False),
        ("rate", "tasks/s", True, False),
    ],
}
BROKER_NAMES = {"redis": "Redis", "amqp": "RabbitMQ", "sqlite": "SQLite"}
#: a cell whose repeats spread wider than this share of their median is marked
SPREAD_LIMIT = 0.25
#: the method's minimum for a published run: repeats of every main cell, and the drain's n
MIN_REPEATS, MIN_DRAIN_N = 3, 20_000


def spread(values: list[float]) -> float:
    """(max - min) / median of a cell's repeats: 0 for one repeat."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def method_notes(params: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """What keeps a run from being a result to publish: too few repeats or tasks, or a
    machine that was busy when it started."""
    notes = []
    if params.get("repeats", 0) < MIN_REPEATS:
        notes.append(f"{params.get('repeats')} repeat(s): the method needs {MIN_REPEATS}")
    if params.get("n", 0) < MIN_DRAIN_N:
        notes.append(f"n = {params.get('n'):,}: the method needs {MIN_DRAIN_N:,} for the drain")
    quiet = facts.get("quiet_at_start")
    if quiet is False:
        notes.append(
            f"the CPUs were {facts.get('busy_at_start', 0):.0%} busy when it started "
            f"(waited {facts.get('waited_for_quiet_seconds', 0):.0f} s)"
        )
    elif quiet is None:
        notes.append("the machine's load at the start was not checked")
    return notes


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (broker, scenario, shape, metric): the median of each peer's repeats,
    celeriac's ratio to Celery and to the best other peer (> 1: celeriac is better)."""
    cells: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}
    for rec in results:
        if rec["ok"] and rec["scenario"] in METRICS:
            cell = (rec["broker"], rec["scenario"], rec["shape"])
            cells.setdefault(cell, {}).setdefault(rec["peer"], []).append(rec)
    rows = []
    for (broker, scenario, shape), by_peer in cells.items():
        for key, label, higher, chart in METRICS[scenario]:
            if not all(key in r for recs in by_peer.values() for r in recs):
                continue  # a metric of another shape of the scenario
            samples = {peer: [float(r[key]) for r in recs] for peer, recs in by_peer.items()}
            values = {peer: statistics.median(v) for peer, v in samples.items()}
            settings = {peer: recs[0].get("settings", "") for peer, recs in by_peer.items()}
            row: dict[str, Any] = {
                "broker": broker, "scenario": scenario, "shape": shape, "metric": key,
                "label": label, "higher_is_better": higher, "chart": chart,
                "values": values, "settings": settings,
                "repeats": {peer: len(recs) for peer, recs in by_peer.items()},
                "ranges": {peer: [min(v), max(v)] for peer, v in samples.items()},
                "spread": {peer: spread(v) for peer, v in samples.items()},
            }  # fmt: skip
            row["wide"] = [p for p, x in row["spread"].items() if x > SPREAD_LIMIT]
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
    # Per broker, each scenario's rows together, the tuned ones below the defaults.
    brokers = list(BROKER_NAMES)
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    rows.sort(key=lambda r: (brokers.index(r["broker"]), scenarios.index(r["scenario"]),
                             TUNED in r["shape"]))  # fmt: skip
    return rows


def serializer_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """celeriac's msgpack rate over its JSON rate, per broker and step, from the
    ``serializer`` scenario's rows (> 1: msgpack is faster)."""
    rates = {
        (r["broker"], r["shape"]): r["values"].get("celeriac")
        for r in rows
        if r["scenario"] == "serializer" and r["metric"] == "rate"
    }
    lines = []
    for broker in BROKER_NAMES:
        for step in ("enqueue", "drain"):
            json_rate = rates.get((broker, f"{step}, json"))
            msgpack_rate = rates.get((broker, f"{step}, msgpack"))
            if json_rate and msgpack_rate:
                lines.append(
                    f"{BROKER_NAMES[broker]} {step}: msgpack {msgpack_rate:,.0f} tasks/s, "
                    f"JSON {json_rate:,.0f} tasks/s, msgpack/JSON {msgpack_rate / json_rate:.2f}x"
                )
    return lines


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


#: cells that compare against something other than what the name suggests: marked in the
#: table with their mark, explained below it
CAVEATS = {
    ("sqlite", "celery"): (
        "+",
        "Celery on SQLite is kombu's sqla+sqlite:// transport (SQLAlchemy), which polls the"
        " table once a second: its figures, and x Celery on SQLite, measure that poll. Huey's"
        " SqliteHuey is the real peer of celeriac's embedded SQLite broker (x best peer).",
    ),
}


def caveat_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The explanation of every caveat mark the table shows."""
    used = {(r["broker"], p) for r in rows for p in r["values"]}
    return [f"{mark} {text}" for key, (mark, text) in CAVEATS.items() if key in used]


def cell(row: dict[str, Any], peer: str) -> str:
    """A peer's figure in a row: the median, [min-max] over two or more repeats, and a
    ``*`` when the repeats spread wider than ``SPREAD_LIMIT``."""
    if peer not in row["values"]:
        return "-"
    text = _fmt(row["values"][peer])
    low, high = row.get("ranges", {}).get(peer, (None, None))
    if row.get("repeats", {}).get(peer, 1) > 1 and low is not None:
        text += f" [{_fmt(low)}-{_fmt(high)}]"
    text += "*" if peer in row.get("wide", ()) else ""
    return text + CAVEATS.get((row["broker"], peer), ("",))[0]


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The table, as the terminal shows it (and the README quotes it)."""
    peers = [p for p in PEERS if any(p in r["values"] for r in rows)]
    header = ["broker", "scenario", "metric", *peers, "x Celery", "x best peer"]
    body = []
    for r in rows:
        scen = r["scenario"] + (f" {r['shape']}" if r["shape"] else "")
        best = f"{r['vs_best']:.2f}x {r['best_peer']}" if r["vs_best"] else "-"
        body.append([
            BROKER_NAMES[r["broker"]], scen, r["label"], *(cell(r, p) for p in peers),
            f"{r['vs_celery']:.2f}x" + CAVEATS.get((r["broker"], "celery"), ("",))[0]
            if r["vs_celery"] else "-",
            best,
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


def ceiling_summary(
    rows: list[dict[str, Any]], results: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per broker: each bare client's drain rate (median, range), the bound (the fastest
    of them), celeriac's one-process drain as a share of it (``over_bound``: above 100 %,
    so the bound is wrong), and redis-benchmark's figures beside them."""
    out = []
    for broker in BROKER_NAMES:
        recs = [r for r in results if r["ok"] and r["broker"] == broker
                and r["scenario"] == "ceiling"]  # fmt: skip
        if not recs:
            continue
        known = (*CEILING_CLIENTS.get(broker, ()), REDIS_BENCHMARK)
        for rec in recs:
            if rec["shape"] not in known:
                raise ValueError(f"unknown ceiling client {rec['shape']!r} on {broker}")
        entry: dict[str, Any] = {"broker": broker, "clients": {}, "ranges": {}}
        for client in CEILING_CLIENTS.get(broker, ()):
            rates = [float(r["rate"]) for r in recs if r["shape"] == client]
            if rates:
                entry["clients"][client] = statistics.median(rates)
                entry["ranges"][client] = [min(rates), max(rates)]
                entry["window"] = next(r["window"] for r in recs if r["shape"] == client)
        if entry["clients"]:
            bound = max(entry["clients"], key=lambda c: entry["clients"][c])
            entry.update(bound_client=bound, bound_rate=entry["clients"][bound])
            drain = next((r["values"].get("celeriac") for r in rows if r["broker"] == broker
                          and r["scenario"] == "drain" and r["shape"] == "1 process"
                          and r["metric"] == "rate"), None)  # fmt: skip
            if drain:
                entry.update(drain_rate=drain, drain_pct=100 * drain / entry["bound_rate"])
                entry["over_bound"] = entry["drain_pct"] > 100
        bench = [r for r in recs if r["shape"] == REDIS_BENCHMARK]
        for key in ("lpush_rate", "lpop_rate"):
            if bench:
                entry["redis_benchmark_" + key] = statistics.median(float(r[key]) for r in bench)
        out.append(entry)
    return out


def ceiling_lines(ceilings: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in ceilings:
        name = BROKER_NAMES[c["broker"]]
        if c["clients"]:
            figures = ", ".join(
                f"{client} {_fmt(rate)}"
                + (" [{}-{}]".format(*map(_fmt, c["ranges"][client]))
                   if c["ranges"][client][0] != c["ranges"][client][1] else "")
                for client, rate in c["clients"].items()
            )  # fmt: skip
            lines.append(
                f"{name} ceiling: a bare client drains with the drain's window "
                f"({c['window']}), one ack per message, no celeriac code: {figures} tasks/s"
            )
        if "drain_pct" in c:
            lines.append(
                f"  celeriac's drain 1 process: {_fmt(c['drain_rate'])} tasks/s = "
                f"{c['drain_pct']:.0f} % of the bound ({c['bound_client']})"
            )
            if c["over_bound"]:
                lines.append(
                    f"  THE {name.upper()} CEILING DOES NOT BOUND: celeriac drained faster than"
                    " the bare client doing the same broker work; the bound is wrong"
                )
        if "redis_benchmark_lpop_rate" in c:
            lines.append(
                f"  redis-benchmark -c 1 -P 1 (one command per round trip; a reference, not "
                f"the same work): LPUSH {_fmt(c.get('redis_benchmark_lpush_rate'))}/s, "
                f"LPOP {_fmt(c['redis_benchmark_lpop_rate'])}/s"
            )
    return lines


LEGEND = (
    "x Celery, x best peer: how many times better celeriac is (> 1: better; throughput"
    " divided, or time/latency/memory inverted); best peer = the best of the others,"
    " Celery included. Medians of the repeats, [min-max] beside them; * marks a cell"
    f" whose repeats spread wider than {SPREAD_LIMIT:.0%} of its median."
)


def table_block(
    rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
    notes: list[str] | None = None,
) -> list[str]:
    """Everything a run prints after its measurements: the method's warnings, the table,
    its caveats, the ceilings, the legend, how each peer ran and the serializer ratios.
    ``python -m benches --report`` prints the same lines from the results JSON."""
    ceilings = ceiling_summary(rows, results)
    notes = [*(notes or []), *(
        f"celeriac drained faster than the {BROKER_NAMES[c['broker']]} ceiling: it does not"
        " bound" for c in ceilings if c.get("over_bound"))]  # fmt: skip
    lines = [""]
    lines += [f"NOT A RESULT TO PUBLISH: {note}" for note in notes]
    lines += table_lines(rows)
    lines += caveat_lines(rows)
    if ceilings:
        lines += ["", *ceiling_lines(ceilings)]
    lines += ["", *textwrap.wrap(LEGEND, width=100)]
    lines += ["", "how each ran:"]
    seen: set[str] = set()
    for rec in results:
        s = rec.get("settings")
        if s and s not in seen:
            seen.add(s)
            name = "ceiling" if rec["scenario"] == "ceiling" else rec["peer"]
            lines.append(f"  {name:<9} {s}")
    ratios = serializer_ratios(rows)
    if ratios:
        lines += ["", *ratios]
    return lines


def write_chart(
    rows: list[dict[str, Any]],
    path: Path,
    facts: dict[str, Any],
    ceilings: list[dict[str, Any]] | None = None,
) -> str | None:
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
        ceiling = next((c for c in ceilings or [] if c["broker"] == row["broker"]), None)
        if (ceiling and "bound_rate" in ceiling and row["metric"] == "rate"
                and (row["scenario"], row["shape"]) == ("drain", "1 process")):  # fmt: skip
            ax.axhline(ceiling["bound_rate"], color="#444", linestyle="--", linewidth=1)
            ax.text(0, ceiling["bound_rate"], f" ceiling ({ceiling['bound_client']})",
                    fontsize=7, va="bottom")  # fmt: skip
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


# -- the results file ------------------------------------------------------------------------

#: the results JSON's format. ``--report`` renders this one only: bump it when what the
#: rendering needs from the file changes. (Files written before the field existed have none.)
FORMAT = 2
#: what a results file must hold, and the type of each
FILE_FIELDS: dict[str, type] = {
    "format": int, "command": str, "started": float, "duration_seconds": float,
    "params": dict, "peers": list, "brokers": list, "skipped": dict, "machine": dict,
    "runs": list,
}  # fmt: skip
#: what every run record must hold, and the type of each
RUN_FIELDS: dict[str, type] = {"broker": str, "scenario": str, "shape": str, "peer": str,
                               "ok": bool}  # fmt: skip


class ReportError(Exception):
    """A results file that cannot be rendered: unreadable, not JSON, another format, or
    missing what the tables need."""


def machine_lines(facts: dict[str, Any], peers: list[str]) -> list[str]:
    """The machine and the versions, as a run prints them before it measures."""
    v = facts.get("versions") or {}
    return [
        f"{facts.get('cpu_count')} cores ({facts.get('cpu_model')}), Python "
        f"{facts.get('python')}, Redis {facts.get('redis_server')}, RabbitMQ "
        f"{facts.get('rabbitmq_server')}, SQLite {facts.get('sqlite')}",
        ", ".join(f"{p} {v.get(DISTRIBUTIONS.get(p, p))}" for p in peers),
    ]


def check(doc: Any, source: str) -> dict[str, Any]:
    """``doc`` if it is a results file of this ``FORMAT`` with every field the rendering
    reads; else a ``ReportError`` naming ``source`` and what is wrong."""
    if not isinstance(doc, dict) or ("runs" not in doc and "format" not in doc):
        raise ReportError(f"{source} is not a benchmark results file (no runs, no format)")
    if "format" not in doc:
        raise ReportError(
            f"{source} was written by an older version of the benchmark (it has no format "
            f"field; this one reads format {FORMAT}): run `python -m benches` again"
        )
    if doc["format"] != FORMAT:
        raise ReportError(
            f"{source} is in format {doc['format']!r}; this benchmark reads format {FORMAT}"
        )
    for key, kind in FILE_FIELDS.items():
        value = doc.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind):
            raise ReportError(f"{source}: the field {key!r} is missing or not a {kind.__name__}")
    for i, rec in enumerate(doc["runs"]):
        if not isinstance(rec, dict):
            raise ReportError(f"{source}: run record {i} is not an object")
        for key, kind in RUN_FIELDS.items():
            if not isinstance(rec.get(key), kind):
                raise ReportError(
                    f"{source}: run record {i} has no {key!r} (or it is not a {kind.__name__})"
                )
        if rec["broker"] not in BROKER_NAMES:
            raise ReportError(f"{source}: run record {i} names an unknown broker {rec['broker']!r}")
    return doc


def load(path: Path) -> dict[str, Any]:
    """A results file, checked (``check``); ``ReportError`` if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ReportError(f"{path} is not JSON ({exc})") from exc
    return check(doc, str(path))


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """Where a results file comes from: the command, when, how long, the code's commit,
    the machine, the versions and the file's note."""
    facts = doc["machine"]
    commit = facts.get("git_commit")
    code = f"git {commit[:10]}" if isinstance(commit, str) else "git commit unknown"
    if facts.get("git_dirty"):
        code += " with uncommitted changes"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(doc["started"]))
    command, note = doc["command"], str(doc.get("note") or "")
    if note:  # shown once, below
        for shown in (shlex.quote(note), note):
            command = command.replace(f"--note {shown}", "--note (below)")
    lines = [
        *textwrap.wrap(command, width=100, subsequent_indent="    ", break_on_hyphens=False),
        f"  on {when}, {doc['duration_seconds'] / 60:.1f} min, {code}",
        *(f"  {line}" for line in machine_lines(facts, doc["peers"])),
    ]
    for what, why in doc["skipped"].items():
        lines.append(f"  skipped {what}: {why}")
    if note:
        lines += textwrap.wrap(note, width=100, initial_indent="  note: ",
                               subsequent_indent="        ", break_on_hyphens=False)  # fmt: skip
    return lines


def render(doc: dict[str, Any], source: str = "the results") -> list[str]:
    """The lines ``python -m benches --report`` prints for a checked results file: where it
    comes from (``summary_lines``), then exactly what the run printed after measuring."""
    try:
        rows = summarize(doc["runs"])
        tables = table_block(rows, doc["runs"], method_notes(doc["params"], doc["machine"]))
        return summary_lines(doc) + tables
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ReportError(f"{source}: a run record lacks what the table needs ({exc!r})") from exc
