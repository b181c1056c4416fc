"""Short clips with known camera motion, cuts, subtitles, overlays, containers and codecs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from .labels import file_digest, media_fields, record
from .render import (
    WATERMARK_TEXT,
    apply_overlay,
    draw_text,
    landscape,
    mask_box,
    rng_for,
    text_scale_for_width,
    watermark_layer,
)

WATERMARK_ALPHA = 0.4
CONTAINER_NAME = {"mp4": "mp4", "matroska": "mkv"}
CODEC_NAME = {"libx264": "h264", "mpeg4": "mpeg4"}
# Scenes of the cut video, chosen to be as different as possible from each other.
CUT_PALETTES = ("day", "night", "desert")


@dataclass(frozen=True)
class VideoSpec:
    name: str
    width: int
    height: int
    seconds: float
    palette: str
    fps: int = 24
    camera: tuple[int, int] = (0, 0)  # viewport move per frame; content moves the opposite way
    codec: str = "libx264"
    container: str = "mp4"  # FFmpeg muxer name: mp4 | matroska
    cuts: tuple[float, ...] = ()
    subtitles: tuple[str, ...] = ()
    watermark: bool = False
    rotation: int | None = None  # CCW degrees stored as a display matrix
    motion: str | None = None
    expect_filtered: tuple[str, ...] = ()

    @property
    def num_frames(self) -> int:
        return round(self.fps * self.seconds)

    @property
    def path(self) -> str:
        return f"videos/{self.name}.{CONTAINER_NAME[self.container]}"


VIDEOS: tuple[VideoSpec, ...] = (
    VideoSpec("static_320x180", 320, 180, 3.0, "forest", motion="static"),
    VideoSpec("pan_slow_480x270", 480, 270, 4.0, "day", camera=(1, 0), motion="slow"),
    VideoSpec("pan_fast_480x270", 480, 270, 4.0, "ocean", camera=(8, 0), motion="fast"),
    VideoSpec("cuts_480x270", 480, 270, 9.0, "day", camera=(1, 0), cuts=(3.0, 6.0), motion="slow"),
    VideoSpec(
        "subtitles_480x270",
        480,
        270,
        5.0,
        "sunset",
        camera=(2, 0),
        motion="slow",
        subtitles=("HELLO THERE", "WELCOME BACK", "THIS IS A TEST", "SEE YOU SOON", "GOOD NIGHT"),
    ),
    VideoSpec(
        "watermark_480x270", 480, 270, 4.0, "desert", camera=(3, 0), motion="slow", watermark=True
    ),
    VideoSpec("vertical_270x480", 270, 480, 3.0, "ocean", camera=(0, 1), motion="slow"),
    VideoSpec(
        "short_1s_320x180",
        320,
        180,
        1.0,
        "day",
        camera=(1, 0),
        motion="slow",
        expect_filtered=("too_short",),
    ),
    VideoSpec(
        "matroska_400x240",
        400,
        240,
        3.0,
        "forest",
        camera=(1, 0),
        motion="slow",
        container="matroska",
    ),
    VideoSpec(
        "mpeg4_352x288_30fps",
        352,
        288,
        3.0,
        "sunset",
        fps=30,
        camera=(6, 0),
        motion="fast",
        codec="mpeg4",
    ),
    VideoSpec("rotated90_320x180", 320, 180, 2.5, "day", rotation=90, motion="static"),
)


def _codec_setup(stream: av.VideoStream, codec: str) -> None:
    # One thread and fixed rate control: x264/mpeg4 output is then byte-for-byte reproducible.
    stream.codec_context.thread_count = 1
    if codec == "libx264":
        # cpu-independent: x264's macroblock-tree kernels in plain C. Its AVX-512
        # mbtree_propagate_list works on groups of 8 macroblocks without masking the tail of a
        # row, so unless the width is a multiple of 128 px (not 320, 400, 270, ...) it adds
        # costs read from uninitialised heap memory into the QP decisions: the bytes then
        # depend on what earlier allocations left there. The C kernels read only what x264
        # wrote, and give the same bytes with any SIMD level (AVX-512, AVX2, none).
        stream.options = {
            "preset": "veryfast",
            "crf": "23",
            "threads": "1",
            "x264-params": "cpu-independent=1",
        }
    else:
        # Capped quantiser: a pure bitrate target starves on film grain and freezes frames.
        stream.bit_rate = 1_000_000
        stream.codec_context.qmax = 8
        stream.options = {"flags": "+bitexact", "threads": "1"}


def encode_video(
    path: Path,
    frames: Iterator[np.ndarray],
    width: int,
    height: int,
    fps: int,
    codec: str = "libx264",
    container: str = "mp4",
    rotation: int | None = None,
) -> int:
    """Encode RGB uint8 frames to yuv420p; returns the number of frames written.

    ``fflags=+bitexact`` stops the muxers from writing random UIDs (Matroska) or version
    strings, so identical input gives identical bytes. ``container`` is explicit because some
    callers deliberately write videos under image extensions.
    """
    n = 0
    with av.open(str(path), "w", format=container, options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        _codec_setup(stream, codec)
        if rotation:
            stream.set_display_rotation(rotation)
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            out.mux(stream.encode(frame))
            n += 1
        out.mux(stream.encode(None))
    return n


def pan_frames(
    canvas: np.ndarray, width: int, height: int, n: int, camera: tuple[int, int]
) -> Iterator[np.ndarray]:
    """Slide a viewport over ``canvas`` by whole pixels: exact, known global motion."""
    dx, dy = camera
    x0 = 0 if dx >= 0 else -dx * (n - 1)
    y0 = 0 if dy >= 0 else -dy * (n - 1)
    for i in range(n):
        x, y = x0 + i * dx, y0 + i * dy
        yield canvas[y : y + height, x : x + width]


def pan_canvas(seed: int, name: str, palette: str, w: int, h: int, n: int, cam: tuple[int, int]):
    return landscape(
        rng_for(seed, name), h + abs(cam[1]) * (n - 1), w + abs(cam[0]) * (n - 1), palette
    )


def _subtitle_style(spec: VideoSpec) -> tuple[float, int]:
    thickness = max(2, spec.height // 110)
    scale = min(
        min(text_scale_for_width(t, int(spec.width * 0.8), thickness) for t in spec.subtitles),
        spec.height / 300,
    )
    return scale, thickness


def video_frames(spec: VideoSpec, seed: int) -> tuple[Iterator[np.ndarray], dict[str, Any]]:
    """Frames of ``spec`` and the content labels that depend on how they were drawn."""
    w, h, n, fps = spec.width, spec.height, spec.num_frames, spec.fps
    info: dict[str, Any] = media_fields(bool(spec.subtitles), spec.watermark)
    if spec.rotation:
        # Draw the upright (display) picture, store it rotated clockwise; a player applying the
        # CCW display matrix shows it upright again.
        upright = landscape(rng_for(seed, spec.name), w, h, spec.palette)
        stored = np.ascontiguousarray(np.rot90(upright, -spec.rotation // 90))
        return (stored for _ in range(n)), info

    cut_frames = [round(t * fps) for t in spec.cuts]
    bounds = [0, *cut_frames, n]
    segments = []
    for k in range(len(bounds) - 1):
        seg_n = bounds[k + 1] - bounds[k]
        palette = CUT_PALETTES[k] if spec.cuts else spec.palette
        canvas = pan_canvas(seed, f"{spec.name}/{k}", palette, w, h, seg_n, spec.camera)
        segments.append(pan_frames(canvas, w, h, seg_n, spec.camera))
    info.update(cuts_s=list(spec.cuts), cut_frames=cut_frames)

    subtitle_at: list[str] = []  # the line shown on each frame
    scale, thick = _subtitle_style(spec) if spec.subtitles else (0.0, 0)
    if spec.subtitles:
        segs = []
        for i, line in enumerate(spec.subtitles):
            start, end = i * fps, min(n, (i + 1) * fps)
            box = draw_text(np.zeros((h, w, 3), np.uint8), line, w // 2, h - h // 12, scale, thick)
            segs.append(
                {
                    "text": line,
                    "start_s": start / fps,
                    "end_s": end / fps,
                    "start_frame": start,
                    "end_frame": end,
                    "box": box,
                }
            )
            subtitle_at += [line] * (end - start)
        info.update(
            text=list(spec.subtitles), text_boxes=[s["box"] for s in segs], text_segments=segs
        )
    wm_layer = None
    if spec.watermark:
        wm_layer = watermark_layer(h, w, WATERMARK_TEXT, "br", rel_width=0.3)
        info.update(
            watermark_box=mask_box(wm_layer > 0),
            watermark_alpha=WATERMARK_ALPHA,
            watermark_text=WATERMARK_TEXT,
        )

    def frames() -> Iterator[np.ndarray]:
        i = 0
        for seg in segments:
            for view in seg:
                frame = view.copy()
                if subtitle_at:
                    draw_text(frame, subtitle_at[i], w // 2, h - h // 12, scale, thick)
                if wm_layer is not None:
                    apply_overlay(frame, wm_layer, WATERMARK_ALPHA)
                yield frame
                i += 1

    return frames(), info


def video_label(root: Path, rel: str, spec: VideoSpec, num_frames: int, **extra: Any) -> dict:
    rotated = spec.rotation in (90, 270)
    dx, dy = spec.camera
    fields: dict[str, Any] = {**media_fields(), "cuts_s": [], "cut_frames": [], **extra}
    return record(
        id=Path(rel).name,
        path=rel,
        kind="video",
        format=CONTAINER_NAME[spec.container],
        claimed_kind="video",
        true_kind="video",
        width=spec.width,
        height=spec.height,
        display_width=spec.height if rotated else spec.width,
        display_height=spec.width if rotated else spec.height,
        fps=spec.fps,
        num_frames=num_frames,
        duration=num_frames / spec.fps,
        codec=CODEC_NAME[spec.codec],
        container=spec.container,
        rotation=spec.rotation or 0,
        motion=spec.motion,
        pan_px_per_frame=float(np.hypot(dx, dy)),
        pan_vector=[-dx, -dy],
        expect_filtered=list(spec.expect_filtered),
        **fields,
        **file_digest(root, rel),
    )


def write_video(root: Path, rel: str, spec: VideoSpec, seed: int, **extra: Any) -> dict[str, Any]:
    """Render + encode ``spec`` to ``rel`` (whatever its extension) and return its label."""
    frames, info = video_frames(spec, seed)
    n = encode_video(
        root / rel,
        frames,
        spec.width,
        spec.height,
        spec.fps,
        spec.codec,
        spec.container,
        spec.rotation,
    )
    return video_label(root, rel, spec, n, **{**info, **extra})


def write_videos(root: Path, seed: int) -> list[dict[str, Any]]:
    return [write_video(root, spec.path, spec, seed) for spec in VIDEOS]
