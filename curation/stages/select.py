"""select: thresholds on the scores in the index -> ``status`` and every failing reason.

Scorers never drop rows; this step decides. It runs at the end of ``curate run`` and alone in
``curate select`` on an existing index (no model runs again). A threshold set to ``null`` is
not applied, and a score that is null (its stage was off or does not apply, e.g. motion of an
image) passes. Rows in ``error`` stay in error.

Defaults (``SelectConfig``) and where they come from:
- ``min_aesthetic`` 5.0: Open-Sora's data pipeline filters with ``--aesmin 5`` on the LAION
  improved-aesthetic-predictor (1-10 scale; its docs call 5.5 "fair", 6.5 "high").
- aspect ``1/3 .. 3``: the range published video curation pipelines keep; extreme strips are
  banners and scrolling text.
- ``min_short_side`` 256 px: our choice, the smallest area class of the shard buckets; smaller
  media would only ever be upscaled in training.
- ``max_watermark`` 0.5: the decision boundary of the binary watermark classifier head.
- ``max_watermark_static`` 0.2: our choice; static-overlay pixel fraction above which a video
  carries a burned-in logo (see ``stages/watermark.py``).
- ``max_ocr_area`` 0.02: our choice. Open-Sora drops dense-text clips (news, ads) by counting
  DBNet++ text regions; we threshold the union area of PP-OCR text boxes instead (2% of the
  frame), which does not punish one small caption line but drops subtitles and slides.
- ``min_motion`` 0.005 / ``max_motion`` 1.0, in frame diagonals per second (see
  ``stages/motion.py``): below 0.005 a clip is a still (a 480x270 clip at 24 fps moving
  0.1 px/frame scores 0.0044); above 1.0 the content crosses the whole frame every second
  (shake, flashes). Open-Sora thresholds a UniMatch flow score the same way; these values are
  ours, set on the synthetic pans (slow 0.044, fast 0.35).
- ``min_clip_s`` (split section) 2 s: shorter clips are ``too_short``.
- edit pairs: ``max_aspect_diff`` 2% relative, ``min_target_change`` 0.002 mean abs change.
- ``duplicate_of: KEY``: the row repeats sample KEY (``curate dedup``, ``curation/dedup.py``);
  kept through later ``curate select`` runs until ``curate dedup`` decides again.
"""

from __future__ import annotations

from typing import Any

from curation.config import EditConfig, SelectConfig
from curation.stages.base import Row, Stage
from curation.stages.resolution import resolution_reasons


def reasons_for(
    row: Row, sel: SelectConfig, edit: EditConfig = EditConfig(), min_clip_s: float = 0.0
) -> list[str]:
    """Every threshold this row fails, as ``tag: value vs limit`` strings (``min_clip_s`` is
    the split section's, ``edit`` the edit-pair checks)."""
    out: list[str] = []
    kind = row.get("kind")
    w, h = row.get("width"), row.get("height")

    def check(tag: str, value: Any, limit: Any, fails: bool, op: str) -> None:
        if fails:
            out.append(f"{tag}: {_fmt(value)} {op} {_fmt(limit)}")

    if row.get("duplicate_of"):  # decided over the whole index by ``curate dedup``
        out.append(f"duplicate_of: {row['duplicate_of']}")
    if kind == "video" and row.get("duration") is not None:
        d = row["duration"]
        check("too_short", d, min_clip_s, d < min_clip_s, "<")
    out += resolution_reasons(w, h, sel)
    for col, tag, limit, is_min in [
        ("aesthetic", "low_aesthetic", sel.min_aesthetic, True),
        ("watermark", "watermark", sel.max_watermark, False),
        ("watermark_static", "static_overlay", sel.max_watermark_static, False),
        ("motion", "low_motion", sel.min_motion, True),
        ("motion", "high_motion", sel.max_motion, False),
        ("ocr_area", "text_overlay", sel.max_ocr_area, False),
    ]:
        value = row.get(col)
        if value is None or limit is None:
            continue
        check(tag, value, limit, value < limit if is_min else value > limit, "<" if is_min else ">")
    if kind in ("image_edit", "video_edit"):
        if not (row.get("instruction") or "").strip():
            out.append("no_instruction: the edit pair has no instruction")
        diff = row.get("edit_aspect_diff")
        if diff is not None:
            check(
                "pair_aspect_mismatch",
                diff,
                edit.max_aspect_diff,
                diff > edit.max_aspect_diff,
                ">",
            )
        change = row.get("edit_change")
        if change is not None:
            check(
                "identical_pair",
                change,
                edit.min_target_change,
                change < edit.min_target_change,
                "<",
            )
    return out


def select_rows(
    rows: list[Row], sel: SelectConfig, edit: EditConfig = EditConfig(), min_clip_s: float = 0.0
) -> list[Row]:
    """Set status (accepted | rejected) and reasons; error rows are left as they are."""
    out = []
    for row in rows:
        row = dict(row)
        if row.get("status") == "error":
            out.append(row)
            continue
        reasons = reasons_for(row, sel, edit, min_clip_s)
        row["status"] = "rejected" if reasons else "accepted"
        row["reasons"] = reasons
        out.append(row)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class SelectStage(Stage):
    name = "select"
    batch_size = 64

    def __init__(self, cfg: SelectConfig, edit: EditConfig, min_clip_s: float):
        self.select = cfg
        self.edit = edit
        self.min_clip_s = min_clip_s

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return select_rows(rows, self.select, self.edit, self.min_clip_s)
