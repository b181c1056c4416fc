"""Broken and mislabelled files: what an ingest stage must reject, or recognise by content."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

from .images import encode_image, image_label
from .labels import file_digest, record
from .render import landscape, rng_for
from .videos import VideoSpec, write_video

TRUNCATE_FRACTION = 0.4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CLIP = VideoSpec("corrupt_src", 320, 180, 2.0, "day", camera=(2, 0), motion="slow")


def _png_header_only(width: int, height: int) -> bytes:
    """PNG signature + a well-formed IHDR chunk and nothing else (no IDAT, no IEND)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunk = b"IHDR" + ihdr
    return (
        PNG_SIGNATURE + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def _ftyp_only(mp4: bytes) -> bytes:
    size = struct.unpack(">I", mp4[:4])[0]
    if mp4[4:8] != b"ftyp":
        raise RuntimeError("the mp4 muxer is expected to start files with the ftyp box")
    return mp4[:size]


def _broken(
    root: Path, rel: str, data: bytes, corrupt: str, true_kind: str | None, fmt: str | None
) -> dict[str, Any]:
    (root / rel).write_bytes(data)
    claimed = "video" if rel.endswith(".mp4") else "image"
    return record(
        id=Path(rel).name,
        path=rel,
        kind=claimed,
        expect="error",
        format=fmt,
        claimed_kind=claimed,
        true_kind=true_kind,
        corrupt=corrupt,
        **file_digest(root, rel),
    )


def write_corrupt(root: Path, seed: int) -> list[dict[str, Any]]:
    labels = []

    # The valid video is written under a .png name on purpose: it is also the mislabelled case.
    video_as_png = "corrupt/clip_really_mp4.png"
    lab = write_video(root, video_as_png, _CLIP, seed)
    lab.update(claimed_kind="image")
    mp4 = (root / video_as_png).read_bytes()

    rgb = landscape(rng_for(seed, "corrupt/jpeg"), 240, 320, "forest")
    jpeg = encode_image(rgb, "jpeg")

    # mp4 is written with the moov index last (no faststart), so a 40% prefix has no index.
    # A truncated JPEG still opens in lenient decoders (cv2, FFmpeg) but PIL's load() raises.
    broken = [
        ("truncated.mp4", mp4[: int(len(mp4) * TRUNCATE_FRACTION)], "truncated", "video", "mp4"),
        ("truncated.jpg", jpeg[: int(len(jpeg) * TRUNCATE_FRACTION)], "truncated", "image", "jpeg"),
        ("empty.jpg", b"", "empty", None, None),
        (
            "random_bytes.mp4",
            rng_for(seed, "corrupt/random").bytes(32 * 1024),
            "random_bytes",
            None,
            None,
        ),
        ("header_only.mp4", _ftyp_only(mp4), "header_only", "video", "mp4"),
        ("header_only.png", _png_header_only(320, 240), "header_only", "image", "png"),
    ]
    for name, data, how, true_kind, fmt in broken:
        labels.append(_broken(root, f"corrupt/{name}", data, how, true_kind, fmt))

    photo_as_mp4 = "corrupt/photo_really_jpeg.mp4"
    (root / photo_as_mp4).write_bytes(jpeg)
    img_lab = image_label(root, photo_as_mp4, rgb.shape, "jpeg")
    img_lab.update(claimed_kind="video")
    labels += [img_lab, lab]
    return labels
