"""Frame sampling: decode each sample's frames once, for every scorer downstream.

Videos: ``frames.num_frames`` frames uniformly spaced inside the clip span (the frame at the
centre of each of N equal segments; fewer when the clip has fewer frames), decoded with decord
and, when decord cannot read a file, with PyAV (a logged decoder fallback, not a silent one:
the row's ``frames_decoder`` says which decoder produced its frames). Frames are turned to the
display orientation (rotation metadata) and the display size (pixel aspect ratio), then
downscaled with ``fit_max_side`` and kept as (H, W, 3) uint8 RGB arrays (``curation.media``).

Images: one frame (EXIF orientation applied; grayscale, palette, 16-bit and CMYK converted to
RGB; transparency composited on white). Edit pairs: ``frames`` from the source and
``target_frames`` from the target (whole videos for video pairs).

Video clips that scene split already sampled in its decoding pass (``curation.scan``) arrive
with their frames; only the thumbnail is made for them.

Columns: ``frames`` (list of RGB arrays), ``frame_times`` (seconds from the span start),
``target_frames`` (edit pairs), ``frames_decoder`` (decord | pyav | pil), ``thumb`` (a small
JPEG of the first frame for the report) and ``target_thumb`` (the same of the target's first
frame, edit pairs). The sink keeps them for rows that do not end accepted and for a bounded
sample of the accepted ones (``curation.sink``).
Reason tag: ``decode_error``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from typing import ClassVar

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps

from curation.config import FramesConfig, ProbeConfig
from curation.media import FRAME_MAX_SIDE, fit_max_side, local_path, thumbnail, to_rgb
from curation.probing import probe_file, random_access_ok
from curation.stages.base import Resources, Row, SampleError, Stage

logger = logging.getLogger(__name__)

ALPHA_BACKGROUND = 255  # transparent pixels become white
SEEK_AFTER_S = 2.0  # PyAV fallback: seek instead of decoding from the start past this point


def frame_indices(start: int, end: int, n: int) -> list[int]:
    """Indices of the frames at the centres of ``n`` equal segments of ``[start, end)``.

    Fewer than ``n`` (every frame once) when the range holds fewer frames.
    """
    length = end - start
    if length <= 0:
        return []
    n = min(n, length)
    return [start + min(length - 1, math.floor((i + 0.5) * length / n)) for i in range(n)]


# ---------------------------------------------------------------------------- orientation


def rotate_to_display(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a counter-clockwise display rotation (PyAV ``VideoFrame.rotation`` convention)."""
    k = (int(rotation) % 360) // 90
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


@functools.lru_cache(maxsize=1)
def decord_applies_rotation() -> bool | None:
    """Whether this decord build turns frames by the display matrix itself (0.6.0 wheels do).

    Checked once per process on a tiny generated clip, so frames are never turned twice;
    None when it cannot be told (rotated videos then go to PyAV).
    """
    from decord import VideoReader, cpu

    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = 255
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        with av.open(path, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=24)
            stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
            stream.set_display_rotation(90)
            for _ in range(2):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
            out.mux(stream.encode(None))
        shape = VideoReader(path, ctx=cpu(0))[0].shape
        return tuple(shape[:2]) == (32, 16)
    except Exception as e:  # no encoder / decord refuses
        logger.warning("cannot tell whether decord applies rotation metadata: %s", e)
        return None
    finally:
        os.unlink(path)


def to_display(rgb: np.ndarray, display: tuple[int, int] | None, max_side: int) -> np.ndarray:
    """Resize to the display size (non-square pixels) when needed, then ``fit_max_side``."""
    if display is not None:
        w, h = display
        if (rgb.shape[1], rgb.shape[0]) != (w, h):
            # One resize straight to the final size (display aspect, longer side <= max_side).
            scale = min(1.0, max_side / max(w, h))
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            shrink = size[0] <= rgb.shape[1] and size[1] <= rgb.shape[0]
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, size, interpolation=interp)
    return fit_max_side(rgb, max_side)


# ---------------------------------------------------------------------------- images


