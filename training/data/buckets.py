"""Training buckets: the (frames, height, width) every sample of a batch is resized/cropped to.

A stage trains at one pixel area per frame (``frame_area``). A sample keeps its aspect ratio as
well as possible: sides are multiples of the model's spatial factor ``sf`` (pixels per latent
token side) and the frame count is ``k * temporal_factor + 1`` (causal video VAE).

Rounding rule (``bucket_for``): with aspect ``r = width / height`` the ideal sides are
``w* = sqrt(A * r) / sf`` and ``h* = sqrt(A / r) / sf`` latent units. Candidates are
``floor``/``ceil`` of each ideal side, plus for each candidate height the width that best keeps
the aspect (``round(h * r)``) and for each candidate width the best height (``round(w / r)``),
every side at least 1 unit. The chosen pair minimises

    |ln((w / h) / r)| + |ln(w * h * sf**2 / A)|

(aspect error + area error, both in log terms, equal weight); ties go to the smaller area,
then the smaller width. Because plain per-side rounding is always a candidate, the combined
error is never larger than rounding each side to the nearest multiple; for sides of ``n``
units it is below about ``1/n_w + 1/n_h``. Frames: images 1; videos the largest
``k * temporal_factor + 1 <= num_frames_wanted`` (``k >= 0``, so 1 when fewer are wanted).

Shard buckets (``a512_r16x9_f33``, see ``catalog.shards.bucket_name``) map to training buckets
through their aspect class only (``aspect_of_shard_bucket``): the stage area replaces the
shard's area class and the task's frame count replaces its frame class, so grouping samples
needs no shard to be opened. Samples are resized to cover the shape and centre-cropped; the
pixel share lost by that crop is ``crop_fraction``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "BucketShape",
    "aspect_of_shard_bucket",
    "batch_size_for",
    "bucket_for",
    "crop_fraction",
    "frame_class_of_shard_bucket",
    "frames_for",
    "shape_for_shard_bucket",
    "tokens",
]


@dataclass(frozen=True, order=True)
class BucketShape:
    """One training bucket: frames, height and width in pixels (hashable, orderable)."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> BucketShape:
        """Inverse of ``str``: ``"33x384x688"`` -> BucketShape(33, 384, 688)."""
        parts = str(text).split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{text!r} is not a bucket shape (expected FRAMESxHEIGHTxWIDTH)")
        return cls(*(int(p) for p in parts))

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def is_video(self) -> bool:
        return self.frames > 1


def frames_for(num_frames_wanted: int | None, temporal_factor: int) -> int:
    """Largest ``k * temporal_factor + 1`` not above ``num_frames_wanted`` (1 for images)."""
    if temporal_factor < 1:
        raise ValueError(f"temporal_factor must be >= 1, got {temporal_factor}")
    if not num_frames_wanted or num_frames_wanted <= 1:
        return 1
    return (int(num_frames_wanted) - 1) // temporal_factor * temporal_factor + 1


def _side_units(aspect: float, frame_area: float, sf: int) -> tuple[int, int]:
    """(height units, width units) by the module's rounding rule."""
    w_ideal = math.sqrt(frame_area * aspect) / sf
    h_ideal = math.sqrt(frame_area / aspect) / sf
    hs = {max(1, math.floor(h_ideal)), max(1, math.ceil(h_ideal))}
    ws = {max(1, math.floor(w_ideal)), max(1, math.ceil(w_ideal))}
    pairs = {(h, w) for h in hs for w in ws}
    pairs |= {(h, max(1, round(h * aspect))) for h in hs}
    pairs |= {(max(1, round(w / aspect)), w) for w in ws}
    units = frame_area / (sf * sf)

    def cost(hw: tuple[int, int]) -> tuple[float, int, int]:
        h, w = hw
        err = abs(math.log((w / h) / aspect)) + abs(math.log(w * h / units))
        return (round(err, 12), h * w, w)

    return min(pairs, key=cost)


def bucket_for(
    width: float,
    height: float,
    num_frames_wanted: int | None,
    frame_area: int,
    spatial_factor: int,
    temporal_factor: int,
) -> BucketShape:
    """The training bucket of a ``width`` x ``height`` medium (only the ratio matters)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if frame_area <= 0 or spatial_factor < 1:
        raise ValueError(
            f"frame_area must be > 0 and spatial_factor >= 1, got {frame_area}, {spatial_factor}"
        )
    h, w = _side_units(width / height, frame_area, spatial_factor)
    frames = frames_for(num_frames_wanted, temporal_factor)
    return BucketShape(frames, h * spatial_factor, w * spatial_factor)


_ASPECT = re.compile(r"(?:^|_)r(\d+)x(\d+)(?:_|$)")


def aspect_of_shard_bucket(name: str) -> float:
    """``"a512_r16x9_f33"`` -> 16 / 9 (width / height of the shard bucket's aspect class)."""
    m = _ASPECT.search(str(name))
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise ValueError(
            f"{name!r} is not a shard bucket name (expected e.g. 'a512_r16x9_f33', see "
            "catalog.shards.bucket_name)"
        )
    return int(m.group(1)) / int(m.group(2))


_FRAME_CLASS = re.compile(r"(?:^|_)f(\d+)(?:_|$)")


def frame_class_of_shard_bucket(name: str) -> int | None:
    """``"a512_r16x9_f33"`` -> 33 (1: images), or None when the name has no frame class."""
    m = _FRAME_CLASS.search(str(name))
    return None if m is None else int(m.group(1))


def shape_for_shard_bucket(
    name: str,
    num_frames_wanted: int | None,
    frame_area: int,
    spatial_factor: int,
    temporal_factor: int,
) -> BucketShape:
    """Training bucket of every sample in shard bucket ``name`` for a stage and task."""
    aspect = aspect_of_shard_bucket(name)
    return bucket_for(aspect, 1.0, num_frames_wanted, frame_area, spatial_factor, temporal_factor)


def tokens(shape: BucketShape, spatial_factor: int, temporal_factor: int) -> int:
    """Latent tokens of one medium: (1 + (frames - 1) / tf) * (H / sf) * (W / sf)."""
    latent_frames = 1 + (shape.frames - 1) // temporal_factor
    return latent_frames * (shape.height // spatial_factor) * (shape.width // spatial_factor)


def batch_size_for(
    shape: BucketShape,
    token_budget: int,
    spatial_factor: int,
    temporal_factor: int,
    media_per_sample: int = 1,
    max_batch: int | None = None,
) -> int:
    """Samples per local batch: ``max(1, token_budget // (tokens * media_per_sample))``, at
    most ``max_batch`` (a stage's ``batch_size``) when given.

    ``media_per_sample`` is 2 for edit tasks (source and target are both encoded to latents).
    """
    per_sample = tokens(shape, spatial_factor, temporal_factor) * max(1, media_per_sample)
    packed = max(1, int(token_budget) // per_sample)
    return packed if max_batch is None else min(packed, int(max_batch))


def crop_fraction(width: float, height: float, shape: BucketShape) -> float:
    """Share of a ``width`` x ``height`` frame's pixels lost by resize-to-cover + centre crop
    to ``shape`` (0 when the aspect ratios match)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    scale = max(shape.width / width, shape.height / height)
    return max(0.0, 1.0 - (shape.width * shape.height) / (width * height * scale * scale))
