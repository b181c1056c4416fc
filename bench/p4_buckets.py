"""P4 bucketing waste: pixels lost to crop when media are fitted to training buckets, ours vs a
fixed aspect-ratio list like Open-Sora's.

Media: a fixed mixture of common sizes (16:9 video from 480p to 4K, 9:16 phone video, 4:3,
1:1, 4:5 social, cinema 1.85:1 and 2.39:1, camera photos 3:2 / 4:3 / 2:3 / 3:4) plus 10 % of
arbitrary crops with an aspect ratio drawn log-uniformly inside the select range (1/3 .. 3).
Both sides fit the same way: resize to cover the bucket, centre crop
(``training.data.buckets.crop_fraction``), at the 7b recipes' frame area (832 x 480).

- ours: ``bucket_for`` (aspect kept up to the rounding of sides to multiples of the spatial
  factor 8).
- baseline: Open-Sora 1.2's fixed list at 480p (``opensora/datasets/aspect.py``: 15 ratios
  height/width 0.39 .. 2.10, nearest ratio wins).
"""

from __future__ import annotations

import math

import numpy as np

from bench.harness import Context, Row, log, ratio

FRAME_AREA = 832 * 480
SPATIAL_FACTOR, TEMPORAL_FACTOR = 8, 4
# Open-Sora 1.2, ASPECT_RATIO_480P: height / width -> (height, width)
OPEN_SORA_480P = {
    0.39: (400, 1026),
    0.42: (414, 986),
    0.48: (444, 925),
    0.50: (452, 904),
    0.52: (462, 888),
    0.56: (480, 854),
    0.66: (520, 788),
    0.75: (554, 738),
    1.00: (640, 640),
    1.33: (738, 554),
    1.52: (790, 520),
    1.78: (854, 480),
    1.92: (888, 462),
    2.00: (906, 453),
    2.10: (928, 442),
}
# (width, height, share of the corpus)
COMMON_SIZES = [
    (1920, 1080, 0.20),
    (1280, 720, 0.12),
    (3840, 2160, 0.05),
    (854, 480, 0.05),
    (640, 360, 0.03),
    (1080, 1920, 0.08),
    (720, 1280, 0.05),
    (640, 480, 0.04),
    (1440, 1080, 0.03),
    (1080, 1080, 0.04),
    (1080, 1350, 0.03),
    (1998, 1080, 0.02),
    (1920, 804, 0.03),
    (6000, 4000, 0.04),
    (4032, 3024, 0.04),
    (4000, 6000, 0.03),
    (3024, 4032, 0.02),
]
RANDOM_SHARE = 0.10


def corpus(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = [(w, h) for w, h, _ in COMMON_SIZES]
    p = np.array([s for _, _, s in COMMON_SIZES])
    p = p / p.sum() * (1 - RANDOM_SHARE)
    picks = rng.choice(len(sizes) + 1, size=n, p=[*p, RANDOM_SHARE])
    out = []
    for k in picks:
        if k < len(sizes):
            out.append(sizes[k])
        else:
            aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
            area = math.exp(rng.uniform(math.log(320 * 240), math.log(4000 * 3000)))
            out.append(
                (max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect))))
            )
    return out


def open_sora_shape(width: int, height: int):
    from training.data.buckets import BucketShape

    r = min(OPEN_SORA_480P, key=lambda k: abs(k - height / width))
    h, w = OPEN_SORA_480P[r]
    return BucketShape(1, h, w)


def run(ctx: Context) -> list[Row]:
    from training.data.buckets import bucket_for, crop_fraction

    media = corpus(2_000 if ctx.quick else 50_000)
    ours, theirs = [], []
    cache: dict[tuple[int, int], tuple[float, float]] = {}
    for w, h in media:
        if (w, h) not in cache:
            shape = bucket_for(w, h, None, FRAME_AREA, SPATIAL_FACTOR, TEMPORAL_FACTOR)
            cache[(w, h)] = (crop_fraction(w, h, shape), crop_fraction(w, h, open_sora_shape(w, h)))
        a, b = cache[(w, h)]
        ours.append(a)
        theirs.append(b)
    ours_a, theirs_a = np.array(ours), np.array(theirs)
    mean_o, mean_t = float(ours_a.mean()), float(theirs_a.mean())
    p95_o, p95_t = float(np.percentile(ours_a, 95)), float(np.percentile(theirs_a, 95))
    log(f"  mean waste ours {mean_o:.4f}, Open-Sora {mean_t:.4f}")
    ctx.details["figures"] = {
        "media": len(media),
        "ours": {"mean": mean_o, "p95": p95_o, "max": float(ours_a.max())},
        "open_sora_480p": {"mean": mean_t, "p95": p95_t, "max": float(theirs_a.max())},
    }
    return [
        Row(
            "P4",
            "pixels cropped (mean over media)",
            mean_o,
            "%",
            "Open-Sora 1.2 fixed list (480p, 15 ratios)",
            mean_t,
            ratio(mean_o, mean_t),
            "<= 0.05",
            goal_on="value",
            note=f"p95 ours {p95_o:.2%}, Open-Sora {p95_t:.2%}; max ours {ours_a.max():.2%}; "
            f"{len(media)} media; ratio = our waste / theirs (lower is better)",
        )
    ]
