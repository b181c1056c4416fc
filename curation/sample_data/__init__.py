"""Deterministic synthetic media corpus with known properties (the ground truth for curation).

``generate(out_dir, seed)`` writes::

    images/        stills: aspect ratios 1:4 .. 3:1, JPEG/PNG/WebP, text, watermarks, a duplicate
    videos/        clips: static, slow/fast pans, hard cuts, subtitles, overlay logo, 9:16,
                   1 s, Matroska, MPEG-4 Part 2 at 30 fps, 90-degree rotation metadata
    edits/image/   instruction-edit pairs (sources and targets) ...
    edits/video/   ... including one negative per pair check
    corrupt/       truncated, empty, random, header-only and mislabelled files
    labels.jsonl   one record per item, every field of ``labels.FIELDS`` present
    edits.jsonl    {"source", "target", "instruction"?, "kind"} per edit pair

Same seed => byte-identical files (single-threaded encoders, x264's CPU-independent
macroblock tree, bit-exact muxing, no timestamps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .corrupt import write_corrupt
from .edits import write_edits
from .images import write_images
from .labels import EDITS_FILE, FIELDS, LABELS_FILE, load_edits, load_labels, write_jsonl
from .videos import write_videos

__all__ = ["EDITS_FILE", "FIELDS", "LABELS_FILE", "generate", "load_edits", "load_labels"]

SUBDIRS = ("images", "videos", "edits/image", "edits/video", "corrupt")


def generate(out_dir: Path | str, seed: int = 0) -> list[dict[str, Any]]:
    """Write the corpus under ``out_dir`` and return the labels (also in ``labels.jsonl``).

    Existing files with the same names are overwritten; nothing else in ``out_dir`` is touched.
    """
    root = Path(out_dir)
    for sub in SUBDIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)

    labels = write_images(root, seed)
    labels += write_videos(root, seed)
    edit_labels, manifest = write_edits(root, seed)
    labels += edit_labels
    labels += write_corrupt(root, seed)

    ids = [lab["id"] for lab in labels]
    if len(set(ids)) != len(ids):
        raise AssertionError(f"duplicate label ids: {sorted(i for i in ids if ids.count(i) > 1)}")
    write_jsonl(root / LABELS_FILE, labels)
    write_jsonl(root / EDITS_FILE, manifest)
    return labels
