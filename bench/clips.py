"""The fixed clip set of P1 / P1-peer: deterministic synthetic videos plus the real test clips.

Full set: the sample corpus's eleven videos (``curation.sample_data.videos``: static, slow and
fast pans, hard cuts, subtitles, a watermark, 9:16, 1 s, Matroska, MPEG-4 Part 2, rotation
metadata; seed 0) plus three real clips of ``tests/data`` (1080p, 480x320 and 320x240
H.264): 14 clips, about 56 s of video. Sized so that P1 fits the 20-minute budget of
``make bench`` on 2 CPUs. Quick set: four synthetic videos of seed 0. Generated once into
``bench/work/`` (same seed, same bytes) and reused. The large set (P1, P1-resume): the clip
set ``COPIES`` times under other names, hard links, so the page cache is shared.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from bench.harness import REPO, log

# tests/data's cockatoo_9s.mp4 (720p, 9 s) is left out: with it P1 + P1-peer alone pass the
# 20-minute budget of `make bench` on 2 CPUs.
REAL_CLIPS = ("counter.mp4", "fades.mp4", "realshort.mp4")
QUICK_SPECS = ("pan_slow_480x270", "cuts_480x270", "subtitles_480x270", "static_320x180")
COPIES = 8  # the large set: the clip set this many times


def clip_set(work: Path, quick: bool) -> tuple[Path, list[dict[str, Any]]]:
    """(input folder, [{path, duration, width, height, frames}]) of the fixed clip set."""
    root = work / ("clips-quick" if quick else "clips")
    manifest = root / "clips.json"
    if manifest.exists():
        return root / "inputs", json.loads(manifest.read_text())
    from curation.sample_data.videos import VIDEOS, write_video

    inputs = root / "inputs"
    shutil.rmtree(root, ignore_errors=True)
    inputs.mkdir(parents=True)
    log(f"  generating the clip set in {root} (once)")
    for spec in VIDEOS:
        if quick and spec.name not in QUICK_SPECS:
            continue
        rel = f"synthetic/{spec.name}.{spec.path.rsplit('.', 1)[1]}"
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(inputs, rel, spec, 0)
    if not quick:
        (inputs / "real").mkdir()
        for name in REAL_CLIPS:
            shutil.copyfile(REPO / "tests" / "data" / name, inputs / "real" / name)
    clips = [describe(p) for p in sorted(inputs.rglob("*")) if p.is_file()]
    manifest.write_text(json.dumps(clips, indent=1))
    return inputs, clips


def describe(path: Path) -> dict[str, Any]:
    from curation.config import ProbeConfig
    from curation.probing import probe_file

    meta = probe_file(str(path), ProbeConfig())
    return {
        "path": str(path),
        "duration": meta["duration"],
        "width": meta["width"],
        "height": meta["height"],
        "frames": meta["num_frames"],
        "fps": meta["fps"],
    }


def totals(clips: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "clips": len(clips),
        "video_seconds": round(sum(c["duration"] for c in clips), 3),
        "frames": sum(c["frames"] for c in clips),
        "megapixels": round(sum(c["frames"] * c["width"] * c["height"] for c in clips) / 1e6, 1),
    }


def large_set(inputs: Path, copies: int = COPIES) -> Path:
    """``copies`` hard-linked copies of the clip set under other names (made once)."""
    root = inputs.parent.parent / f"{inputs.parent.name}-x{copies}" / "inputs"
    if root.exists():
        return root
    tmp = root.with_name("inputs.tmp")
    for i in range(copies):
        for p in sorted(inputs.rglob("*")):
            if p.is_file():
                dst = tmp / f"copy{i}" / p.relative_to(inputs)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, dst)
    tmp.rename(root)
    return root
