"""Scene split: one clip row per shot of each video (hard cuts and gradual transitions).

Only ``kind == "video"`` rows are split; images, edit pairs and the videos of conversation
records pass through unchanged (an edit pair is one sample whatever its length, and a
conversation is about the whole video). Cuts come from PySceneDetect's content detector at
``split.threshold`` on frames scaled to ``DETECT_WIDTH`` pixels wide; with ``split.gradual``,
cross-dissolves and fades come from ``curation.transitions`` on the same frames, and their
frames are dropped from both neighbouring clips (``split.drop_transitions``; otherwise the
clips meet at the transition's middle). Scenes longer than ``split.max_clip_s`` are cut into
consecutive strides of that length (the last one is the remainder). Each clip records how its
two ends were found in ``boundaries`` (``{start, end}``: ``video`` for the video's own first
or last frame, ``cut``, ``dissolve``, ``fade`` or ``stride``). Every scene becomes a clip,
short ones included: ``select`` rejects clips shorter than ``split.min_clip_s`` with
``too_short``, so they stay visible in the index.

Each video is decoded once (``curation.scan``): the pass that looks for cuts also samples the
frames of every clip (``frames``, ``frame_times``, ``frames_decoder`` = ``pyav``) when the
stage is built with the frame settings, so the frame stage has nothing left to decode for
them. A video PyAV cannot decode from the start goes through PySceneDetect's own video
backends instead (OpenCV, then PyAV): hard cuts only, and its clips are sampled by the frame
stage.

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
from core.weights import LocalWeights
from curation import transnet
from curation.config import FramesConfig, SplitConfig
from curation.media import FRAME_MAX_SIDE, local_path
from curation.scan import DETECT_WIDTH, Boundary, Clip, Sampling, clip_bounds, scan_video
from curation.stages.base import Resources, Row, SampleError, Stage
from curation.transitions import GradualDetector

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
    cuts = [Boundary(c, c, "cut") for c in sorted(set(cut_frames)) if start < c < num_frames]
    return [(c.start, c.end) for c in clip_bounds(cuts, num_frames, max_len, start)]


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
        self.gradual = cfg.gradual
        self.drop_transitions = cfg.drop_transitions
        self.transnet = cfg.transnet
        self.transnet_weights = cfg.transnet_weights
        self.transnet_threshold = cfg.transnet_threshold
        self.model = None  # TransNetV2, loaded by setup() when split.transnet is on
        self.max_clip_s = cfg.max_clip_s
        # with the frame settings, the scan samples every clip's frames too
        self.num_frames = frames.num_frames if frames is not None else None
        self.max_side = max_side

    def required_files(self) -> list[LocalWeights]:
        if not (self.enabled and self.transnet):
            return []
        path = transnet.weights_path(self.transnet_weights)
        return [LocalWeights(path, "TransNetV2 weights (split.transnet)", transnet.HOW_TO_GET)]

    def setup(self) -> None:
        if self.enabled and self.transnet and self.model is None:
            self.model = transnet.load_model(self.transnet_weights)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None}  # workers load their own (setup)

    def _detect(self, row: Row, fps: float, total: int, max_len: int):
        """(clips, frames read, samples by clip bounds) of one video."""
        path = local_path(row["source_uri"])
        sampling = None
        if self.num_frames is not None and row.get("width") and row.get("height"):
            display = (int(row["width"]), int(row["height"]))
            rotation = int(row.get("rotation") or 0)
            sampling = Sampling(self.num_frames, self.max_side, display, rotation)
        gradual = GradualDetector(fps) if self.gradual else None
        learned = None
        if self.transnet:
            self.setup()
            learned = transnet.TransNetDetector(self.model, fps, self.transnet_threshold)
        try:
            scan = scan_video(
                path, fps, total or None, self.threshold, max_len, sampling, gradual,
                self.drop_transitions, learned,
            )  # fmt: skip
            return scan.clips, scan.frames_read, scan.samples
        except Exception as e:  # PyAV cannot read it from the start: PySceneDetect's backends
            logger.info("one-pass scan of %s failed (%s): detecting with PySceneDetect", path, e)
        try:
            cut_times, frames_read = detect_cuts(path, self.threshold)
        except Exception as e:
            raise SampleError("split_failed", str(e)) from e
        cuts = [Boundary(round(t * fps), round(t * fps), "cut") for t in cut_times]
        return clip_bounds(cuts, total or frames_read, max_len), frames_read, {}

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
        found: list[Clip] | None = None
        samples: dict = {}
        if self.enabled:
            found, frames_read, samples = self._detect(row, fps, num_frames, max_len)
            if num_frames <= 0:
                num_frames = frames_read
        if num_frames <= 0:
            shown = row.get("num_frames")
            raise SampleError("split_failed", f"no frame count (num_frames={shown})")
        clips = []
        for found_clip in found if found is not None else clip_bounds([], num_frames, max_len):
            f0, f1 = found_clip.start, found_clip.end
            start, end = f0 / fps, f1 / fps
            clip = dict(row)
            clip.update(
                parent_key=row["key"],
                span={"start": start, "end": end},
                key=make_key(row["source_uri"], (start, end)),
                num_frames=f1 - f0,
                duration=(f1 - f0) / fps,
                boundaries={"start": found_clip.start_by, "end": found_clip.end_by},
            )
            if (f0, f1) in samples:
                frames, indices = samples[f0, f1]
                times = [max(0.0, i / fps - start) for i in indices]
                clip.update(frames=frames, frame_times=times, frames_decoder="pyav")
            clips.append(clip)
        return clips
