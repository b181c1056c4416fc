"""Helpers shared by stages: frames as compact bytes, local paths for fsspec URIs.

Sampled frames travel between stages (and through Ray's object store) as PNG-encoded RGB
images in the ``frames`` column (``list[bytes]``), with their times in ``frame_times``
(seconds from the clip start). PNG is lossless, so pixel-exact cues (static overlays, text
edges) survive; frames are bounded by ``FRAME_MAX_SIDE``.
"""

from __future__ import annotations

import cv2
import fsspec
import numpy as np

FRAME_MAX_SIDE = 640  # sampled frames are downscaled so the longer side is at most this


def encode_frame(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes."""
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]
    )
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_frame(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8 RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not an encoded image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_frames(frames: list[bytes]) -> list[np.ndarray]:
    return [decode_frame(f) for f in frames]


def fit_max_side(rgb: np.ndarray, max_side: int = FRAME_MAX_SIDE) -> np.ndarray:
    """Downscale (area interpolation) so the longer side is <= max_side; never upscales."""
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def local_path(uri: str) -> str:
    """A local file path for ``uri``: itself when local, else a cached download (fsspec)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    return fsspec.open_local(f"simplecache::{uri}")


def thumbnail(image_bytes: bytes, size: int = 160) -> bytes:
    """A small JPEG of an encoded image (PNG/JPEG bytes), for reports."""
    rgb = fit_max_side(decode_frame(image_bytes), size)
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
