"""Scene split: one clip row per scene of each video (PySceneDetect's content detector).

Only ``kind == "video"`` rows are split; images, edit pairs and the videos of conversation
records pass through unchanged (an edit pair is one sample whatever its length, and a
conversation is about the whole video). Cuts come from PySceneDetect's content detector at
``split.threshold`` on frames scaled to ``DETECT_WIDTH`` pixels wide; scenes longer
than ``split.max_clip_s`` are cut into consecutive strides of that length (the last one is the
remainder). Every scene becomes a clip, short ones included: ``select`` rejects clips shorter
than ``split.min_clip_s`` with ``too_short``, so they stay visible in the index.

Each video is decoded once (``curation.scan``): the pass that looks for cuts also samples the
frames of every clip (``frames``, ``frame_times``, ``frames_decoder`` = ``pyav``) when the
stage is built with the frame settings, so the frame stage has nothing left to decode for
them. A video PyAV cannot decode from the start goes through PySceneDetect's own video
backends instead (OpenCV, then PyAV), and its clips are sampled by the frame stage.

Clip boundaries live on the probed frame grid: frame ``i`` starts at ``i / fps``, a clip
``[start, end)`` holds frames ``round(start * fps)`` to ``round(end * fps) - 1``, and
``num_frames`` / ``duration`` describe that span. A stride is the largest whole number of
frames whose duration ``frames / fps`` is at most ``split.max_clip_s``, so no clip is longer
than ``split.max_clip_s``, and no clip ends after the row's ``num_frames`` (the frame count the
probe measured from the packets), so none extends past the real end of the video.

Reason tag: ``split_failed`` (the detector could not read a video that probed fine, the row
has no frame rate / frame count, or one frame lasts longer than ``split.max_clip_s``).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

from catalog.schema import make_key
from curation.config import FramesConfig, SplitConfig
from curation.media import FRAME_MAX_SIDE, local_path
from curation.scan import DETECT_WIDTH, Sampling, scan_video
from curation.stages.base import Resources, Row, SampleError, Stage

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


def stride_frames(max_clip_s: float, fps: float) -> int:
    """The most frames a clip may hold: the largest ``n`` with ``n / fps <= max_clip_s``.

    Evaluated in floating point exactly as clip durations are (``frames / fps``), so rounding
    can never make a stride a hair longer than ``max_clip_s``. 0 when one frame is longer.
    """
    n = math.floor(max_clip_s * fps)
    while (n + 1) / fps <= max_clip_s:
        n += 1
    while n > 0 and n / fps > max_clip_s:
        n -= 1
    return n


def scene_bounds(
    cut_frames: list[int], num_frames: int, max_len: int, start: int = 0
) -> list[tuple[int, int]]:
    """[start, end) frame ranges from ``start`` to ``num_frames``: scenes between cuts, each cut
    into strides of ``max_len``."""
    edges = [start, *sorted({c for c in cut_frames if start < c < num_frames}), num_frames]
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

    def __init__(
        self, cfg: SplitConfig, frames: FramesConfig | None = None, max_side: int = FRAME_MAX_SIDE
    ):
        self.enabled = cfg.enabled
        self.threshold = cfg.threshold
        self.max_clip_s = cfg.max_clip_s
        # with the frame settings, the scan samples every clip's frames too
        self.num_frames = frames.num_frames if frames is not None else None
        self.max_side = max_side

    def _detect(self, row: Row, fps: float, total: int, max_len: int):
        """(cut frame numbers, frames read, samples by clip bounds) of one video."""
        path = local_path(row["source_uri"])
        sampling = None
        if self.num_frames is not None and row.get("width") and row.get("height"):
            display = (int(row["width"]), int(row["height"]))
            rotation = int(row.get("rotation") or 0)
            sampling = Sampling(self.num_frames, self.max_side, display, rotation)
        try:
            scan = scan_video(path, fps, total or None, self.threshold, max_len, sampling)
            return scan.cuts, scan.frames_read, scan.samples
        except Exception as e:  # PyAV cannot read it from the start: PySceneDetect's backends
            logger.info("one-pass scan of %s failed (%s): detecting with PySceneDetect", path, e)
        try:
            cut_times, frames_read = detect_cuts(path, self.threshold)
        except Exception as e:
            raise SampleError("split_failed", str(e)) from e
        return [round(t * fps) for t in cut_times], frames_read, {}

    def process_row(self, row: Row) -> Row | list[Row]:
        if row.get("kind") != "video" or row.get("conversation") is not None:
            return row  # a conversation is about its whole video: never cut
        fps = float(row.get("fps") or 0.0)
        num_frames = int(row.get("num_frames") or 0)
        if not (fps > 0 and math.isfinite(fps)):  # checked before decoding anything
            raise SampleError("split_failed", f"no frame rate (fps={row.get('fps')})")
        max_len = stride_frames(self.max_clip_s, fps)
        if max_len < 1:
            raise SampleError(
                "split_failed",
                f"one frame lasts {1 / fps:.3g} s (fps={fps:.4g}) > split.max_clip_s "
                f"({self.max_clip_s})",
            )
        cut_frames: list[int] = []
        samples: dict = {}
        if self.enabled:
            cut_frames, frames_read, samples = self._detect(row, fps, num_frames, max_len)
            if num_frames <= 0:
                num_frames = frames_read
        if num_frames <= 0:
            shown = row.get("num_frames")
            raise SampleError("split_failed", f"no frame count (num_frames={shown})")
        clips = []
        for f0, f1 in scene_bounds(cut_frames, num_frames, max_len):
            start, end = f0 / fps, f1 / fps
            clip = dict(row)
            clip.update(
                parent_key=row["key"],
                span={"start": start, "end": end},
                key=make_key(row["source_uri"], (start, end)),
                num_frames=f1 - f0,
                duration=(f1 - f0) / fps,
            )
            if (f0, f1) in samples:
                frames, indices = samples[f0, f1]
                times = [max(0.0, i / fps - start) for i in indices]
                clip.update(frames=frames, frame_times=times, frames_decoder="pyav")
            clips.append(clip)
        return clips
