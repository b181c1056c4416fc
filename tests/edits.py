"""Edited footage made from the real fixtures: cross-dissolves and dips to black between two
real shots (cockatoo, the first 9 s at 20 fps; realshort, 1.2 s at 30 fps, taken at 20 fps
and played forward then backward for length), for the gradual-transition tests."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np

DATA = Path(__file__).resolve().parent / "data"
W, H, FPS = 320, 180, 20


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def fit(rgb: np.ndarray) -> np.ndarray:
    """Scale to cover W x H and crop the middle."""
    h, w = rgb.shape[:2]
    s = max(W / w, H / h)
    rgb = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    y, x = (rgb.shape[0] - H) // 2, (rgb.shape[1] - W) // 2
    return np.ascontiguousarray(rgb[y : y + H, x : x + W])


def real_shots() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(cockatoo, realshort) frames at W x H, 20 fps."""
    cockatoo = [fit(f) for f in decoded(DATA / "cockatoo_9s.mp4")]
    at30 = [fit(f) for f in decoded(DATA / "realshort.mp4")]
    forward = [at30[min(len(at30) - 1, round(i * 1.5))] for i in range(24)]
    return cockatoo, forward + forward[::-1][1:] + forward[1:] + forward[::-1][1:]


def dissolve(a, b, at: int, n: int, tail: int = 60) -> list[np.ndarray]:
    """``a`` until frame ``at``, an ``n``-frame cross-dissolve into ``b``, then ``b`` (at most
    ``tail`` frames, as many as it has); both shots keep playing through the dissolve, as in
    an edit."""
    tail = min(tail, len(b) - n)
    out = []
    for i in range(at + n + tail):
        if i < at:
            out.append(a[i])
            continue
        fb = b[i - at].astype(np.float32)
        if i >= at + n:
            out.append(b[i - at])
            continue
        t = (i - at + 1) / (n + 1)
        out.append(((1 - t) * a[i].astype(np.float32) + t * fb).round().astype(np.uint8))
    return out


def dip(a, b, at: int, n: int, tail: int = 60) -> list[np.ndarray]:
    """``a`` fades out to black over ``n / 2`` frames, ``b`` fades in over the rest."""
    half = n // 2
    out = [a[i] for i in range(at)]
    for j in range(half):
        out.append((a[at + j] * (1 - (j + 1) / (half + 1))).round().astype(np.uint8))
    for j in range(n - half):
        out.append((b[j] * ((j + 1) / (n - half + 1))).round().astype(np.uint8))
    return out + [b[n - half + j] for j in range(tail)]
