"""What a run shows: one printed line per row (``print_row``) and the result files,
``STEM.json`` (everything) and ``STEM.md`` (the table and its notes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.harness import Row
from bench.machine import machine_line


def fmt_num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "%":
        return f"{x * 100:.2f} %"
    if abs(x) >= 1000:
        s = f"{x:,.0f}"
    elif abs(x) >= 100:
        s = f"{x:.1f}"
    elif abs(x) >= 1:
        s = f"{x:.2f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip()


def fmt_goal(row: Row) -> str:
    if not row.goal:
        return "-"
    op, number = row.goal.split()
    op = {">=": "≥", "<=": "≤"}[op]
    if row.goal_on == "ratio":
        return f"{op} {float(number):g}x"
    if row.unit == "%":
        return f"{op} {float(number) * 100:g} %"
    return f"{op} {float(number):g} {row.unit}".strip()


def fmt_met(row: Row) -> str:
    if row.error:
        return "ERROR"
    if row.met is None:
        return "-"
    return "yes" if row.met else "NO"


COLUMNS = (
    "case",
    "metric",
    "ours",
    "baseline",
    "baseline value",
    "ratio",
    "goal",
    "met",
    "peak MB",
)


def row_cells(row: Row, peak_mb: float | None) -> list[str]:
    if row.error:
        return [
            row.case,
            row.metric,
            "no figure",
            row.baseline or "-",
            fmt_num(row.baseline_value, row.unit),
            "-",
            fmt_goal(row),
            "ERROR",
            fmt_num(peak_mb),
        ]
    return [
        row.case,
        row.metric,
        fmt_num(row.value, row.unit),
        row.baseline or "-",
        fmt_num(row.baseline_value, row.unit),
        "-" if row.ratio is None else f"{row.ratio:.2f}x",
        fmt_goal(row),
        fmt_met(row),
        fmt_num(peak_mb),
    ]


def print_row(row: Row, peak_mb: float | None = None) -> None:
    cells = row_cells(row, peak_mb)
    print(
        f"{cells[0]:<8} {cells[1]:<44} {cells[2]:>16}  vs {cells[3]:<34} {cells[4]:>14}  "
        f"ratio {cells[5]:>7}  goal {cells[6]:<9} met {cells[7]}",
        flush=True,
    )
    if row.error:
        print(f"         error: {row.error}", flush=True)
    elif row.note:
        print(f"         ({row.note})", flush=True)


def write_results(out_dir: Path, payload: dict[str, Any], stem: str = "latest") -> list[Path]:
    """``STEM.json`` (everything) and ``STEM.md`` (the table + notes) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(payload))
    return [js, md]


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"# omniforge benchmarks ({'quick' if payload.get('quick') else 'full'} run)",
        "",
        f"- date: {m['date']}",
        f"- machine: {machine_line(m)}",
        f"- command: `{payload.get('command')}`; {payload.get('repeats')} timed repeat(s) "
        f"after {payload.get('warmup')} warm-up, median shown; total {payload['elapsed_s']:.0f} s",
        "- ratio: ours relative to the baseline measured in the same run (throughput: ours / "
        "baseline; overhead: ours / baseline time); goals are printed, never enforced",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    notes = []
    for name, case in payload["cases"].items():
        for r in case["rows"]:
            row = Row(**r)
            cells = row_cells(row, case.get("peak_mb"))
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            if row.error:
                notes.append(f"- **{name} / {row.metric}**: no figure: {row.error}")
            elif row.note:
                notes.append(f"- {name} / {row.metric}: {row.note}")
    lines += ["", "Notes:", "", *notes, ""]
    lines.append(
        "Peak MB: summed PSS of the case's process tree (Ray workers, Pool children, "
        "subprocesses), sampled every 0.25 s; see `peak_mb` / `self_max_rss_mb` in the JSON."
    )
    return "\n".join(lines) + "\n"
