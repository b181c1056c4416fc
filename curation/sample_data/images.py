"""Still images: many aspect ratios, sizes and formats, some with burned-in text or watermarks."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from .labels import file_digest, media_fields, record
from .render import (
    WATERMARK_TEXT,
    apply_overlay,
    draw_text,
    landscape,
    logo_layer,
    mask_box,
    rng_for,
    text_scale_for_width,
    watermark_layer,
)

EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}


@dataclass(frozen=True)
class ImageSpec:
    name: str
    width: int
    height: int
    fmt: str
    palette: str
    text: tuple[str, ...] = ()
    watermark: str | None = None  # "text" | "logo"
    wm_corner: str = "br"  # tl | tr | bl | br
    wm_alpha: float = 0.4
    mode: str = "RGB"
    expect_filtered: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"images/{self.name}.{EXT[self.fmt]}"


IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec("square_512", 512, 512, "jpeg", "day"),
    ImageSpec("wide_640x360", 640, 360, "jpeg", "forest", text=("OPEN DAILY",)),
    ImageSpec("portrait_360x640", 360, 640, "png", "ocean", mode="RGBA"),
    ImageSpec("classic_480x360", 480, 360, "jpeg", "desert", watermark="text", wm_alpha=0.4),
    ImageSpec("photo_600x400", 600, 400, "png", "sunset", text=("SUMMER SALE",)),
    ImageSpec("wide_800x400", 800, 400, "webp", "ocean"),
    ImageSpec("panorama_900x300", 900, 300, "jpeg", "day"),
    ImageSpec("strip_200x800", 200, 800, "png", "forest", expect_filtered=("aspect_ratio",)),
    ImageSpec("tiny_64x48", 64, 48, "jpeg", "desert", expect_filtered=("too_small",)),
    ImageSpec(
        "hd_1280x720", 1280, 720, "jpeg", "day", watermark="logo", wm_corner="tl", wm_alpha=0.3
    ),
    ImageSpec(
        "poster_500x400",
        500,
        400,
        "png",
        "night",
        text=("NIGHT MARKET", "FRIDAY 9PM"),
        watermark="text",
        wm_corner="tr",
        wm_alpha=0.5,
    ),
    ImageSpec("gray_630x270", 630, 270, "jpeg", "forest", mode="L"),
)

# A re-encoded, downscaled copy of the first image: the near-duplicate a dedup stage must catch.
DUPLICATE_OF = IMAGES[0]
DUPLICATE_PATH = "images/square_512_dup_384.jpg"
DUPLICATE_SIZE = 384


def place_text_lines(img: np.ndarray, lines: tuple[str, ...]) -> list[list[int]]:
    """Stack large centred text lines around the image centre; return one box per line."""
    h, w = img.shape[:2]
    thickness = max(2, min(h, w) // 70)
    scale = min(text_scale_for_width(t, int(w * 0.6), thickness) for t in lines)
    line_h = int(cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][1] * 1.9)
    top = h // 2 - (line_h * (len(lines) - 1)) // 2
    return [
        draw_text(img, t, w // 2, top + i * line_h + line_h // 3, scale, thickness)
        for i, t in enumerate(lines)
    ]


def render_image(
    spec: ImageSpec, seed: int, text: bool = True, watermark: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """RGB pixels of ``spec`` before encoding, plus the overlay labels.

    ``text`` / ``watermark`` switch the overlays off so tests can diff against a clean render.
    """
    base = landscape(rng_for(seed, spec.name), spec.height, spec.width, spec.palette)
    img = base.copy()
    info: dict[str, Any] = media_fields(bool(spec.text), spec.watermark is not None)
    if spec.text:
        # Boxes are measured while drawing, so draw even when the caller wants clean pixels.
        info.update(text=list(spec.text), text_boxes=place_text_lines(img, spec.text))
        if not text:
            img = base.copy()
    if spec.watermark is not None:
        h, w = img.shape[:2]
        if spec.watermark == "text":
            layer = watermark_layer(h, w, WATERMARK_TEXT, spec.wm_corner, rel_width=0.3)
        else:
            layer = logo_layer(h, w, spec.wm_corner, rel_size=0.18)
        if watermark:
            apply_overlay(img, layer, spec.wm_alpha)
        info.update(
            watermark_box=mask_box(layer > 0),
            watermark_alpha=spec.wm_alpha,
            watermark_text=WATERMARK_TEXT if spec.watermark == "text" else None,
        )
    return img, info


def encode_image(rgb: np.ndarray, fmt: str, mode: str = "RGB", quality: int = 92) -> bytes:
    """Encode with Pillow using fixed settings (no EXIF, no timestamps: deterministic bytes)."""
    pil = Image.fromarray(rgb, "RGB")
    if mode != "RGB":
        pil = pil.convert(mode)
    buf = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        pil.save(buf, "PNG", compress_level=6)
    elif fmt == "webp":
        pil.save(buf, "WEBP", quality=85, method=4)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buf.getvalue()


def image_label(root: Path, rel: str, rgb_shape: tuple[int, ...], fmt: str, **extra: Any) -> dict:
    h, w = rgb_shape[:2]
    fields: dict[str, Any] = {"mode": "RGB", **media_fields(), **extra}
    return record(
        id=Path(rel).name,
        path=rel,
        kind="image",
        format=fmt,
        claimed_kind="image",
        true_kind="image",
        width=w,
        height=h,
        display_width=w,
        display_height=h,
        **fields,
        **file_digest(root, rel),
    )


def write_images(root: Path, seed: int) -> list[dict[str, Any]]:
    labels = []
    for spec in IMAGES:
        rgb, info = render_image(spec, seed)
        (root / spec.path).write_bytes(encode_image(rgb, spec.fmt, spec.mode))
        labels.append(
            image_label(
                root,
                spec.path,
                rgb.shape,
                spec.fmt,
                mode=spec.mode,
                expect_filtered=list(spec.expect_filtered),
                **info,
            )
        )

    rgb, _ = render_image(DUPLICATE_OF, seed)
    small = cv2.resize(rgb, (DUPLICATE_SIZE, DUPLICATE_SIZE), interpolation=cv2.INTER_AREA)
    (root / DUPLICATE_PATH).write_bytes(encode_image(small, "jpeg", quality=60))
    labels.append(
        image_label(root, DUPLICATE_PATH, small.shape, "jpeg", duplicate_of=DUPLICATE_OF.path)
    )
    return labels