def image_rgb(path: str, max_side: int | None = None) -> np.ndarray:
    """Decode a still image to (H, W, 3) uint8 RGB in display orientation.

    With ``max_side``, JPEGs are decoded at a reduced DCT scale when that still leaves at least
    ``max_side`` pixels on the longer side (much faster for camera-sized photos).
    """
    with Image.open(path) as img:
        if max_side and img.format in ("JPEG", "MPO") and max(img.size) > 2 * max_side:
            scale = max_side / max(img.size)
            img.draft(None, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        img = ImageOps.exif_transpose(img) or img
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            hi = arr.max() if arr.size else 0
            scale = 255.0 / (65535.0 if img.mode.startswith("I;16") or hi > 255 else 255.0)
            arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.dstack([arr] * 3))
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (ALPHA_BACKGROUND,) * 3 + (255,))
            img = Image.alpha_composite(background, img)
        return np.asarray(img.convert("RGB")).copy()


# ---------------------------------------------------------------------------- videos


def _decord_frames(path: str, wanted: list[int], rotation: int) -> list[np.ndarray]:
    from decord import VideoReader, cpu

    rotates = decord_applies_rotation() if rotation else True
    if rotates is None:
        raise RuntimeError("unknown decord rotation handling")
    vr = VideoReader(path, ctx=cpu(0), num_threads=1)
    if len(vr) == 0:
        raise ValueError("decord sees no frames")
    # decord may count a frame or two fewer than the container header: stay inside.
    batch = vr.get_batch([min(i, len(vr) - 1) for i in wanted]).asnumpy()
    frames = [batch[i] for i in range(len(batch))]
    if not rotates:
        frames = [rotate_to_display(f, rotation) for f in frames]
    return frames


