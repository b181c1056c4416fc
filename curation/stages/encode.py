"""encode: the tar members of each accepted sample (the sink then only writes them).

- image: the original file when it is JPEG, PNG or WebP, else re-encoded as PNG;
- video clip: the span re-encoded to H.264 (``encode_clip``): what training wants to read:
  display orientation (rotation applied), square pixels (sample aspect ratio applied), longer
  side capped at ``shards.video_max_side``, even dimensions, the source frame rate,
  frame-accurate span ``[start, end)``, deterministic bytes;
- edit pairs: ``src.EXT`` and ``tgt.EXT`` the same way (a video target whole).

Sets the working column ``media`` (member extension -> bytes) and ``bucket``
(``catalog.shards.bucket_name``: pixel-area and aspect class of the sample's display size, as
the index records it, x the frame count of the encoded clip). Rows that are
not accepted pass through untouched. Reason tag: ``encode_error`` (an input that probed and
scored fine but does not re-encode).
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Any, ClassVar

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from catalog.shards import bucket_name
from curation.config import ShardConfig
from curation.media import local_path, to_rgb
from curation.stages.base import Resources, Row, Stage, mark_error

IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


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
    reformatter = VideoReformatter()
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
                rgb = to_rgb(frame, reformatter)
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


def image_bytes(uri: str) -> tuple[str, bytes]:
    """(extension, bytes): the original file for JPEG/PNG/WebP, else re-encoded as PNG."""
    with open(local_path(uri), "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        ext = IMAGE_EXT.get(im.format or "")
        if ext:
            return ext, data
        out = io.BytesIO()
        im.convert("RGBA" if "A" in im.getbands() else "RGB").save(out, format="PNG")
        return "png", out.getvalue()


class EncodeStage(Stage):
    """Tar members (``media``) and ``bucket`` of accepted samples; see the module docstring."""

    name: ClassVar[str] = "encode"
    resources: ClassVar[Resources] = Resources(cpus=1)
    batch_size: ClassVar[int] = 4
    uses_model: ClassVar[bool] = False

    def __init__(self, cfg: ShardConfig):
        self.max_side = cfg.video_max_side
        self.crf = cfg.video_crf

    def process_batch(self, rows: list[Row]) -> list[Row]:
        out = []
        for row in rows:
            if row.get("status") != "accepted":
                out.append(row)
                continue
            try:
                media, num_frames = self.members(row)
            except Exception as e:  # an input that probed fine but will not re-encode
                out.append(mark_error(row, "encode_error", f"{type(e).__name__}: {e}"))
                continue
            bucket = bucket_name(row["width"], row["height"], num_frames)
            out.append({**row, "media": media, "bucket": bucket})
        return out

    def members(self, row: Row) -> tuple[dict[str, bytes], int]:
        kind = row["kind"]
        if kind == "image":
            ext, data = image_bytes(row["source_uri"])
            return {ext: data}, 1
        if kind == "image_edit":
            (se, sd), (te, td) = image_bytes(row["source_uri"]), image_bytes(row["target_uri"])
            return {f"src.{se}": sd, f"tgt.{te}": td}, 1
        span = row.get("span")
        clip = (span["start"], span["end"]) if span else None
        kw: dict[str, Any] = dict(max_side=self.max_side, crf=self.crf)
        src, n = encode_clip(
            row["source_uri"],
            clip,
            display_width=row["width"],
            display_height=row["height"],
            rotation=row.get("rotation") or 0,
            **kw,
        )
        if kind == "video":
            return {"mp4": src}, n
        tgt, _ = encode_clip(
            row["target_uri"],
            None,
            display_width=row["target_width"],
            display_height=row["target_height"],
            **kw,
        )
        return {"src.mp4": src, "tgt.mp4": tgt}, n
