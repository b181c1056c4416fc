"""Deterministic pixel synthesis shared by the image, video and edit generators.

Everything here is a pure function of its arguments (including the numpy Generator), so the
corpus can be regenerated bit-for-bit and tests can re-render the "clean" version of an item
to compare against what was written to disk.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np

Box = list[int]  # [x0, y0, x1, y1], pixels, x1/y1 exclusive

WATERMARK_TEXT = "(c) STOCKWM"  # the stock-photo logo used on images and videos

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_BOLD = cv2.FONT_HERSHEY_DUPLEX


def rng_for(seed: int, name: str) -> np.random.Generator:
    """Per-item generator: items stay stable when others are added or reordered.

    crc32 instead of hash() because str hashes are salted per interpreter run.
    """
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


@dataclass(frozen=True)
class Palette:
    sky_top: tuple[int, int, int]
    sky_bottom: tuple[int, int, int]
    far: tuple[int, int, int]
    near: tuple[int, int, int]
    accent: tuple[int, int, int]


# Visually far apart on purpose: the scene-cut video relies on palettes differing strongly.
PALETTES: dict[str, Palette] = {
    "day": Palette((70, 130, 210), (190, 220, 240), (90, 140, 90), (60, 110, 40), (250, 240, 180)),
    "night": Palette((5, 8, 30), (30, 40, 80), (20, 25, 45), (10, 15, 25), (230, 230, 255)),
    "desert": Palette(
        (235, 150, 60), (250, 210, 140), (200, 120, 60), (170, 90, 40), (255, 250, 210)
    ),
    "forest": Palette(
        (120, 160, 150), (200, 215, 200), (40, 90, 50), (20, 60, 30), (240, 230, 160)
    ),
    "ocean": Palette((40, 90, 160), (150, 200, 230), (30, 80, 140), (20, 60, 110), (255, 255, 240)),
    "sunset": Palette((80, 40, 110), (250, 140, 80), (90, 50, 70), (50, 30, 40), (255, 200, 120)),
}


def noise_field(rng: np.random.Generator, h: int, w: int, cells: tuple[int, ...]) -> np.ndarray:
    """Smooth multi-octave noise in roughly [-1, 1] (cheap stand-in for Perlin noise).

    Coarse random grids are upsampled with bicubic interpolation; smaller cells get less weight
    so the result looks like natural texture rather than white noise (which would also bloat
    the encoded files and make 1 px pans look like large frame differences).
    """
    out = np.zeros((h, w), np.float32)
    weight = 1.0
    for cell in cells:
        gh, gw = h // cell + 3, w // cell + 3
        small = rng.standard_normal((gh, gw)).astype(np.float32)
        big = cv2.resize(small, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)
        out += weight * big[cell : cell + h, cell : cell + w]
        weight *= 0.5
    return out / 1.5


def _lerp(a: tuple[int, int, int], b: tuple[int, int, int], t: np.ndarray) -> np.ndarray:
    a_ = np.asarray(a, np.float32)
    b_ = np.asarray(b, np.float32)
    return a_ + (b_ - a_) * t[..., None]


def landscape(rng: np.random.Generator, h: int, w: int, palette: str = "day") -> np.ndarray:
    """A natural-ish RGB uint8 scene: cloudy sky, sun glow, two hill layers, rocks, film grain.

    Tuned against RapidOCR's PP-OCR detector, which hallucinates text boxes on smooth synthetic
    content: flat fills, strong low-frequency mottling, and glyph-like objects (a hard-edged sun
    reads as "O", a tree trunk as "1"). Pixel grain, mild texture and soft or squat shapes keep
    clean renders free of detections while giving motion estimators plenty of texture.
    """
    pal = PALETTES[palette]
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]

    img = _lerp(pal.sky_top, pal.sky_bottom, np.broadcast_to(ys / h, (h, w)))
    img += 10 * noise_field(rng, h, w, (max(h // 2, 8), 24))[..., None]

    r = max(6, h // 12)
    sx, sy = rng.uniform(r, max(r + 1, w - r)), rng.uniform(r, 0.3 * h + r)
    glow = np.exp(-((xs - sx) ** 2 + (ys - sy) ** 2) / (2 * (1.5 * r) ** 2))[..., None]
    img = img * (1 - glow) + np.asarray(pal.accent, np.float32) * glow

    # Ridge lines are functions of absolute x so a wide canvas cropped for panning stays coherent.
    far_line = 0.45 * h + 0.06 * h * noise_field(rng, 1, w, (160, 40))[0]
    near_line = 0.68 * h + 0.05 * h * noise_field(rng, 1, w, (90, 25))[0]
    tex = noise_field(rng, h, w, (48, 12, 4))
    for line, color, amp in ((far_line, pal.far, 9), (near_line, pal.near, 14)):
        mask = np.clip(ys - line[None, :] + 0.5, 0, 1)  # 1 px soft edge
        layer = np.asarray(color, np.float32) + amp * tex[..., None]
        img = img * (1 - mask[..., None]) + layer * mask[..., None]

    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(max(3, w // 60)):
        x = int(rng.integers(0, w))
        rw, rh = int(rng.integers(8, 28)), int(rng.integers(6, 20))
        shade = tuple(int(c) for c in np.clip(np.asarray(pal.near) * rng.uniform(0.4, 1.6), 0, 255))
        base = int(near_line[x])
        cv2.ellipse(img, (x, base + rh // 2), (rw, rh), 0, 180, 360, shade, -1, cv2.LINE_AA)

    grain = rng.normal(0.0, 16.0, img.shape).astype(np.float32)
    return np.clip(img + grain, 0, 255).astype(np.uint8)


def mask_box(mask: np.ndarray) -> Box:
    """Tight [x0, y0, x1, y1] (exclusive) bounding box of the non-zero pixels of a 2-D mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def text_scale_for_width(text: str, width: int, thickness: int, font: int = FONT) -> float:
    (tw, _), _ = cv2.getTextSize(text, font, 1.0, thickness)
    return width / tw


