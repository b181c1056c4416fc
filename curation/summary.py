"""The run summary of a curation run: numbers (``summarize``) and console tables
(``print_summary``).

- ``summarize`` turns the sample index of a run (plus what the driver knows: stages, shards,
  elapsed time) into a plain, JSON-ready dict; ``curation.report`` draws the HTML page and
  logs the MLflow run from it.
- ``print_summary`` prints that dict as rich tables at the end of a run.

Reasons are grouped by their tag, the text before the first ``:`` (``"decode_error: moov
atom not found"`` -> ``decode_error``). A row rejected for several reasons counts once under
each of its reasons, so per-reason counts can add up to more than the rejected rows.
Everything over rows is vectorised (pyarrow), so 100k-row indexes summarise in seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog.schema import SAMPLE_SCHEMA, STATUSES
from core.fmt import human_bytes

REASON_NOTE = (
    "reasons are grouped by tag (text before the first ':'); a row rejected or errored for "
    "several reasons counts once under each of them, so per-reason counts can add up to more "
    "than the rows"
)
UNSPECIFIED_REASON = "unspecified"

# --------------------------------------------------------------------------------------------
# summary


def reason_tag(reason: str | None) -> str:
    """``"decode_error: moov atom not found"`` -> ``"decode_error"`` (empty -> unspecified)."""
    tag = (reason or "").split(":", 1)[0].strip()
    return tag or UNSPECIFIED_REASON


def reason_pairs(index: pa.Table) -> pa.Table:
    """One row per (sample row, status, reason tag), each distinct tag of a row once.

    Columns: ``row`` (int64 position in ``index``), ``status``, ``tag``; ordered by row.
    """
    reasons = index_column(index, "reasons")
    if isinstance(reasons, pa.ChunkedArray):
        reasons = reasons.combine_chunks()
    if len(reasons) == 0 or pa.types.is_null(reasons.type):
        return pa.table(
            {
                "row": pa.array([], pa.int64()),
                "status": pa.array([], pa.string()),
                "tag": pa.array([], pa.string()),
            }
        )
    flat = pc.list_flatten(reasons)
    rows = pc.cast(pc.list_parent_indices(reasons), pa.int64())
    tags = pc.utf8_trim_whitespace(pc.list_element(pc.split_pattern(flat, ":", max_splits=1), 0))
    tags = pc.fill_null(tags, "")
    tags = pc.if_else(pc.equal(tags, ""), UNSPECIFIED_REASON, tags)
    status = pc.take(index_column(index, "status"), rows)
    pairs = pa.table({"row": rows, "status": status, "tag": tags})
    pairs = pairs.group_by(["row", "status", "tag"]).aggregate([])  # distinct
    return pairs.sort_by([("row", "ascending"), ("tag", "ascending")])


def _count_by_tag(pairs: pa.Table, status: str) -> dict[str, int]:
    sel = pairs.filter(pc.equal(pairs.column("status"), status))
    if sel.num_rows == 0:
        return {}
    counts = sel.group_by("tag").aggregate([("row", "count")])
    items = zip(
        counts.column("tag").to_pylist(), counts.column("row_count").to_pylist(), strict=True
    )
    return dict(sorted(items, key=lambda kv: (-kv[1], kv[0])))


def summarize(
    index: pa.Table,
    *,
    stages_run: Sequence[str],
    stages_skipped: Mapping[str, str],
    elapsed_s: float,
    shards: Iterable[Any],
    num_inputs: int,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The numbers of the end-of-run summary as a JSON-ready dict.

    ``samples`` = rows of the index = ``accepted + rejected + errors``; ``inputs`` is what
    the driver listed (a video input becomes several clip rows), ``inputs_in_index`` counts
    distinct ``parent_key`` (or ``key`` for uncut inputs). ``rejected_by_reason`` and
    ``errors_by_reason`` count rows per reason tag; a row with several reasons counts under
    each (see ``reason_counting``), ``multi_reason_rejected`` says how many such rows exist.
    ``run`` is what the engine measured (``inputs_this_run``, ``inputs_skipped``, ``blocks``,
    ``retries``, ``startup_s``, per stage ``stages`` = name -> [rows in, rows out, seconds]).
    """
    n = index.num_rows
    status = index_column(index, "status")
    by_status = {s: 0 for s in STATUSES}
    by_kind: dict[str, dict[str, int]] = {}
    if n:
        counts = (
            pa.table({"kind": pc.fill_null(index_column(index, "kind"), "?"), "status": status})
            .group_by(["kind", "status"])
            .aggregate([("status", "count")])
        )
        for kind, st, c in zip(
            counts.column("kind").to_pylist(),
            counts.column("status").to_pylist(),
            counts.column("status_count").to_pylist(),
            strict=True,
        ):
            by_status[st] = by_status.get(st, 0) + c
            row = by_kind.setdefault(kind, {s: 0 for s in STATUSES})
            row[st] = row.get(st, 0) + c
    kind = index_column(index, "kind")
    clips = int(
        pc.sum(
            pc.and_(
                pc.fill_null(pc.equal(kind, "video"), False),
                pc.is_valid(index_column(index, "span")),
            )
        ).as_py()
        or 0
    )
    inputs_in_index = (
        int(
            pc.count_distinct(
                pc.coalesce(index_column(index, "parent_key"), index_column(index, "key"))
            ).as_py()
        )
        if n
        else 0
    )
    pairs = reason_pairs(index)
    rejected_pairs = pairs.filter(pc.equal(pairs.column("status"), "rejected"))
    multi = 0
    if rejected_pairs.num_rows:
        per_row = rejected_pairs.group_by("row").aggregate([("tag", "count")])
        multi = int(pc.sum(pc.greater(per_row.column("tag_count"), 1)).as_py() or 0)

    shard_list = list(shards)
    buckets: dict[str, dict[str, int]] = {}
    for s in shard_list:
        b = buckets.setdefault(str(s.bucket), {"shards": 0, "samples": 0, "bytes": 0})
        b["shards"] += 1
        b["samples"] += int(s.num_samples)
        b["bytes"] += int(s.num_bytes)
    elapsed = float(elapsed_s)
    return {
        "inputs": int(num_inputs),
        "inputs_in_index": inputs_in_index,
        "samples": n,
        "clips": clips,
        "accepted": by_status.get("accepted", 0),
        "rejected": by_status.get("rejected", 0),
        "errors": by_status.get("error", 0),
        "other_status": sum(v for k, v in by_status.items() if k not in STATUSES),
        "by_kind": dict(sorted(by_kind.items())),
        "rejected_by_reason": _count_by_tag(pairs, "rejected"),
        "errors_by_reason": _count_by_tag(pairs, "error"),
        "multi_reason_rejected": multi,
        "reason_counting": REASON_NOTE,
        "shards": len(shard_list),
        "bytes": sum(b["bytes"] for b in buckets.values()),
        "shard_samples": sum(b["samples"] for b in buckets.values()),
        "shards_by_bucket": dict(sorted(buckets.items())),
        "elapsed_s": elapsed,
        "samples_per_s": (n / elapsed) if elapsed > 0 else None,
        "stages_run": [str(s) for s in stages_run],
        "stages_skipped": {str(k): str(v) for k, v in stages_skipped.items()},
        "run": dict(run or {}),
    }


