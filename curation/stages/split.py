"""Scene split: one clip row per scene of each video (PySceneDetect's content detector).

Only ``kind == "video"`` rows are split; images and edit pairs pass through unchanged (an edit
pair is one sample whatever its length). Cuts come from ``ContentDetector`` at
``split.threshold`` on frames downscaled to about ``DETECT_WIDTH`` pixels wide; scenes longer
than ``split.max_clip_s`` are cut into consecutive strides of that length (the last one is the
remainder). Every scene becomes a clip, short ones included: ``select`` rejects clips shorter
than ``split.min_clip_s`` with ``too_short``, so they stay visible in the index.

Clip boundaries live on the probed frame grid: frame ``i`` starts at ``i / fps``, a clip
``[start, end)`` holds frames ``round(start * fps)`` to ``round(end * fps) - 1``, and
``num_frames`` / ``duration`` describe that span.

Reason tag: ``split_failed`` (the detector could not read a video that probed fine).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

from catalog.schema import make_key
from curation.config import CurationConfig
from curation.media import local_path
from curation.stages.base import Resources, Row, SampleError, Stage

DETECT_WIDTH = 256  # detection works on frames about this wide (PySceneDetect's own default)
BACKENDS = ("opencv", "pyav")  # OpenCV is faster; PyAV reads what OpenCV's FFmpeg cannot

logger = logging.getLogger(__name__)


def detect_cuts(path: str, threshold: float) -> tuple[list[float], int]:
    """Hard cut times (seconds, where each new scene starts) and the number of frames read.

    Tries the OpenCV backend, then PyAV. Raises the last backend's error when none works.
    """
    import scenedetect
    from scenedetect import ContentDetector, SceneManager

    errors = []
    for backend in BACKENDS:
        try:
            # suppress_output: the PyAV backend would otherwise turn FFmpeg logging on globally.
            extra = {"suppress_output": True} if backend == "pyav" else {}
            video = scenedetect.open_video(path, backend=backend, **extra)
            manager = SceneManager()
            manager.add_detector(ContentDetector(threshold=threshold))
            manager.auto_downscale = False
            manager.downscale = max(1, video.frame_size[0] // DETECT_WIDTH)
            frames_read = manager.detect_scenes(video=video)
            if frames_read <= 0:
                raise RuntimeError("no frame decoded")
            scenes = manager.get_scene_list(start_in_scene=True)
            return [start.seconds for start, _ in scenes[1:]], frames_read
        except Exception as e:  # VideoOpenFailure, decoder errors...
            errors.append(f"{backend}: {type(e).__name__}: {e}")
            logger.debug("scene detection with %s failed on %s: %s", backend, path, e)
    raise RuntimeError("; ".join(errors))


def scene_bounds(cut_frames: list[int], num_frames: int, max_len: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges: scenes between cuts, each cut into strides of ``max_len``."""
    edges = [0, *sorted({c for c in cut_frames if 0 < c < num_frames}), num_frames]
    bounds = []
    for a, b in zip(edges, edges[1:], strict=False):
        for s in range(a, b, max_len):
            bounds.append((s, min(s + max_len, b)))
    return bounds


class SceneSplitStage(Stage):
    """Split each video row into clip rows (``span``, ``parent_key``, per-clip key)."""

    name: ClassVar[str] = "split"
    resources: ClassVar[Resources] = Resources(cpus=1)
    batch_size: ClassVar[int] = 4
    uses_model: ClassVar[bool] = False

    def __init__(self, cfg: CurationConfig):
        self.enabled = cfg.split.enabled
        self.threshold = cfg.split.threshold
        self.max_clip_s = cfg.split.max_clip_s

    def process_row(self, row: Row) -> Row | list[Row]:
        if row.get("kind") != "video":
            return row
        fps = row.get("fps")
        num_frames = row.get("num_frames")
        cut_times: list[float] = []
        if self.enabled:
            try:
                cut_times, frames_read = detect_cuts(local_path(row["source_uri"]), self.threshold)
            except Exception as e:
                raise SampleError("split_failed", str(e)) from e
            if not num_frames:
                num_frames = frames_read
        if not fps or not num_frames:
            raise SampleError("split_failed", f"no frame rate / frame count (fps={fps})")
        fps = float(fps)
        cut_frames = [round(t * fps) for t in cut_times]
        max_len = max(1, math.floor(self.max_clip_s * fps + 1e-6))
        clips = []
        for f0, f1 in scene_bounds(cut_frames, int(num_frames), max_len):
            start, end = f0 / fps, f1 / fps
            clip = dict(row)
            clip.update(
                parent_key=row["key"],
                span={"start": start, "end": end},
                key=make_key(row["source_uri"], (start, end)),
                num_frames=f1 - f0,
                duration=end - start,
            )
            clips.append(clip)
        return clips
