"""Global (camera) translation between two grey frames, shared by motion and watermark.

Phase correlation gives candidate shifts; a static overlay (a logo, subtitles) makes a peak at
zero, so the strongest peaks and "no shift" are compared on the residual of the shared area
and the lowest wins.
"""

from __future__ import annotations

import cv2
import numpy as np

SHIFT_CANDIDATES = 3  # phase-correlation peaks tried per pair
MIN_OVERLAP = 0.25  # a shift must leave this share of the frame in common


def phase_peaks(a: np.ndarray, b: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Integer shifts ``d`` (dx, dy) with ``b(x + d) ~ a(x)``, strongest phase-correlation
    peaks first (Hanning-windowed, like ``cv2.phaseCorrelate``, which only returns one)."""
    h, w = a.shape
    win = cv2.createHanningWindow((w, h), cv2.CV_32F)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    fa = np.fft.rfft2((a32 - a32.mean()) * win)
    fb = np.fft.rfft2((b32 - b32.mean()) * win)
    cross = fb * np.conj(fa)
    cross /= np.maximum(np.abs(cross), 1e-9)
    surface = np.fft.irfft2(cross, s=(h, w)).astype(np.float32)
    local_max = surface >= cv2.dilate(surface, np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero(local_max)
    order = np.argsort(surface[ys, xs])[::-1][:k]
    peaks = []
    for y, x in zip(ys[order], xs[order], strict=True):
        dy = int(y) - h if y > h // 2 else int(y)
        dx = int(x) - w if x > w // 2 else int(x)
        peaks.append((dx, dy))
    return peaks


def overlap(shape: tuple[int, int], d: tuple[int, int]) -> tuple[slice, slice] | None:
    """Region of ``a`` whose content sits at ``x + d`` inside ``b`` (None: too little left)."""
    h, w = shape
    dx, dy = d
    x0, x1 = max(0, -dx), min(w, w - dx)
    y0, y1 = max(0, -dy), min(h, h - dy)
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) < MIN_OVERLAP * h * w:
        return None
    return slice(y0, y1), slice(x0, x1)


def shifted(b: np.ndarray, region: tuple[slice, slice], d: tuple[int, int]) -> np.ndarray:
    """The part of ``b`` that lines up with ``a[region]`` under shift ``d``."""
    ys, xs = region
    return b[ys.start + d[1] : ys.stop + d[1], xs.start + d[0] : xs.stop + d[0]]


def dominant_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """The translation that best aligns ``b`` onto ``a`` among no shift and the strongest
    phase-correlation peaks (lowest mean absolute difference on the shared area)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    best, best_err = (0, 0), float(np.mean(np.abs(a32 - b32)))
    for d in phase_peaks(a32, b32, SHIFT_CANDIDATES):
        region = overlap(a.shape, d)
        if d == (0, 0) or region is None:
            continue
        err = float(np.mean(np.abs(a32[region] - shifted(b32, region, d))))
        if err < best_err:
            best, best_err = d, err
    return best