# --------------------------------------------------------------------------------------------
# console


def print_summary(summary: Mapping[str, Any], console: Any = None) -> None:
    """Print the summary as rich tables: totals, reasons, shards per bucket, skipped stages."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = summary
    samples = s.get("samples", 0)

    totals = Table(title="Curation run", show_header=False, title_justify="left")
    totals.add_column("", style="bold")
    totals.add_column("", justify="right")
    totals.add_column("", style="dim")
    totals.add_row("inputs", f"{s['inputs']:,}", _inputs_note(s))
    totals.add_row("samples (rows)", f"{samples:,}", f"{s.get('clips', 0):,} of them video clips")
    totals.add_row("accepted", f"[green]{s['accepted']:,}[/]", pct(s["accepted"], samples))
    totals.add_row("rejected", f"[yellow]{s['rejected']:,}[/]", pct(s["rejected"], samples))
    totals.add_row("errors", f"[red]{s['errors']:,}[/]", pct(s["errors"], samples))
    accounted = s["accepted"] + s["rejected"] + s["errors"]
    if accounted != samples:
        totals.add_row("[red]unaccounted[/]", f"[red]{samples - accounted:,}[/]", "unknown status")
    shard_note = "no shards written" if not s["shards"] else ""
    if s["shards"] and s.get("shard_samples", s["accepted"]) != s["accepted"]:
        shard_note = f"[red]{s['shard_samples']:,} samples in shards != accepted[/]"
    totals.add_row("shards", f"{s['shards']:,}", shard_note)
    totals.add_row("bytes", human_bytes(s["bytes"]), f"{s['bytes']:,} B")
    rate = s.get("samples_per_s")
    totals.add_row("elapsed", duration(s["elapsed_s"]), f"{rate:,.1f} samples/s" if rate else "")
    console.print(totals)

    if s.get("rejected_by_reason") or s.get("errors_by_reason"):
        reasons = Table(title="Rejections and errors by reason", title_justify="left")
        reasons.add_column("status")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        reasons.add_column("% of samples", justify="right")
        for status, key, style in (
            ("rejected", "rejected_by_reason", "yellow"),
            ("error", "errors_by_reason", "red"),
        ):
            for tag, count in s.get(key, {}).items():
                reasons.add_row(
                    f"[{style}]{status}[/]", _rich_safe(tag), f"{count:,}", pct(count, samples)
                )
        console.print(reasons)
        if s.get("multi_reason_rejected"):
            console.print(
                f"[dim]{s['multi_reason_rejected']:,} rejected rows have several reasons and "
                "count under each.[/]"
            )

    if s.get("by_kind") and len(s["by_kind"]) > 1:
        kinds = Table(title="By kind", title_justify="left")
        kinds.add_column("kind")
        for st in STATUSES:
            kinds.add_column(st, justify="right")
        for k, row in s["by_kind"].items():
            kinds.add_row(_rich_safe(k), *(f"{row.get(st, 0):,}" for st in STATUSES))
        console.print(kinds)

    if s.get("shards_by_bucket"):
        buckets = Table(title="Shards by bucket", title_justify="left")
        buckets.add_column("bucket")
        buckets.add_column("shards", justify="right")
        buckets.add_column("samples", justify="right")
        buckets.add_column("bytes", justify="right")
        for name, b in s["shards_by_bucket"].items():
            buckets.add_row(
                _rich_safe(name), f"{b['shards']:,}", f"{b['samples']:,}", human_bytes(b["bytes"])
            )
        console.print(buckets)

    run = s.get("run") or {}
    if run.get("stages"):
        stages = Table(title="Stages (this run)", title_justify="left")
        for col in ("stage", "rows in", "rows out", "worker seconds"):
            stages.add_column(col, justify="left" if col == "stage" else "right")
        for name, (n_in, n_out, secs) in run["stages"].items():
            stages.add_row(_rich_safe(name), f"{int(n_in):,}", f"{int(n_out):,}", f"{secs:,.1f}")
        console.print(stages)
    if run:
        console.print(
            f"[dim]this run: {run.get('inputs_this_run', 0):,} inputs in "
            f"{run.get('blocks', 0):,} blocks ({run.get('inputs_skipped', 0):,} committed "
            f"earlier, skipped); {run.get('retries', 0)} block retries; workers ready in "
            f"{duration(run.get('startup_s', 0.0))}[/]"
        )

    if s.get("stages_skipped"):
        skipped = Table(title="Stages skipped", title_justify="left")
        skipped.add_column("stage", style="bold")
        skipped.add_column("why")
        for name, why in s["stages_skipped"].items():
            skipped.add_row(_rich_safe(name), _rich_safe(why))
        console.print(skipped)
    if s.get("catalog"):
        console.print(f"catalog version: [bold]{_rich_safe(s['catalog'])}[/]")
    if s.get("stages_run"):
        console.print("[dim]stages run: " + _rich_safe(", ".join(s["stages_run"])) + "[/]")


def _inputs_note(s: Mapping[str, Any]) -> str:
    in_index = s.get("inputs_in_index")
    if in_index is None or in_index == s["inputs"]:
        return ""
    return f"[yellow]{in_index:,} distinct inputs in the index[/]"


def _rich_safe(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))


# --------------------------------------------------------------------------------------------
# helpers shared with curation.report (it imports ``human_bytes`` from here too)


def duration(seconds: float) -> str:
    """``42.5`` -> ``"42.5 s"``, ``125`` -> ``"2:05"``, ``3725`` -> ``"1:02:05"``."""
    seconds = float(seconds or 0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def pct(part: int, whole: int) -> str:
    """``part`` as a percentage of ``whole`` (empty when ``whole`` is 0)."""
    return f"{100.0 * part / whole:.1f}%" if whole else ""


def index_column(index: pa.Table, name: str) -> pa.ChunkedArray:
    """Column ``name`` of ``index``; a missing one as nulls of its ``SAMPLE_SCHEMA`` type."""
    if name in index.column_names:
        return index.column(name)
    field = SAMPLE_SCHEMA.field(name) if name in SAMPLE_SCHEMA.names else pa.field(name, pa.null())
    return pa.chunked_array([pa.nulls(index.num_rows, field.type)], field.type)
