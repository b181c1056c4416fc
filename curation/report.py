"""End-of-run curation report: one self-contained HTML page.

``write_report`` writes ONE self-contained ``report.html``: counts, the ``select`` thresholds of
the stages that ran, per-score histograms with those thresholds (``curation.histograms``), a
gallery of accepted samples per kind and bucket, the duplicate groups (``curate dedup``,
``dedup.inline``: each kept sample beside the samples that repeat it), and a thumbnail section
per rejection / error reason. Edit pairs show their source and target side by side; error
reasons are shown without the errno numbers and absolute paths of the exception text (the raw
text is the tooltip). The MLflow run is ``curation.tracking``'s.

The gallery shows, per (kind, bucket), the accepted samples with the smallest keys among those
that have a thumbnail: the same choice ``curation.sink`` keeps thumbnails for, so the gallery
is a fixed sample, in no particular order of the inputs (keys are hashes of the input), however
large the run.

The numbers come from ``curation.summary.summarize``, which also defines how reasons are
grouped and counted. Everything over rows is vectorised (pyarrow / numpy); only the few rows
shown as thumbnails become Python objects, so 100k-row indexes report in seconds.

One concept, the page: every function here renders one part of it (counts, reasons, stages,
thresholds, histograms, thumbnail sections and tiles) and they share its CSS and escaping;
the numbers and the histograms are computed elsewhere, hence one file of ~600 lines.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.schema import STATUSES
from curation.histograms import Histogram, histograms
from curation.sink import ACCEPTED_THUMBS_PER_GROUP, TARGET_SUFFIX
from curation.summary import (
    REASON_NOTE,
    duration,
    human_bytes,
    index_column,
    pct,
    reason_pairs,
)

# --------------------------------------------------------------------------------------------
# HTML report

MAX_THUMBNAILS = 24  # thumbnails a rejection / error section shows; duplicate groups shown


def write_report(
    index: pa.Table,
    thumbnails: Mapping[str, bytes],
    select_cfg: Any,
    summary: Mapping[str, Any],
    path: Path,
    *,
    max_thumbnails: int = MAX_THUMBNAILS,
    accepted_per_group: int = ACCEPTED_THUMBS_PER_GROUP,
    title: str = "Curation report",
) -> Path:
    """Write one self-contained HTML page (inline CSS, PNG histograms and thumbnails as data
    URIs, nothing fetched) and return its path. ``path`` may be a directory (-> report.html).

    ``thumbnails`` maps sample key -> image bytes (JPEG; PNG/WebP/GIF are recognised too), and
    ``KEY.target`` -> the target side of an edit pair (``curation.sink.read_thumbnails``).
    ``select_cfg`` is a ``SelectConfig``, a mapping of thresholds, or None. ``max_thumbnails``
    caps each rejection / error section, ``accepted_per_group`` each (kind, bucket) of the
    accepted gallery.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    thresholds, not_applied = _applied_thresholds(_thresholds(select_cfg), summary, index)
    pairs = reason_pairs(index)
    has_thumb = _has_thumbnail(index, thumbnails)

    parts = [_html_head(title), f"<h1>{_esc(title)}</h1>"]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    where = f" · {_esc(summary['catalog'])}" if summary.get("catalog") else ""
    parts.append(f'<p class="dim">generated {generated}{where}</p>')
    parts.append(_html_counts(summary))
    sections = _reason_sections(index, pairs)
    parts.append(_html_reason_table(summary, sections))
    parts.append(_html_stages(summary))
    parts.append(_html_thresholds(thresholds, not_applied, select_cfg is not None))
    parts.append("<h2>Score distributions</h2>")
    figures = [_html_histogram(h) for h in histograms(index, thresholds)]
    if figures:
        parts.append('<div class="hists">' + "".join(figures) + "</div>")
    else:
        parts.append('<p class="dim">no score column has values</p>')
    parts.append(_html_gallery(index, thumbnails, has_thumb, accepted_per_group))
    parts.append(_html_duplicates(index, thumbnails, max_thumbnails))
    for sec in sections:
        parts.append(_html_section(index, sec, thumbnails, has_thumb, max_thumbnails))
    parts.append("</body></html>\n")
    text = "\n".join(parts)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8", errors="replace")
    os.replace(tmp, path)
    return path


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.dim{color:#777}.num{text-align:right;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}th{background:#f6f6f6}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:6px;
padding:8px 14px;min-width:90px}.card b{display:block;font-size:20px}
.accepted{color:#2e7d32}.rejected{color:#ef6c00}.error{color:#c62828}
.hists{display:flex;flex-wrap:wrap;gap:16px}.hist{border:1px solid #eee;padding:6px;
max-width:520px}.hist img{max-width:100%}.hist p{margin:2px 0;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px}
.tile{border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px;overflow:hidden;
overflow-wrap:anywhere}.tile img{width:100%;height:140px;object-fit:contain;background:#111}
.ph{height:140px;background:repeating-linear-gradient(45deg,#eee,#eee 8px,#f7f7f7 8px,
#f7f7f7 16px);display:flex;flex-direction:column;justify-content:center;text-align:center;
padding:4px;font-size:11px;color:#555;overflow:hidden}
.tile ul{margin:4px 0 0;padding-left:16px}.tile code{font-size:11px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:4px}.pair figure{margin:0}
.pair img,.pair .ph{height:110px}.pair figcaption{font-size:11px;color:#777;text-align:center}
.cap{margin:2px 0;color:#333}.cap i{color:#777}.kept{border:2px solid #2e7d32}
"""


def _html_head(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
    )


def _html_counts(s: Mapping[str, Any]) -> str:
    samples = s.get("samples", 0)

    def card(label: str, value: str, note: str = "", cls: str = "") -> str:
        note_html = f'<span class="dim">{_esc(note)}</span>' if note else ""
        return (
            f'<div class="card {cls}"><span>{_esc(label)}</span><b>{_esc(value)}</b>'
            f"{note_html}</div>"
        )

    rate = s.get("samples_per_s")
    cards = [
        card(
            "inputs",
            f"{s.get('inputs', 0):,}",
            ""
            if s.get("inputs_in_index") in (None, s.get("inputs"))
            else f"{s['inputs_in_index']:,} in index",
        ),
        card("samples", f"{samples:,}", f"{s.get('clips', 0):,} clips"),
        card(
            "accepted", f"{s.get('accepted', 0):,}", pct(s.get("accepted", 0), samples), "accepted"
        ),
        card(
            "rejected", f"{s.get('rejected', 0):,}", pct(s.get("rejected", 0), samples), "rejected"
        ),
        card("errors", f"{s.get('errors', 0):,}", pct(s.get("errors", 0), samples), "error"),
        card("shards", f"{s.get('shards', 0):,}", human_bytes(s.get("bytes", 0))),
        card(
            "elapsed", duration(s.get("elapsed_s", 0.0)), f"{rate:,.1f} samples/s" if rate else ""
        ),
    ]
    out = ['<div class="cards">' + "".join(cards) + "</div>"]
    if s.get("by_kind"):
        rows = "".join(
            f"<tr><td>{_esc(k)}</td>"
            + "".join(f'<td class="num">{v.get(st, 0):,}</td>' for st in STATUSES)
            + "</tr>"
            for k, v in s["by_kind"].items()
        )
        head = "".join(f"<th>{st}</th>" for st in STATUSES)
        out.append(f"<table><tr><th>kind</th>{head}</tr>{rows}</table>")
    if s.get("shards_by_bucket"):
        rows = "".join(
            f'<tr><td>{_esc(b)}</td><td class="num">{v["shards"]:,}</td>'
            f'<td class="num">{v["samples"]:,}</td><td class="num">{human_bytes(v["bytes"])}</td>'
            "</tr>"
            for b, v in s["shards_by_bucket"].items()
        )
        out.append(
            "<details><summary>shards by bucket</summary><table><tr><th>bucket</th>"
            f"<th>shards</th><th>samples</th><th>bytes</th></tr>{rows}</table></details>"
        )
    return "\n".join(out)


def _html_reason_table(s: Mapping[str, Any], sections: list[dict[str, Any]]) -> str:
    if not sections:
        return ""
    samples = s.get("samples", 0)
    rows = "".join(
        f'<tr><td class="{sec["status"]}">{sec["status"]}</td>'
        f'<td><a href="#{sec["anchor"]}">{_esc(sec["tag"])}</a></td>'
        f'<td class="num">{len(sec["rows"]):,}</td>'
        f'<td class="num">{_esc(pct(len(sec["rows"]), samples))}</td></tr>'
        for sec in sections
    )
    return (
        "<h2>Reasons</h2><table><tr><th>status</th><th>reason</th><th>rows</th>"
        f"<th>of samples</th></tr>{rows}</table>"
        f'<p class="dim">{_esc(REASON_NOTE)}.</p>'
    )


def _html_stages(s: Mapping[str, Any]) -> str:
    out = []
    if s.get("stages_run"):
        out.append("<p>stages run: " + _esc(", ".join(s["stages_run"])) + "</p>")
    if s.get("stages_skipped"):
        rows = "".join(
            f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in s["stages_skipped"].items()
        )
        out.append(
            f"<h2>Stages skipped</h2><table><tr><th>stage</th><th>why</th></tr>{rows}</table>"
        )
    return "\n".join(out)


# select setting -> (the stage that measures it, the index column holding the measure)
THRESHOLD_SOURCES: dict[str, tuple[str, str]] = {
    "min_short_side": ("probe", "width"),
    "min_aspect": ("probe", "width"),
    "max_aspect": ("probe", "width"),
    "min_aesthetic": ("aesthetic", "aesthetic"),
    "max_watermark": ("watermark", "watermark"),
    "max_watermark_static": ("watermark", "watermark_static"),
    "min_motion": ("motion", "motion"),
    "max_motion": ("motion", "motion"),
    "max_ocr_area": ("ocr", "ocr_area"),
}


def _applied_thresholds(
    thresholds: Mapping[str, Any], summary: Mapping[str, Any], index: pa.Table
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The thresholds that applied to this index, and the others by why not.

    A threshold applies when the score it tests was measured: its stage ran in this run, or
    its values are in the index (``curate select`` reads the scores of an earlier run). A
    threshold on a score no stage measured tested nothing (a null score passes), so listing
    its value would mislead. Without ``stages_run`` in the summary every threshold is shown.
    """
    if "stages_run" not in summary:
        return dict(thresholds), {}
    ran = set(summary.get("stages_run") or ())
    skipped = summary.get("stages_skipped") or {}
    shown: dict[str, Any] = {}
    not_applied: dict[str, list[str]] = {}
    for name, value in thresholds.items():
        source = THRESHOLD_SOURCES.get(name)
        if source is None or source[0] in ran or _has_values(index, source[1]):
            shown[name] = value
            continue
        stage = source[0]
        why = f"{stage} skipped: {skipped[stage]}" if stage in skipped else f"{stage} did not run"
        not_applied.setdefault(why, []).append(name)
    return shown, not_applied


def _has_values(index: pa.Table, column: str) -> bool:
    if column not in index.column_names:
        return False
    return index.column(column).null_count < index.num_rows


def _html_thresholds(
    thresholds: Mapping[str, Any], not_applied: Mapping[str, list[str]], configured: bool
) -> str:
    if not configured:
        return '<h2 id="thresholds">Select thresholds</h2><p class="dim">no select config given</p>'
    out = ['<h2 id="thresholds">Select thresholds</h2>']
    if thresholds:
        rows = "".join(
            f'<tr><td>{_esc(k)}</td><td class="num">{_esc(_fmt_threshold(v))}</td></tr>'
            for k, v in thresholds.items()
        )
        out.append(f"<table><tr><th>setting</th><th>value</th></tr>{rows}</table>")
    if not_applied:
        items = "".join(
            f"<li>{_esc(', '.join(names))} <span>({_esc(why)})</span></li>"
            for why, names in not_applied.items()
        )
        out.append(
            '<p class="dim">not applied: no stage measured their score</p>'
            f'<ul class="dim" id="not-applied">{items}</ul>'
        )
    return "\n".join(out)


def _fmt_threshold(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _html_histogram(h: Histogram) -> str:
    return (
        f'<figure class="hist" id="score-{_slug(h.name)}">'
        f'<img alt="{_esc(h.name)} histogram" src="data:image/png;base64,{h.png}">'
        f"<p><b>{_esc(h.name)}</b> {_esc(h.doc)}</p><p>{_esc(h.stats)}</p>"
        f"<p>thresholds: {_esc(h.thresholds)}</p></figure>"
    )


# ---- reason sections


def _reason_sections(index: pa.Table, pairs: pa.Table) -> list[dict[str, Any]]:
    """One section per (status, tag): rejected first, then errors, most rows first."""
    sections = []
    used: set[str] = set()
    for status in ("rejected", "error"):
        sel = pairs.filter(pc.equal(pairs.column("status"), status))
        if sel.num_rows == 0:
            continue
        tags = sel.column("tag").to_numpy(zero_copy_only=False)
        rows = sel.column("row").to_numpy()
        uniq, inverse, counts = np.unique(tags, return_inverse=True, return_counts=True)
        for i in sorted(range(len(uniq)), key=lambda i: (-counts[i], uniq[i])):
            anchor = f"{status}-{_slug(uniq[i])}"
            while anchor in used:
                anchor += "-"
            used.add(anchor)
            sections.append(
                {
                    "status": status,
                    "tag": str(uniq[i]),
                    "rows": np.sort(rows[inverse == i]),
                    "anchor": anchor,
                    "title": f"{'Rejected' if status == 'rejected' else 'Error'}: {uniq[i]}",
                }
            )
    return sections


TILE_SCORES = (
    "aesthetic",
    "watermark",
    "watermark_static",
    "motion",
    "ocr_area",
    "edit_change",
    "edit_aspect_diff",
)
TILE_COLUMNS = (
    "key",
    "kind",
    "source_uri",
    "target_uri",
    "span",
    "boundaries",
    "reasons",
    "width",
    "height",
    "duration",
    "caption",
    "recaption",
    "instruction",
    "duplicate_signal",
    *TILE_SCORES,
)
CAPTION_CHARS = 160  # longer captions are cut on the tile (whole in its tooltip)


def _html_section(
    index: pa.Table,
    sec: Mapping[str, Any],
    thumbnails: Mapping[str, bytes],
    has_thumb: np.ndarray,
    limit: int,
) -> str:
    rows: np.ndarray = sec["rows"]
    # samples with a thumbnail first, then the rest, each in index order
    chosen = np.concatenate([rows[has_thumb[rows]], rows[~has_thumb[rows]]])[: max(limit, 0)]
    records = _records(index, chosen)
    tiles = "".join(_html_tile(r, thumbnails) for r in records)
    shown = f"showing {len(records):,} of {len(rows):,}"
    if len(rows) > len(records):
        shown += " (samples with a thumbnail first)"
    return (
        f'<section id="{sec["anchor"]}"><h2 class="{sec["status"]}">{_esc(sec["title"])} '
        f'<span class="dim">({len(rows):,} rows)</span></h2><p class="dim">{shown}</p>'
        f'<div class="grid">{tiles}</div></section>'
    )


def _records(index: pa.Table, rows: np.ndarray) -> list[dict[str, Any]]:
    """The tile columns of ``rows`` (positions in ``index``) as Python dicts, in that order."""
    if not len(rows):
        return []
    cols = [c for c in TILE_COLUMNS if c in index.column_names]
    return index.select(cols).take(pa.array(rows, pa.int64())).to_pylist()


def _html_gallery(
    index: pa.Table, thumbnails: Mapping[str, bytes], has_thumb: np.ndarray, per_group: int
) -> str:
    """Accepted samples per (kind, bucket): a table of every group, then a section per group
    with the ``per_group`` smallest keys among its samples that have a thumbnail. Groups are
    counted in Arrow; only the rows with a thumbnail (few: ``curation.sink`` bounds them)
    become Python objects."""
    accepted = _rows_where(index, pc.equal(index_column(index, "status"), "accepted"))
    head = '<h2 id="accepted" class="accepted">Accepted samples</h2>'
    if not len(accepted):
        return head + '<p class="dim">no sample was accepted</p>'
    take = pa.array(accepted, pa.int64())
    groups = pa.table(
        {
            "kind": pc.take(pc.fill_null(index_column(index, "kind"), "?"), take),
            "bucket": pc.take(pc.fill_null(index_column(index, "bucket"), "no bucket"), take),
        }
    )
    counts = groups.group_by(["kind", "bucket"]).aggregate([("kind", "count")])
    pictured = accepted[has_thumb[accepted]]
    chosen: dict[tuple[str, str], list[tuple[str, int]]] = {}
    if len(pictured):
        cols = pa.table(
            {
                "kind": pc.fill_null(index_column(index, "kind"), "?"),
                "bucket": pc.fill_null(index_column(index, "bucket"), "no bucket"),
                "key": pc.fill_null(index_column(index, "key"), ""),
            }
        ).take(pa.array(pictured, pa.int64()))
        for row, r in zip(pictured.tolist(), cols.to_pylist(), strict=True):
            chosen.setdefault((r["kind"], r["bucket"]), []).append((r["key"], row))
    table, sections = [], []
    for g in sorted(counts.to_pylist(), key=lambda g: (g["kind"], g["bucket"])):
        kind, bucket, total = g["kind"], g["bucket"], g["kind_count"]
        shown = [row for _, row in sorted(chosen.get((kind, bucket), []))[: max(per_group, 0)]]
        label = f"{kind} · {bucket}"
        anchor = f"accepted-{_slug(f'{kind}~{bucket}')}"
        link = f'<a href="#{anchor}">{_esc(label)}</a>' if shown else _esc(label)
        table.append(
            f'<tr><td>{link}</td><td class="num">{total:,}</td>'
            f'<td class="num">{len(shown):,}</td></tr>'
        )
        if not shown:
            continue
        tiles = "".join(_html_tile(r, thumbnails) for r in _records(index, np.asarray(shown)))
        sections.append(
            f'<section id="{anchor}" class="gallery"><h3>{_esc(label)} '
            f'<span class="dim">({total:,} accepted, {len(shown):,} shown)</span></h3>'
            f'<div class="grid">{tiles}</div></section>'
        )
    note = (
        f"per kind and bucket, up to {per_group:,} accepted samples: those with the smallest "
        "keys among the samples that have a thumbnail (keys are hashes of the input, so this "
        "is a fixed sample in no particular order of the inputs)"
    )
    if not sections:
        note = "no accepted sample has a thumbnail"
    summary = (
        "<table><tr><th>kind · bucket</th><th>accepted</th><th>shown</th></tr>"
        + "".join(table)
        + "</table>"
    )
    return head + f'<p class="dim">{_esc(note)}</p>' + summary + "".join(sections)


DUPLICATES_PER_GROUP = 6  # samples shown per duplicate group (the kept one and 5 repeats)


def duplicate_groups(index: pa.Table, limit: int) -> list[tuple[str, list[str], int]]:
    """``(kept key, repeat keys shown, repeats in all)`` of the ``limit`` largest duplicate
    groups (``duplicate_of``; most repeats first, then key order); each group's repeats in
    key order, at most ``DUPLICATES_PER_GROUP - 1``. The kept key may be another version's."""
    if "duplicate_of" not in index.column_names or limit <= 0:
        return []
    kept = index_column(index, "duplicate_of")
    valid = pc.is_valid(kept)
    if not pc.any(valid).as_py():
        return []
    pairs = pa.table(
        {"kept": pc.filter(kept, valid), "key": pc.filter(index_column(index, "key"), valid)}
    )
    sizes = pairs.group_by("kept").aggregate([("key", "count")])
    top = sizes.sort_by([("key_count", "descending"), ("kept", "ascending")]).slice(0, limit)
    # only the shown groups' rows become Python objects
    members = pairs.filter(pc.is_in(pairs["kept"], value_set=top["kept"]))
    groups: dict[str, list[str]] = {}
    for r in members.sort_by([("kept", "ascending"), ("key", "ascending")]).to_pylist():
        groups.setdefault(r["kept"], []).append(r["key"])
    return [
        (k, groups[k][: DUPLICATES_PER_GROUP - 1], n)
        for k, n in zip(top["kept"].to_pylist(), top["key_count"].to_pylist(), strict=True)
    ]


def _html_duplicates(index: pa.Table, thumbnails: Mapping[str, bytes], limit: int) -> str:
    """The largest duplicate groups, one row each: the kept sample, then its repeats."""
    groups = duplicate_groups(index, limit)
    if not groups:
        return ""
    total = pc.count_distinct(index_column(index, "duplicate_of")).as_py()  # nulls not counted
    wanted = {k for kept, keys, _ in groups for k in (kept, *keys)}
    keys = index_column(index, "key")
    rows = _rows_where(index, pc.is_in(keys, value_set=pa.array(sorted(wanted), pa.string())))
    records = {r["key"]: r for r in _records(index, rows)}
    out = [
        '<h2 id="duplicates" class="rejected">Duplicate groups</h2>'
        f'<p class="dim">{total:,} kept samples are repeated; the {len(groups):,} largest '
        "groups, each kept sample (left) beside the samples rejected as its duplicates</p>"
    ]
    for kept, shown, count in groups:
        first = records.get(kept)
        if first is None:  # kept in an earlier version the run was compared against
            first = {"key": kept, "source_uri": "(an earlier version)"}
        tiles = _html_tile(first, thumbnails).replace('class="tile"', 'class="tile kept"', 1)
        tiles += "".join(_html_tile(records[k], thumbnails) for k in shown if k in records)
        more = f", {count - len(shown):,} more not shown" if count > len(shown) else ""
        out.append(
            f'<section class="dups"><h3><code>{_esc(kept[:16])}</code> '
            f'<span class="dim">({count:,} repeats{more})</span></h3>'
            f'<div class="grid">{tiles}</div></section>'
        )
    return "".join(out)


def write_duplicate_montages(
    index: pa.Table, thumbnails: Mapping[str, bytes], folder: Path, limit: int = MAX_THUMBNAILS
) -> Path | None:
    """One JPEG per pictured duplicate group in ``folder`` (``NN-KEPT.jpg``: the kept sample's
    thumbnail, then its repeats', side by side at one height; a missing thumbnail is a grey
    box), for the MLflow run's artifacts. None when the index has no duplicates."""
    import io

    from PIL import Image

    groups = duplicate_groups(index, limit)
    if not groups:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    height, gap = 160, 6
    for n, (kept, keys, _) in enumerate(groups, 1):
        tiles = []
        for key in (kept, *keys):
            data = thumbnails.get(key)
            if data:
                image = Image.open(io.BytesIO(data)).convert("RGB")
                width = max(1, round(image.width * height / image.height))
                tiles.append(image.resize((width, height)))
            else:
                tiles.append(Image.new("RGB", (height, height), (200, 200, 200)))
        sheet = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height))
        sheet.paste((255, 255, 255), (0, 0, sheet.width, height))
        x = 0
        for tile in tiles:
            sheet.paste(tile, (x, 0))
            x += tile.width + gap
        sheet.save(folder / f"{n:02d}-{kept[:16]}.jpg", quality=85)
    return folder


def _html_image(data: bytes | None, alt: str, uri: str) -> str:
    if not data:
        return f'<div class="ph"><span>no thumbnail</span><code>{_esc(uri)}</code></div>'
    mime = _image_mime(data)
    return (
        f'<img loading="lazy" alt="{_esc(alt)}" '
        f'src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}">'
    )


def _html_media(r: Mapping[str, Any], thumbnails: Mapping[str, bytes]) -> str:
    """The tile's picture: the thumbnail, or an edit pair's source and target side by side."""
    key = r.get("key") or ""
    uri = r.get("source_uri") or ""
    source = thumbnails.get(key) if key else None
    target_uri = r.get("target_uri")
    if not target_uri:
        return _html_image(source, file_name(uri), uri)
    target = thumbnails.get(f"{key}{TARGET_SUFFIX}") if key else None
    if not source and not target:
        return _html_image(None, "", uri)
    return (
        '<div class="pair">'
        f"<figure>{_html_image(source, 'source ' + file_name(uri), uri)}"
        "<figcaption>source</figcaption></figure>"
        f"<figure>{_html_image(target, 'target ' + file_name(target_uri), target_uri)}"
        "<figcaption>target</figcaption></figure></div>"
    )


def _html_caption(label: str, text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        return ""
    short = text if len(text) <= CAPTION_CHARS else text[: CAPTION_CHARS - 1] + "…"
    return f'<div class="cap" title="{_esc(text)}"><i>{label}</i> {_esc(short)}</div>'


def _html_tile(r: Mapping[str, Any], thumbnails: Mapping[str, bytes]) -> str:
    key = r.get("key") or ""
    uri = r.get("source_uri") or ""
    name = file_name(uri)
    span = r.get("span")
    span_text = f"{span['start']:.2f}–{span['end']:.2f} s" if span else "whole input"
    bounds = r.get("boundaries")
    if span and bounds:  # how the clip's ends were found: "cut → dissolve"
        span_text += f" ({bounds.get('start')} → {bounds.get('end')})"
    meta = [r.get("kind") or ""]
    if r.get("width") and r.get("height"):
        meta.append(f"{r['width']}×{r['height']}")
    if r.get("duration"):
        meta.append(f"{r['duration']:.1f} s")
    scores = ", ".join(f"{c} {r[c]:.3g}" for c in TILE_SCORES if r.get(c) is not None)
    target = ""
    if r.get("target_uri"):
        target = f'<div title="{_esc(r["target_uri"])}">→ {_esc(file_name(r["target_uri"]))}</div>'
    captions = _html_caption("instruction", r.get("instruction"))
    if r.get("recaption"):
        captions += _html_caption("recaption", r.get("recaption"))
    else:
        captions += _html_caption("caption", r.get("caption"))
    reasons = "".join(_html_reason(x) for x in (r.get("reasons") or []))
    if r.get("duplicate_signal"):
        reasons += f"<li>{_esc(r['duplicate_signal'])}</li>"
    return (
        f'<div class="tile" data-key="{_esc(key)}">{_html_media(r, thumbnails)}'
        f'<div title="{_esc(uri)}"><b>{_esc(name)}</b></div>{target}'
        f'<div><code title="{_esc(key)}">{_esc(key[:16])}</code></div>'
        f"{captions}"
        f"<div>{_esc(' · '.join(m for m in meta if m))}</div>"
        f"<div>span {_esc(span_text)}</div>"
        + (f'<div class="dim">{_esc(scores)}</div>' if scores else "")
        + (f"<ul>{reasons}</ul>" if reasons else "")
        + "</div>"
    )


def _html_reason(reason: str) -> str:
    shown = readable_reason(reason)
    title = f' title="{_esc(reason)}"' if shown != reason else ""
    return f"<li{title}>{_esc(shown)}</li>"


def _has_thumbnail(index: pa.Table, thumbnails: Mapping[str, bytes]) -> np.ndarray:
    if not thumbnails or index.num_rows == 0:
        return np.zeros(index.num_rows, dtype=bool)
    # keys only (a lazy ``sink.Thumbnails`` lists no empty file; a plain dict may hold one)
    lazy = not isinstance(thumbnails, dict)
    keys = pa.array([k for k in thumbnails if lazy or thumbnails[k]], pa.string())
    mask = pc.fill_null(pc.is_in(index_column(index, "key"), value_set=keys), False)
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _rows_where(index: pa.Table, mask: Any) -> np.ndarray:
    mask = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    return np.flatnonzero(mask)


def _image_mime(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/jpeg"


# --------------------------------------------------------------------------------------------
# small helpers


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _esc(value: Any) -> str:
    """HTML-escape any value from data: quotes too, control characters and lone surrogates
    (undecodable file names) replaced, so the page is valid UTF-8 HTML."""
    text = str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return html.escape(_CONTROL.sub("\ufffd", text), quote=True)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-")[:60] or "x"
    return f"{slug}-{hashlib.sha1(str(text).encode('utf-8', 'replace')).hexdigest()[:6]}"


_ERRNO = re.compile(r"\[(?:Errno|WinError) -?\d+\]\s*")
# an absolute path or URL in quotes, as OSError and FFmpeg errors print the file name
_QUOTED_PATH = re.compile(r"""(['"])((?:[A-Za-z][A-Za-z0-9+.-]*://|/)[^'"]*)\1""")
# a bare absolute path (not part of a URL or a relative path)
_BARE_PATH = re.compile(r"(?<![\w/.:~])/(?:[^\s/'\"]+/)+([^\s/'\"]+)")


def readable_reason(reason: str) -> str:
    """A reason as a reader wants it: without the errno numbers of the exception text and with
    file names instead of absolute paths (the tile already names the file).

    ``"decode_error: video file does not open: [Errno 1094995529] Invalid data found when
    processing input: '/data/raw/a.mp4'"`` -> ``"decode_error: video file does not open:
    Invalid data found when processing input: a.mp4"``.
    """
    text = _ERRNO.sub("", str(reason))
    text = _QUOTED_PATH.sub(lambda m: file_name(m.group(2)), text)
    return _BARE_PATH.sub(lambda m: m.group(1), text)


def file_name(uri: str) -> str:
    """Last path segment of a local path or URL (the uri itself when it has none)."""
    name = str(uri).rstrip("/").rsplit("/", 1)[-1]
    return name or str(uri)


def _thresholds(select_cfg: Any) -> dict[str, Any]:
    if select_cfg is None:
        return {}
    if hasattr(select_cfg, "model_dump"):
        return dict(select_cfg.model_dump())
    if isinstance(select_cfg, Mapping):
        return dict(select_cfg)
    return {k: v for k, v in vars(select_cfg).items() if not k.startswith("_")}
