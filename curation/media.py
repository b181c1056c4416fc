"""Helpers shared by stages: frames in memory, local paths for fsspec URIs, thumbnails.

Sampled frames are (H, W, 3) uint8 RGB numpy arrays in the ``frames`` column
(``list[np.ndarray]``), with their times in ``frame_times`` (seconds from the clip start);
frames are bounded by ``FRAME_MAX_SIDE``. They are decoded once and never re-encoded: inside a
fused CPU step they are plain Python objects, and between steps Ray ships them through its
shared-memory object store (pickle-5 out-of-band buffers, read without a copy), so the
pixel-exact cues (static overlays, text edges) are the decoder's own pixels.
"""

from __future__ import annotations

from typing import Any

import av
import cv2
import fsspec
import numpy as np
from av.video.reformatter import VideoReformatter

FRAME_MAX_SIDE = 640  # sampled frames are downscaled so the longer side is at most this
# swscale (PyAV's reformat) works on this many threads. Its default, one per CPU, costs more
# than it saves on frames of these sizes while the other workers keep every CPU busy: on
# 2 CPUs a 256x144 frame to BGR takes 75 us with it and 15 us on one thread, the area
# downscale of a 480x270 frame to 256x144 50-100 us and 40; the pixels are the same.
SWS_THREADS = 1


def to_rgb(frame: av.VideoFrame, reformatter: VideoReformatter) -> np.ndarray:
    """A decoded frame's (H, W, 3) uint8 RGB pixels, converted on ``SWS_THREADS`` by
    ``reformatter`` (one per decode loop: it keeps its swscale context between frames)."""
    return reformatter.reformat(frame, format="rgb24", threads=SWS_THREADS).to_ndarray()


def as_frames(values: Any) -> list[np.ndarray]:
    """The frames of a ``frames`` / ``target_frames`` value, checked: each a non-empty
    (H, W, 3) uint8 array. Raises ValueError naming what is wrong."""
    out = []
    for i, f in enumerate(values or []):
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3:
            what = f"{f.dtype} array {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
            raise ValueError(f"frame {i} is a {what}, not an (H, W, 3) uint8 RGB array")
        if f.shape[2] != 3 or not f.shape[0] or not f.shape[1]:
            raise ValueError(f"frame {i} has shape {f.shape}, not (H, W, 3)")
        out.append(f)
    return out


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


def thumbnail(frame: np.ndarray, size: int = 160) -> bytes:
    """A small JPEG of an RGB frame, for reports."""
    rgb = fit_max_side(as_frames([frame])[0], size)
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
