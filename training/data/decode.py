"""Decoding a sample into the tensors of one training bucket.

Images via PIL (EXIF orientation applied, alpha composited on white), videos via PyAV from
memory; frames are taken from the start of the clip every
``stride = max(1, round(src_fps / task_fps))`` source frames (stride 1 when the task has no
fps), looping the clip (frame ``k * stride mod n``) when it is too short. Each frame is resized
to cover the bucket and centre-cropped, RGB, float32 in [-1, 1], layout (T, C, H, W) per
sample. Edit samples give the source (``src.*``) besides the target (``tgt.*``). Text is the
``txt`` member (understanding tasks: the answer; generation: the condition), else the index
row's recaption / instruction / caption. A conversation (LLaVA-style QA data) comes from the
index row's ``conversation`` (``training.data.conversation``): understanding tasks learn its
assistant turns instead of the caption.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch

from catalog.schema import EDIT_KINDS
from training.data.buckets import BucketShape
from training.data.samples import IMAGE_EXTS, VIDEO_EXTS, RawSample, kind_from_members

__all__ = [
    "decode_image",
    "decode_sample",
    "decode_video",
    "sample_text",
    "to_tensor",
]


def decode_sample(
    raw: RawSample, shape: BucketShape, video: bool, fps: float | None
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(pixels (T, C, H, W), edit source or None, text) of one sample for a task reading
    ``video`` (else image) media at ``fps``; raises on anything undecodable."""
    if raw.error is not None:
        raise OSError(raw.error)
    kind = raw.meta.get("kind") or kind_from_members(raw.members)
    if kind in EDIT_KINDS:
        src = _medium(raw, "src.", shape, video, fps)
        tgt = _medium(raw, "tgt.", shape, video, fps)
    else:
        tgt, src = _medium(raw, "", shape, video, fps), None
    return tgt, src, sample_text(raw)


def _medium(
    raw: RawSample, prefix: str, shape: BucketShape, video: bool, fps: float | None
) -> torch.Tensor:
    members = raw.members
    for ext in VIDEO_EXTS:
        if prefix + ext in members:
            if not video:
                raise ValueError(f"member {prefix + ext} is a video, the task reads images")
            frames = decode_video(members[prefix + ext], shape, fps, raw.meta.get("fps"))
            return to_tensor(list(frames))
    for ext in IMAGE_EXTS:
        if prefix + ext in members:
            frame = decode_image(members[prefix + ext], shape)
            return to_tensor([frame] * shape.frames)
    raise ValueError(f"no {prefix or 'medium '}member among {sorted(members)}")


def sample_text(raw: RawSample) -> str:
    if "txt" in raw.members:
        return raw.members["txt"].decode("utf-8", errors="replace").strip()
    meta = raw.meta
    return str(meta.get("recaption") or meta.get("instruction") or meta.get("caption") or "")


def to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """List of (H, W, 3) uint8 -> (T, 3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    return arr.to(torch.float32).div_(127.5).sub_(1.0)


def _cover_size(w: int, h: int, shape: BucketShape) -> tuple[int, int]:
    scale = max(shape.width / w, shape.height / h)
    return max(shape.width, math.ceil(w * scale - 1e-6)), max(
        shape.height, math.ceil(h * scale - 1e-6)
    )


def _center_crop(arr: np.ndarray, shape: BucketShape) -> np.ndarray:
    top = (arr.shape[0] - shape.height) // 2
    left = (arr.shape[1] - shape.width) // 2
    return arr[top : top + shape.height, left : left + shape.width]


def decode_image(data: bytes, shape: BucketShape) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8: EXIF-oriented, RGB, resized to cover, centre-cropped."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":  # decode at a reduced scale when much larger than needed
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
            cw, ch = _cover_size(w, h, shape)
            im.draft("RGB", (ch, cw) if (w, h) != im.size else (cw, ch))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
        elif im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grayscale PNG
            gray = np.asarray(im, dtype=np.float32) / 257.0
            im = Image.fromarray(np.clip(gray + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
        elif im.mode != "RGB":
            im = im.convert("RGB")
        size = _cover_size(im.width, im.height, shape)
        if size != im.size:
            im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return _center_crop(np.asarray(im, dtype=np.uint8), shape)


def _collect_frames(container: Any, wanted: set[int], shape: BucketShape) -> tuple[dict, int, bool]:
    """Decode from the start; frames with index in ``wanted`` -> ({index: (H, W, 3) uint8},
    frames decoded, whether the clip ended before the last wanted frame)."""
    out: dict[int, np.ndarray] = {}
    last = max(wanted)
    n = 0
    size = None
    for frame in container.decode(container.streams.video[0]):
        if n in wanted:
            if size is None:
                size = _cover_size(frame.width, frame.height, shape)
            rgb = frame.to_ndarray(
                width=size[0], height=size[1], format="rgb24", interpolation="BICUBIC"
            )
            out[n] = np.ascontiguousarray(_center_crop(rgb, shape))
        n += 1
        if n > last:
            return out, n, False
    return out, n, True


def decode_video(
    data: bytes, shape: BucketShape, fps: float | None, meta_fps: float | None = None
) -> np.ndarray:
    """Video bytes -> (T, H, W, 3) uint8 sampled at ``fps`` from the start, looped if short.

    ``stride = max(1, round(src_fps / fps))`` source frames (1 without ``fps``); frame ``k`` of
    the result is source frame ``k * stride``, or ``k * stride mod n`` for a clip of ``n < (T -
    1) * stride + 1`` frames. ``src_fps`` is the stream's average rate (else ``meta_fps``).
    """
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        src_fps = float(rate) if rate else float(meta_fps or 0.0)
        stride = max(1, round(src_fps / fps)) if fps and src_fps > 0 else 1
        indices = [k * stride for k in range(shape.frames)]
        frames, n, ended = _collect_frames(container, set(indices), shape)
    if n == 0:
        raise ValueError("video has no decodable frames")
    if ended and n <= indices[-1]:  # too short: loop the clip
        indices = [i % n for i in indices]
        missing = set(indices) - set(frames)
        if missing:
            with av.open(io.BytesIO(data)) as container:
                more, _, _ = _collect_frames(container, missing, shape)
            frames.update(more)
    return np.stack([frames[i] for i in indices])
