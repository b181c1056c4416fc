"""Re-encode a clip span to H.264 (yuv420p, .mp4 bytes) for the shards.

The output is what training wants to read: display orientation (rotation applied), square
pixels (sample aspect ratio applied), longer side capped at ``max_side``, even dimensions,
the source frame rate, frame-accurate span ``[start, end)``.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import cv2
import numpy as np

from curation.media import local_path


def display_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Even (w, h) with the longer side <= max_side, aspect kept."""
    scale = min(1.0, max_side / max(width, height))
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def encode_clip(
    uri: str,
    span: tuple[float, float] | None,
    *,
    display_width: int,
    display_height: int,
    rotation: int = 0,
    max_side: int = 1280,
    crf: int = 20,
) -> tuple[bytes, int]:
    """Encode ``uri`` between ``span`` seconds (None = whole) -> (mp4 bytes, frame count)."""
    out_w, out_h = display_size(display_width, display_height, max_side)
    start, end = span if span is not None else (0.0, float("inf"))
    buf = io.BytesIO()
    written = 0
    with av.open(local_path(uri)) as src:
        vs = src.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate or Fraction(24)
        with av.open(buf, mode="w", format="mp4") as dst:
            out = dst.add_stream("libx264", rate=rate)
            out.width, out.height, out.pix_fmt = out_w, out_h, "yuv420p"
            # Byte-identical reruns (resume must equal a clean run): x264's AVX-512 mbtree
            # routine reads uninitialised memory at row ends unless cpu-independent=1, and
            # frame threading reorders decisions; one thread per clip (clips run in parallel).
            out.options = {
                "crf": str(crf),
                "preset": "veryfast",
                "threads": "1",
                "x264-params": "cpu-independent=1",
            }
            out.codec_context.thread_count = 1
            if start > 0:
                src.seek(int(start / vs.time_base), stream=vs, backward=True, any_frame=False)
            for frame in src.decode(vs):
                t = frame.time if frame.time is not None else 0.0
                if t < start - 1e-6:
                    continue
                if t >= end - 1e-6:
                    break
                rgb = frame.to_ndarray(format="rgb24")
                if rotation:
                    rgb = np.rot90(rgb, k=rotation // 90)
                rgb = cv2.resize(
                    np.ascontiguousarray(rgb), (out_w, out_h), interpolation=cv2.INTER_AREA
                )
                for packet in out.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    dst.mux(packet)
                written += 1
            for packet in out.encode():
                dst.mux(packet)
    if written == 0:
        raise ValueError(f"no frames decoded in span {span} of {uri}")
    return buf.getvalue(), written
