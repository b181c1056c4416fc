"""select and resolution: every failing threshold becomes a reason; nulls pass; errors stay."""

from core.config import load_config
from curation.config import CurationConfig
from curation.stages.resolution import resolution_reasons
from curation.stages.select import select_rows

CFG = load_config(CurationConfig)


def tags(row: dict, cfg: CurationConfig = CFG) -> list[str]:
    (out,) = select_rows([row], cfg.select, cfg.edit, cfg.split.min_clip_s)
    return sorted(r.split(":")[0] for r in out["reasons"]) if out["status"] == "rejected" else []


def test_resolution_rule():
    sel = CFG.select
    assert resolution_reasons(640, 360, sel) == []
    assert resolution_reasons(64, 48, sel) == ["too_small: 48 < 256"]
    assert resolution_reasons(1800, 300, sel)[0].startswith("aspect_ratio: 6 > 3")
    assert resolution_reasons(None, 10, sel) == []


def test_every_failing_threshold_is_a_reason():
    row = {"kind": "video", "width": 1280, "height": 720, "duration": 1.0, "aesthetic": 3.0,
           "watermark": 0.9, "watermark_static": 0.5, "motion": 0.0001, "ocr_area": 0.3}  # fmt: skip
    assert tags(row) == ["low_aesthetic", "low_motion", "static_overlay", "text_overlay",
                         "too_short", "watermark"]  # fmt: skip
    fast = {**row, "duration": 5.0, "aesthetic": 6.0, "watermark": 0.1, "watermark_static": 0.0,
            "motion": 3.0, "ocr_area": 0.0}  # fmt: skip
    assert tags(fast) == ["high_motion"]


def test_null_scores_and_null_thresholds_pass():
    image = {"kind": "image", "width": 512, "height": 512, "aesthetic": None, "motion": None}
    assert tags(image) == []
    lenient = load_config(CurationConfig, None, ["select.min_short_side=null"])
    assert tags({"kind": "image", "width": 64, "height": 48}, lenient) == []
    (err,) = select_rows(
        [{"kind": "image", "status": "error", "reasons": ["decode_error"]}], CFG.select
    )
    assert err["status"] == "error" and err["reasons"] == ["decode_error"]


def test_edit_pair_checks():
    pair = {"kind": "image_edit", "width": 512, "height": 512, "instruction": "make it red",
            "edit_aspect_diff": 0.0, "edit_change": 0.1}  # fmt: skip
    assert tags(pair) == []
    bad = {**pair, "instruction": " ", "edit_aspect_diff": 0.3, "edit_change": 0.0}
    assert tags(bad) == ["identical_pair", "no_instruction", "pair_aspect_mismatch"]