def draw_text(
    img: np.ndarray,
    text: str,
    center_x: int,
    baseline_y: int,
    scale: float,
    thickness: int,
    color: tuple[int, int, int] = (255, 255, 255),
    outline: tuple[int, int, int] = (0, 0, 0),
) -> Box:
    """Burn outlined text into ``img`` in place; return the box of every pixel it touched.

    White-on-black outline is the subtitle look: readable (and OCR-detectable) on any
    background. The box is measured from the rendered mask, not cv2.getTextSize, so it is exact.
    """
    (tw, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
    org = (int(center_x - tw / 2), int(baseline_y))
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.putText(mask, text, org, FONT, scale, 255, thickness + 4, cv2.LINE_AA)
    cv2.putText(img, text, org, FONT, scale, outline, thickness + 4, cv2.LINE_AA)
    cv2.putText(img, text, org, FONT, scale, color, thickness, cv2.LINE_AA)
    return mask_box(mask)


def watermark_layer(h: int, w: int, text: str, corner: str, rel_width: float) -> np.ndarray:
    """Coverage mask in [0, 1] of a stock-photo style text logo with a frame, in a corner."""
    thickness = max(1, int(w * rel_width / 90))
    scale = text_scale_for_width(text, int(w * rel_width), thickness, FONT_BOLD)
    (tw, th), bl = cv2.getTextSize(text, FONT_BOLD, scale, thickness)
    pad = max(4, th // 2)
    margin = max(6, w // 40)
    x0 = margin + pad if corner[1] == "l" else w - margin - pad - tw
    y_base = margin + pad + th if corner[0] == "t" else h - margin - pad - bl
    layer = np.zeros((h, w), np.uint8)
    cv2.putText(layer, text, (x0, y_base), FONT_BOLD, scale, 255, thickness, cv2.LINE_AA)
    box = (x0 - pad, y_base - th - pad, x0 + tw + pad, y_base + bl + pad)
    cv2.rectangle(layer, box[:2], box[2:], 255, max(1, thickness // 2), cv2.LINE_AA)
    return layer.astype(np.float32) / 255.0


def logo_layer(h: int, w: int, corner: str, rel_size: float) -> np.ndarray:
    """Coverage mask of a shape-only logo (ring + triangle): a watermark OCR cannot read."""
    r = max(8, int(min(h, w) * rel_size / 2))
    margin = max(6, w // 40)
    cx = margin + r if corner[1] == "l" else w - margin - r
    cy = margin + r if corner[0] == "t" else h - margin - r
    layer = np.zeros((h, w), np.uint8)
    cv2.circle(layer, (cx, cy), r, 255, max(2, r // 6), cv2.LINE_AA)
    tri = np.array([[cx, cy - r // 2], [cx - r // 2, cy + r // 3], [cx + r // 2, cy + r // 3]])
    cv2.fillPoly(layer, [tri.astype(np.int32)], 255, cv2.LINE_AA)
    return layer.astype(np.float32) / 255.0


def apply_overlay(
    img: np.ndarray, layer: np.ndarray, alpha: float, color: tuple[int, int, int] = (255, 255, 255)
) -> Box:
    """Alpha-blend ``color`` where ``layer`` covers, in place; return the covered box."""
    a = (alpha * layer)[..., None]
    blended = img.astype(np.float32) * (1 - a) + np.asarray(color, np.float32) * a
    img[...] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return mask_box(layer > 0)
