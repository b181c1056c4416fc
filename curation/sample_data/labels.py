"""Label schema and JSONL I/O for the synthetic corpus.

Every record carries the full field set (``None`` where a field does not apply) so the labels
load into a rectangular table (pyarrow / pandas) without schema juggling.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.jsonl"
EDITS_FILE = "edits.jsonl"

# Field -> meaning. Boxes are [x0, y0, x1, y1] in pixels of the stored (coded) frame, x1/y1
# exclusive. The order here is the key order in labels.jsonl.
FIELDS: dict[str, str] = {
    "id": "stable unique name of the item",
    "path": "file relative to the corpus root (POSIX); for edit pairs: the source file",
    "kind": "image | video | image_edit | video_edit (true kind for mislabelled files)",
    "expect": "valid | error: whether the file should decode",
    "format": "jpeg | png | webp | mp4 | mkv | None (true content format, not the extension)",
    "claimed_kind": "kind implied by the file extension",
    "true_kind": "image | video | None: what the bytes really are (None: not media at all)",
    "corrupt": "truncated | empty | random_bytes | header_only | None",
    "expect_filtered": "reasons a sane profile should drop it: aspect_ratio, too_small, too_short",
    "duplicate_of": "path of the item this one is a near-duplicate of",
    "width": "stored width in pixels",
    "height": "stored height in pixels",
    "display_width": "width after applying rotation metadata",
    "display_height": "height after applying rotation metadata",
    "mode": "PIL mode of an image (RGB, RGBA, L)",
    "fps": "frames per second",
    "num_frames": "number of encoded frames",
    "duration": "seconds = num_frames / fps",
    "codec": "FFmpeg decoder name (h264, mpeg4)",
    "container": "mp4 | matroska",
    "rotation": "display rotation in degrees, counter-clockwise (PyAV VideoFrame.rotation)",
    "motion": "static (0 px/frame) | slow (1-3) | fast (>= 6) | None: camera motion class",
    "pan_px_per_frame": "magnitude of the global translation between consecutive frames",
    "pan_vector": "[dx, dy] content displacement per frame in pixels",
    "cuts_s": "hard cut times in seconds",
    "cut_frames": "index of the first frame of each new scene",
    "has_text": "burned-in text (captions, subtitles); watermark text does not count",
    "text": "list of the burned-in strings, aligned with text_boxes",
    "text_boxes": "list of boxes, one per string",
    "text_segments": "video subtitles: [{text, start_s, end_s, start_frame, end_frame, box}]",
    "has_watermark": "semi-transparent overlay logo present",
    "watermark_box": "box of the overlay",
    "watermark_alpha": "overlay opacity",
    "watermark_text": "logo text, None for a shape-only logo",
    "source": "edit pair: source file",
    "target": "edit pair: target file",
    "instruction": "edit pair: instruction (None when missing)",
    "edit_box": "edit pair: region the edit changes, None for global edits",
    "source_size": "edit pair: [width, height] of the source",
    "target_size": "edit pair: [width, height] of the target",
    "expect_pair_ok": "edit pair: should pass all pair checks",
    "expect_pair_failures": "edit pair: checks it fails: identical, aspect_mismatch, "
    "no_instruction, kind_mismatch",
    "size_bytes": "file size (source file for edit pairs)",
    "sha256": "hex digest of the file (source file for edit pairs)",
}


def record(**fields: Any) -> dict[str, Any]:
    """Build a label with every schema field present; unknown names are a bug, so they raise."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise KeyError(f"unknown label fields: {sorted(unknown)}")
    out: dict[str, Any] = dict.fromkeys(FIELDS)
    out["expect"] = "valid"
    out["expect_filtered"] = []
    out.update(fields)
    return out


def media_fields(has_text: bool = False, has_watermark: bool = False) -> dict[str, Any]:
    """Defaults that apply to any decodable image/video (as opposed to edits and junk)."""
    return {
        "has_text": has_text,
        "text": [],
        "text_boxes": [],
        "has_watermark": has_watermark,
    }


def file_digest(root: Path, rel: str) -> dict[str, Any]:
    data = (root / rel).read_bytes()
    return {"size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    # Fixed separators and no trailing spaces: the file must be byte-identical across runs.
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_labels(out_dir: Path | str) -> list[dict[str, Any]]:
    """Read ``labels.jsonl`` written by :func:`curation.sample_data.generate`."""
    return read_jsonl(Path(out_dir) / LABELS_FILE)


def load_edits(out_dir: Path | str) -> list[dict[str, Any]]:
    """Read the ``edits.jsonl`` pair manifest."""
    return read_jsonl(Path(out_dir) / EDITS_FILE)
