"""watermark: watermark probability from a CLIP-embedding head, and a static-overlay cue.

``watermark`` (0-1): ``WatermarkHead`` (``curation.heads``) on the L2-normalised CLIP
embedding of each scored frame; images take their frame, video clips the **maximum** over
their sampled frames (one frame showing a logo is enough), edit pairs both sides
(see ``stages/clip_head.py``). The CLIP model is the one of the ``aesthetic`` section
(``clip_model`` / ``clip_weights``): both scorers embed the same frames the same way, so when
the aesthetic stage ran first its ``clip_embedding`` column is reused (the key says which
model / weights / view made it) and this stage never loads CLIP at all; rows without a
matching embedding are embedded here (CLIP is then loaded on first use). The head file is
``watermark/<ARCH>-watermark-head.safetensors`` in the models dir or ``watermark.head_weights``.

``watermark_static`` (0-1, videos only, when ``watermark.static_overlay``): a burned-in logo
stays put while the camera moves. Per pair of consecutive sampled frames (grey, long side at
most 480 px, Gaussian sigma 1):

1. the dominant translation ``d`` is estimated (phase correlation: the strongest peaks and no
   shift are tried; the one with the lowest mean absolute difference on the shared area wins);
2. ``S = min(G_a(x), G_b(x))``: edge strength (Sobel magnitude, grey levels per pixel) that
   persists *in place*; ``M = min(G_a(x), G_b(x + d))``: edge strength that persists *along
   the camera motion*. A pixel votes "static" when ``S >= 4`` and ``S >= 2 M``: a logo edge
   stays where it is, a scene edge moves with the scene (edges parallel to the motion satisfy
   both and are not counted).

Pixels voting static in at least 2/3 of the pairs form the static mask; a morphological
closing (2 % of the long side) turns logo strokes into blobs and blobs under 0.05 % of the
frame are dropped. The score is the fraction of static pixels in the densest window of a
quarter of the frame's width by a quarter of its height: a corner logo fills a large part of
such a window (the synthetic logo video scores ~0.3), scattered coincidences do not (pans
score 0; burned-in subtitles, whose text changes, ~0.08).

The cue needs the frame as a whole to move: when no pair shows a translation of at least one
pixel (a static camera, a locked-off shot with moving subjects, a pure zoom), a logo cannot be
told from the static scene behind it and ``watermark_static`` is **null** (not measurable;
select lets nulls pass) rather than 0 (which would claim "no overlay"). Images and clips with
fewer than two frames get null as well.

Reason tags: ``decode_error``, ``watermark_failed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from catalog.schema import VIDEO_KINDS
from core.weights import WeightsError, resolve_weights
from curation.config import WatermarkConfig
from curation.shift import dominant_shift, overlap, shifted
from curation.weights import ClipSpec, watermark_head_relative

from .base import SampleError
from .clip_head import ClipHeadStage, FrameBatch

# Static-overlay cue (see the module docstring).
STATIC_MAX_SIDE = 480  # frames are downscaled so the long side is at most this
STATIC_BLUR_SIGMA = 1.0
STATIC_EDGE_MIN = 4.0  # grey levels per pixel a persistent edge must keep
STATIC_MOTION_RATIO = 2.0  # in-place persistence must beat persistence along the motion by this
STATIC_VOTE = 2 / 3  # share of moving pairs a pixel must be static in
STATIC_CLOSE = 0.02  # closing kernel, share of the long side
STATIC_MIN_BLOB = 0.0005  # smallest blob kept, share of the frame area
STATIC_WINDOW = 4  # the window is frame width / 4 by frame height / 4


def _grey(rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = g.shape
    if size is None:
        scale = STATIC_MAX_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else (w, h)
    if (w, h) != size:
        g = cv2.resize(g, size, interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(g.astype(np.float32), (0, 0), STATIC_BLUR_SIGMA)


def _edges(g: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.magnitude(gx, gy) / 8.0  # a ramp of s grey levels per pixel -> s


def static_overlay_score(frames: list[np.ndarray]) -> float | None:
    """``watermark_static`` of a clip's sampled RGB frames (module docstring); None when the
    frame as a whole never moves or there are fewer than two frames."""
    if len(frames) < 2:
        return None
    first = _grey(frames[0], None)
    h, w = first.shape
    if min(h, w) < 16:
        return None
    greys = [first] + [_grey(f, (w, h)) for f in frames[1:]]
    edges = [_edges(g) for g in greys]
    votes = np.zeros((h, w), np.int32)
    moving = 0
    for i in range(len(greys) - 1):
        d = dominant_shift(greys[i], greys[i + 1])
        if d == (0, 0):
            continue  # no camera motion in this pair: it cannot tell overlay from scene
        moving += 1
        in_place = np.minimum(edges[i], edges[i + 1])
        along = np.zeros_like(in_place)
        region = overlap((h, w), d)
        if region is not None:
            along[region] = np.minimum(edges[i][region], shifted(edges[i + 1], region, d))
        votes += (in_place >= STATIC_EDGE_MIN) & (in_place >= STATIC_MOTION_RATIO * along)
    if not moving:
        return None
    mask = (votes >= np.ceil(STATIC_VOTE * moving)).astype(np.uint8)
    k = max(3, round(STATIC_CLOSE * max(h, w)))
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    )
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < STATIC_MIN_BLOB * h * w)
    mask[np.isin(labels, small[small > 0])] = 0
    wh, ww = max(1, h // STATIC_WINDOW), max(1, w // STATIC_WINDOW)
    ii = cv2.integral(mask, sdepth=cv2.CV_64F)
    sums = ii[wh:, ww:] - ii[:-wh, ww:] - ii[wh:, :-ww] + ii[:-wh, :-ww]
    return float(np.clip(sums.max() / (wh * ww), 0.0, 1.0))


class WatermarkStage(ClipHeadStage):
    """Watermark probability (+ static-overlay cue for videos); see the module docstring."""

    name: ClassVar[str] = "watermark"

    def __init__(
        self,
        cfg: WatermarkConfig,
        clip: ClipSpec,
        models_dir: Path | str | None = None,
        batch_size: int = ClipHeadStage.batch_size,
    ):
        head = resolve_weights(cfg.head_weights, watermark_head_relative(clip.arch), models_dir)
        super().__init__(clip, head, batch_size)
        self.static_overlay = cfg.static_overlay
        self.head_what = f"watermark head for {clip.arch}"  # type: ignore[misc]

    def head_how(self) -> str:
        return (
            "no public head exists in this format: fit one on CLIP embeddings of labelled "
            "watermarked / clean frames with curation.heads.fit_watermark_head(...)"
            f".save('{self.head_path}') (ClipEmbedder.embed gives the embeddings), or set "
            "watermark.head_weights"
        )

    def load_head(self) -> Any:
        from curation.heads import WatermarkHead  # torch: on the worker, not the driver

        head = WatermarkHead.load(self.head_path)
        if head.clip_model is not None and head.clip_model != self.clip.arch:
            raise WeightsError(
                f"watermark head {self.head_path} was fitted on {head.clip_model} embeddings, "
                f"the configured CLIP model is {self.clip.arch}"
            )
        return head

    def score(self, batch: FrameBatch, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"watermark": None, "watermark_static": None}
        emb = batch.embeddings.get(i)
        if emb is not None:
            probs = self.head.probability(emb)  # a size mismatch raises: config error
            if not np.all(np.isfinite(probs)):
                raise SampleError(f"{self.name}_failed", f"non-finite probabilities {probs}")
            out["watermark"] = float(np.clip(probs.max(), 0.0, 1.0))  # max over frames
        frames = batch.frames.get(i)
        if self.static_overlay and batch.rows[i].get("kind") in VIDEO_KINDS and frames:
            try:
                out["watermark_static"] = static_overlay_score(frames)
            except Exception as e:
                raise SampleError(
                    f"{self.name}_failed", f"static overlay: {type(e).__name__}: {e}"
                ) from e
        return out
