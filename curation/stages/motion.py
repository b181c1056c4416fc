"""Camera / subject motion of a video clip from dense optical flow between its sampled frames.

Unit: **fraction of the frame diagonal per second**. For each pair of consecutive sampled
frames, ``mean |flow| / frame diagonal / dt`` where ``dt`` is the time between the two frames
(``frame_times``). The frames stage spreads its samples over the whole clip, so the raw
displacement between two samples grows with the sampling gap; dividing by ``dt`` makes the
score independent of how many frames were sampled and of the clip length. The diagonal is the
one of the downscaled frame the flow is computed on, so the score does not depend on the
resolution either. A pan of ``p`` pixels per frame at ``fps`` on a ``W x H`` video scores
``p * fps / hypot(W, H)``: 1 px/frame at 24 fps on 480x270 is ``0.044``.

Columns: ``motion`` (mean over the pairs), ``motion_min``, ``motion_max``. Stills (``image``,
``image_edit``) and clips with fewer than two frames (or no two frames with increasing
times) get ``None``. ``video_edit`` rows are scored on their source frames (``frames``):
the pair's motion is the input's (an edit keeps the target's camera motion in step).

Large displacements: samples of a clip can be far apart (8 samples over a 4 s clip are ~0.5 s
apart, a fast pan moves the content by ~100 px between them), beyond what coarse-to-fine flow
tracks reliably: on the two fast pans of the sample corpus, plain DIS reported 48-76 % of the
true speed and Farneback 8-13 % (and only ~50-60 % of the slow pans: flat sky gives it no
texture to follow, so its flow there stays near zero). Each pair is therefore first aligned by
its dominant translation (phase correlation; several peaks are tried and the one that best
explains the pair wins, so a static overlay such as subtitles does not hide the pan), the flow
is computed on the aligned pair and the translation added back; only the area both frames see
is averaged. Both algorithms then agree with the known pans within ~10 %.

Limits: displacements beyond ~half the frame between two samples alias in phase correlation,
and content that changes completely between samples (long clips: 8 samples over a 60 s clip
are 7.5 s apart; fast non-rigid motion) has no correspondence at all, so the score then
measures "how different", not "how far". Hard cuts inside a clip give large per-pair values
(``motion_max``); the split stage cuts scenes before this stage runs.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from catalog.schema import VIDEO_KINDS
from curation.config import MotionConfig
from curation.media import as_frames
from curation.shift import dominant_shift, overlap

from .base import Resources, Row, SampleError, Stage

MOTION_COLUMNS = ("motion", "motion_min", "motion_max")

# Farneback with the parameters of OpenCV's optical-flow tutorial (pyr_scale, levels,
# winsize, iterations, poly_n, poly_sigma, flags).
FARNEBACK_PARAMS = (0.5, 3, 15, 3, 5, 1.2, 0)

# Global-translation search: candidate peaks of the phase correlation tried per pair, and the
# smallest share of the frame two aligned frames must still have in common.


def to_flow_gray(rgb: np.ndarray, short_side: int) -> np.ndarray:
    """RGB frame -> gray uint8 whose short side is ``short_side`` (never upscaled)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    scale = short_side / min(h, w)
    if scale >= 1:
        return gray
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


class MotionStage(Stage):
    """Optical-flow motion score of video clips (see the module docstring for the unit)."""

    name = "motion"
    reads_frames = True
    resources = Resources(cpus=1)
    batch_size = 4  # per-clip optical flow: small batches spread clips over the CPUs
    uses_model = False

    def __init__(self, cfg: MotionConfig):
        self.algorithm = cfg.algorithm
        self.short_side = cfg.short_side
        self._dis: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_dis"] = None  # OpenCV objects do not pickle; rebuilt in setup()
        return state

    def setup(self) -> None:
        if self.algorithm == "dis" and self._dis is None:
            # MEDIUM rather than FAST: frames are only short_side (128) px high, so a pair costs
            # a few ms either way, and MEDIUM (finer finest scale, denser patches, more
            # iterations) tracks large displacements better: without the pre-alignment below,
            # FAST gave 0.21 / 0.08 and MEDIUM 0.26 / 0.19 on the two fast sample pans (true
            # 0.35 / 0.40); with it both are within 1 % there and MEDIUM costs ~3 ms a pair.
            self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Dense flow (H, W, 2) from gray ``a`` to gray ``b`` with the configured algorithm."""
        if self.algorithm == "dis":
            self.setup()
            return self._dis.calc(a, b, None)
        return cv2.calcOpticalFlowFarneback(a, b, None, *FARNEBACK_PARAMS)

    def pair_displacement(self, a: np.ndarray, b: np.ndarray) -> float:
        """Mean flow magnitude in pixels between two gray frames of the same size."""
        d = dominant_shift(a, b)
        if d == (0, 0):
            f = self.flow(a, b)
            return float(np.mean(np.hypot(f[..., 0], f[..., 1])))
        h, w = a.shape
        # aligned(x) = b(x + d): the flow on (a, aligned) is the residual around the shift.
        m = np.float32([[1, 0, -d[0]], [0, 1, -d[1]]])
        aligned = cv2.warpAffine(
            b, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE
        )
        f = self.flow(a, aligned)
        ys, xs = overlap(a.shape, d)
        fx, fy = f[ys, xs, 0] + d[0], f[ys, xs, 1] + d[1]
        return float(np.mean(np.hypot(fx, fy)))

    def pair_motions(self, frames: list[np.ndarray], times: list[float]) -> list[float]:
        """Per-pair motion (frame diagonals per second) of consecutive RGB frames."""
        grays = [to_flow_gray(f, self.short_side) for f in frames]
        h, w = grays[0].shape
        grays = [
            g if g.shape == (h, w) else cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA)
            for g in grays
        ]
        diagonal = float(np.hypot(h, w))
        values = []
        for i in range(len(grays) - 1):
            dt = float(times[i + 1]) - float(times[i])
            if not dt > 0:  # repeated samples of a very short clip, or bad times
                continue
            values.append(self.pair_displacement(grays[i], grays[i + 1]) / diagonal / dt)
        return values

    def process_row(self, row: Row) -> Row:
        out = dict(row)
        out.update(dict.fromkeys(MOTION_COLUMNS))
        if row.get("kind") not in VIDEO_KINDS:
            return out
        data = row.get("frames") or []
        if len(data) < 2:
            return out
        times = row.get("frame_times")
        if times is None or len(times) != len(data):
            raise SampleError(
                "bad_frame_times",
                f"{len(data)} frames but frame_times is {times!r:.80}",
            )
        values = self.pair_motions(as_frames(data), list(times))
        if values:
            out.update(
                motion=float(np.mean(values)), motion_min=min(values), motion_max=max(values)
            )
        return out
