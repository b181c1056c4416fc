"""Instruction-edit pairs (source, target, instruction), including known-bad pairs.

Positive pairs really differ the way the instruction says, inside ``edit_box`` when the edit is
local. Each negative breaks exactly one pair check so a checker can be tested check by check.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .images import encode_image
from .labels import file_digest, record
from .render import draw_text, landscape, rng_for, text_scale_for_width
from .videos import encode_video, pan_canvas, pan_frames

BLUE, RED, GREEN, YELLOW = (40, 70, 210), (215, 30, 30), (30, 170, 60), (250, 220, 40)
IMG_W, IMG_H = 512, 384
VID_W, VID_H, VID_FPS, VID_N = 320, 180, 24, 48
BALL_R = 14

Frames = Callable[[], Iterator[np.ndarray]]


@dataclass
class ImagePair:
    name: str
    src: np.ndarray
    tgt: np.ndarray | None  # None: byte copy of the source
    instruction: str | None
    box: list[int] | None = None
    fmt: str = "jpeg"
    failures: list[str] = field(default_factory=list)
    tgt_is_video: bool = False  # tgt holds a pan canvas to be encoded as a clip


@dataclass
class VideoPair:
    name: str
    src: Frames
    tgt: Frames | None  # None: byte copy of the source
    instruction: str
    box: list[int] | None = None
    failures: list[str] = field(default_factory=list)


def _scene(seed: int, name: str, w: int = IMG_W, h: int = IMG_H, palette: str = "day"):
    return landscape(rng_for(seed, f"edit/{name}"), h, w, palette)


def _square(img: np.ndarray, color: tuple[int, int, int]) -> list[int]:
    """Solid square on the ground, left of centre, at the same relative place for any size."""
    h, w = img.shape[:2]
    s = min(h, w) // 4
    x0, y0 = w // 4, int(h * 0.55)
    cv2.rectangle(img, (x0, y0), (x0 + s - 1, y0 + s - 1), color, -1)
    return [x0, y0, x0 + s, y0 + s]


def _with_square(img: np.ndarray, color: tuple[int, int, int]) -> tuple[np.ndarray, list[int]]:
    out = img.copy()
    return out, _square(out, color)


def image_pairs(seed: int) -> list[ImagePair]:
    base = _scene(seed, "red_square")
    src, _ = _with_square(base, BLUE)
    tgt, box = _with_square(base, RED)
    pairs = [ImagePair("red_square", src, tgt, "make the blue square red", box, fmt="png")]

    src = _scene(seed, "yellow_circle", palette="forest")
    tgt, r = src.copy(), IMG_H // 8
    cv2.circle(tgt, (r + 20, r + 20), r, YELLOW, -1, cv2.LINE_AA)
    box = [19, 19, 2 * r + 22, 2 * r + 22]
    pairs.append(
        ImagePair("yellow_circle", src, tgt, "add a yellow circle in the top left corner", box)
    )

    src = _scene(seed, "grayscale", palette="sunset")
    gray = np.dstack([cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)] * 3)
    pairs.append(ImagePair("grayscale", src, gray, "convert the photo to black and white"))

    tgt = _scene(seed, "remove_text", palette="ocean")
    src = tgt.copy()
    scale = text_scale_for_width("BIG NEWS", int(IMG_W * 0.6), 4)
    box = draw_text(src, "BIG NEWS", IMG_W // 2, IMG_H // 2, scale, 4)
    pairs.append(ImagePair("remove_text", src, tgt, "remove the text", box))

    # Negatives: each fails exactly the check named in ``failures``.
    src = _scene(seed, "identical", palette="desert")
    pairs.append(ImagePair("identical", src, None, "make the sky purple", failures=["identical"]))

    base = _scene(seed, "aspect_mismatch", w=480, h=360)  # 4:3 source, 16:9 target
    src, _ = _with_square(base, BLUE)
    tgt, _ = _with_square(cv2.resize(base, (640, 360), interpolation=cv2.INTER_AREA), GREEN)
    pairs.append(
        ImagePair(
            "aspect_mismatch", src, tgt, "make the square green", failures=["aspect_mismatch"]
        )
    )

    base = _scene(seed, "no_instruction", palette="forest")
    src, _ = _with_square(base, BLUE)
    tgt, box = _with_square(base, GREEN)
    pairs.append(ImagePair("no_instruction", src, tgt, None, box, failures=["no_instruction"]))

    src = _scene(seed, "kind_mismatch", w=VID_W, h=VID_H)
    canvas = pan_canvas(seed, "edit/kind_mismatch", "day", VID_W, VID_H, VID_N, (1, 0))
    pairs.append(
        ImagePair(
            "kind_mismatch",
            src,
            canvas,
            "animate the clouds",
            failures=["kind_mismatch"],
            tgt_is_video=True,
        )
    )
    return pairs


def warm_tint(frame: np.ndarray) -> np.ndarray:
    warm = frame.astype(np.float32) * np.array([1.15, 0.95, 0.6], np.float32) + [25, 8, 0]
    return np.clip(warm, 0, 255).astype(np.uint8)


def ball_x(i: int) -> int:
    """Ball centre x at frame ``i``: left edge to right edge over the clip."""
    return 20 + i * (VID_W - 40) // (VID_N - 1)


def _add_ball(frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    for i, f in enumerate(frames):
        f = f.copy()
        cv2.circle(f, (ball_x(i), VID_H // 2), BALL_R, RED, -1, cv2.LINE_AA)
        yield f


def video_pairs(seed: int) -> list[VideoPair]:
    def panning(name: str, palette: str) -> Frames:
        canvas = pan_canvas(seed, f"edit/{name}", palette, VID_W, VID_H, VID_N, (1, 0))
        return lambda: pan_frames(canvas, VID_W, VID_H, VID_N, (1, 0))

    def still(name: str, palette: str) -> Frames:
        img = _scene(seed, name, VID_W, VID_H, palette)
        return lambda: (img for _ in range(VID_N))

    tint_src = panning("warm_tint", "day")
    ball_src = still("red_ball", "forest")
    r, y = BALL_R + 1, VID_H // 2
    return [
        VideoPair(
            "warm_tint",
            tint_src,
            lambda: map(warm_tint, tint_src()),
            "give the video a warm orange sunset tint",
        ),
        VideoPair(
            "red_ball",
            ball_src,
            lambda: _add_ball(ball_src()),
            "add a red ball moving from left to right",
            box=[ball_x(0) - r, y - r, ball_x(VID_N - 1) + r + 1, y + r + 1],
        ),
        VideoPair(
            "identical_video",
            panning("identical_video", "ocean"),
            None,
            "make it snow",
            failures=["identical"],
        ),
    ]


def _pair_label(root: Path, kind: str, pair, src: str, tgt: str, sizes) -> dict[str, Any]:
    return record(
        id=f"edit_{pair.name}",
        path=src,
        kind=kind,
        source=src,
        target=tgt,
        instruction=pair.instruction,
        edit_box=pair.box,
        source_size=list(sizes[0]),
        target_size=list(sizes[1]),
        expect_pair_ok=not pair.failures,
        expect_pair_failures=list(pair.failures),
        **file_digest(root, src),
    )


def _write_image_pair(root: Path, p: ImagePair) -> dict[str, Any]:
    ext = "png" if p.fmt == "png" else "jpg"
    src = f"edits/image/{p.name}_src.{ext}"
    (root / src).write_bytes(encode_image(p.src, p.fmt))
    if p.tgt_is_video:
        tgt, tgt_size = f"edits/video/{p.name}_tgt.mp4", (VID_W, VID_H)
        encode_video(root / tgt, pan_frames(p.tgt, VID_W, VID_H, VID_N, (1, 0)), *tgt_size, VID_FPS)
    elif p.tgt is None:
        tgt, tgt_size = f"edits/image/{p.name}_tgt.{ext}", p.src.shape[1::-1]
        shutil.copyfile(root / src, root / tgt)  # byte-identical on purpose
    else:
        tgt, tgt_size = f"edits/image/{p.name}_tgt.{ext}", p.tgt.shape[1::-1]
        (root / tgt).write_bytes(encode_image(p.tgt, p.fmt))
    return _pair_label(root, "image_edit", p, src, tgt, (p.src.shape[1::-1], tgt_size))


def _write_video_pair(root: Path, p: VideoPair) -> dict[str, Any]:
    src, tgt = f"edits/video/{p.name}_src.mp4", f"edits/video/{p.name}_tgt.mp4"
    encode_video(root / src, p.src(), VID_W, VID_H, VID_FPS)
    if p.tgt is None:
        shutil.copyfile(root / src, root / tgt)
    else:
        encode_video(root / tgt, p.tgt(), VID_W, VID_H, VID_FPS)
    size = (VID_W, VID_H)
    return _pair_label(root, "video_edit", p, src, tgt, (size, size))


def write_edits(root: Path, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write pair media; return (labels, rows of the edits.jsonl manifest)."""
    labels = [_write_image_pair(root, p) for p in image_pairs(seed)]
    labels += [_write_video_pair(root, p) for p in video_pairs(seed)]
    manifest = []
    for lab in labels:
        row = {"source": lab["source"], "target": lab["target"]}
        if lab["instruction"] is not None:  # the no_instruction negative omits the key entirely
            row["instruction"] = lab["instruction"]
        row["kind"] = lab["kind"]
        manifest.append(row)
    return labels, manifest