def _pyav_frames(
    path: str, wanted: list[int], fps: float | None, seek: bool = True
) -> list[np.ndarray]:
    """Frames ``wanted`` (sorted indices) by decoding with PyAV.

    Counts frames from the start, or, for spans starting after ``SEEK_AFTER_S`` (and files
    whose random access works), seeks to the keyframe before the span and numbers frames from
    their timestamps on the average rate. A frame FFmpeg flags corrupt after a seek makes it
    start over without seeking.
    """
    want = set(wanted)
    found: dict[int, np.ndarray] = {}
    index = -1
    reformatter = VideoReformatter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(fps or stream.average_rate or stream.guessed_rate or 0)
        tb = stream.time_base
        t0 = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
        seek = seek and rate > 0 and tb is not None and wanted[0] / rate > SEEK_AFTER_S
        if seek:
            # Decode the first frame before seeking: FFmpeg learns stream quirks from it (the
            # x264 version SEI that old 4:4:4 streams need to decode correctly).
            next(container.decode(stream), None)
            target = t0 + (wanted[0] - 1) / rate
            container.seek(int(target / tb), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if seek and frame.pts is None:
                return _pyav_frames(path, wanted, fps, seek=False)
            if seek:
                index = round((float(frame.pts * tb) - t0) * rate)
            else:
                index += 1
            if index in want and index not in found:
                if seek and frame.is_corrupt:
                    logger.info("broken random access in %s: decoding from the start", path)
                    return _pyav_frames(path, wanted, fps, seek=False)
                rgb = to_rgb(frame, reformatter)
                found[index] = rotate_to_display(rgb, frame.rotation or 0)
            if index >= wanted[-1]:
                break
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ValueError(f"frames {missing[:5]} not found (decoded up to {index})")
    return [found[i] for i in wanted]


def video_frames(
    path: str,
    n: int,
    span: dict[str, float] | None,
    fps: float,
    total: int | None,
    rotation: int = 0,
    random_access: bool | None = None,
) -> tuple[list[np.ndarray], list[float], str]:
    """Uniform frames of ``span`` (the whole video of ``total`` frames when None).

    Returns (RGB frames in display orientation, times in seconds from the span start, decoder).
    decord first; PyAV when decord cannot open or read the file. Files whose random access is
    broken (``random_access`` False, see ``probing.random_access_ok``; checked here when None)
    are decoded sequentially with PyAV: decord would seek and return broken pictures without
    an error.
    """
    fps = float(fps)
    if span is None:
        if not total:
            raise SampleError("decode_error", f"unknown frame count of {path}")
        start_s, first, last = 0.0, 0, int(total)
    else:
        start_s = float(span["start"])
        first = max(0, round(start_s * fps))
        last = max(first + 1, round(float(span["end"]) * fps))
        if total:
            last = min(last, int(total))
    wanted = frame_indices(first, last, n)
    if not wanted:
        raise SampleError("decode_error", f"no frame in span {span} ({total} frames)")
    if random_access is None:
        random_access = random_access_ok(path, (total or last) / fps)
    if not random_access:
        try:
            return _pyav_frames(path, wanted, fps), _times(wanted, fps, start_s), "pyav"
        except Exception as e:
            raise SampleError("decode_error", f"pyav: {type(e).__name__}: {e}") from e
    try:
        frames, decoder = _decord_frames(path, wanted, rotation), "decord"
    except Exception as decord_error:
        logger.warning("decord cannot read %s (%s); decoding with PyAV", path, decord_error)
        try:
            frames, decoder = _pyav_frames(path, wanted, fps), "pyav"
        except Exception as e:
            raise SampleError(
                "decode_error",
                f"decord: {type(decord_error).__name__}: {decord_error}; "
                f"pyav: {type(e).__name__}: {e}",
            ) from e
    return frames, _times(wanted, fps, start_s), decoder


def _times(indices: list[int], fps: float, start_s: float) -> list[float]:
    return [max(0.0, i / fps - start_s) for i in indices]


# ---------------------------------------------------------------------------- stage


def _display(row: Row, prefix: str = "") -> tuple[int, int] | None:
    w, h = row.get(f"{prefix}width"), row.get(f"{prefix}height")
    return (int(w), int(h)) if w and h else None


class FrameSampleStage(Stage):
    """Decode ``frames`` (+ ``target_frames`` for edit pairs) as RGB arrays."""

    name: ClassVar[str] = "frames"
    reads_frames: ClassVar[bool] = True  # it makes them: they exist at least until after it
    resources: ClassVar[Resources] = Resources(cpus=1)
    batch_size: ClassVar[int] = 4
    uses_model: ClassVar[bool] = False

    def __init__(
        self, cfg: FramesConfig, limits: ProbeConfig | None = None, max_side: int = FRAME_MAX_SIDE
    ):
        self.num_frames = cfg.num_frames
        self.max_side = max_side
        self.limits = limits or ProbeConfig()  # for targets / rows that skipped probe

    def _image(self, uri: str, display: tuple[int, int] | None) -> list[np.ndarray]:
        try:
            rgb = image_rgb(local_path(uri), self.max_side)
        except Exception as e:
            raise SampleError("decode_error", f"{type(e).__name__}: {e}") from e
        return [np.ascontiguousarray(to_display(rgb, display, self.max_side))]

    def _video(
        self, uri: str, display, span, fps, total, rotation
    ) -> tuple[list[np.ndarray], list[float], str]:
        path = local_path(uri)
        if not fps or (span is None and not total):
            meta = probe_file(uri, self.limits)  # a target side, or a row that skipped probe
            fps, total, rotation = meta["fps"], meta["num_frames"], meta["rotation"]
            display = display or (meta["width"], meta["height"])
        if not fps:
            raise SampleError("decode_error", f"unknown frame rate of {uri}")
        frames, times, decoder = video_frames(
            path, self.num_frames, span, fps, total, int(rotation or 0)
        )
        frames = [np.ascontiguousarray(to_display(f, display, self.max_side)) for f in frames]
        return frames, times, decoder

    def process_row(self, row: Row) -> Row:
        out = self._frames(row)
        # the report's thumbnails (curation.sink says which it keeps)
        out["thumb"] = thumbnail(out["frames"][0])
        if out.get("target_frames"):
            out["target_thumb"] = thumbnail(out["target_frames"][0])
        return out

    def _frames(self, row: Row) -> Row:
        kind = row.get("kind")
        out = dict(row)
        if kind == "video" and row.get("frames") is not None:
            return out  # sampled by scene split's decoding pass
        if kind in ("image", "image_edit"):
            out.update(frames=self._image(row["source_uri"], _display(row)), frame_times=[0.0])
            out["frames_decoder"] = "pil"
            if kind == "image_edit":
                out["target_frames"] = self._image(_target(row), _display(row, "target_"))
            return out
        if kind not in ("video", "video_edit"):
            raise SampleError("decode_error", f"unknown kind {kind!r}")
        span = row.get("span") if kind == "video" else None
        # A clip row's num_frames counts the clip; the file's count only matters without a span.
        total = None if span is not None else row.get("num_frames")
        frames, times, decoder = self._video(
            row["source_uri"],
            _display(row),
            span,
            row.get("fps"),
            total,
            row.get("rotation"),
        )
        out.update(frames=frames, frame_times=times, frames_decoder=decoder)
        if kind == "video_edit":
            out["target_frames"], _, _ = self._video(
                _target(row), _display(row, "target_"), None, None, None, 0
            )
        return out


def _target(row: Row) -> str:
    target = row.get("target_uri")
    if not target:
        raise SampleError("decode_error", f"{row.get('kind')} row without target_uri")
    return target
