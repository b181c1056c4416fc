"""Labelled PNG grids of media in [-1, 1]: the stage's training inputs per bucket, and samples.

A grid shows ``Cell``s, one per distinct sample: a label above (task, bucket, key, then the
prompt / instruction wrapped) and its media side by side under role names ("source" and
"target" of an edit, "reference" and "output" of a sample). An image cell is one row of media;
a video cell has a row per medium, each with up to ``MAX_FRAMES`` frames from first to last.
Frames are scaled so that their short side lies in [``PANEL_MIN``, ``PANEL_MAX``] px: tiny
model outputs are enlarged by whole factors, nearest neighbour (each model pixel a block, not
a blur). ``render_grid`` also returns where every label and frame lies (tests, crops).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.data.batch import TaskBatch
from training.tasks import task_spec

if TYPE_CHECKING:
    from PIL import Image as PILImage

MAX_FRAMES = 4  # frames shown per video medium (first to last, evenly spaced)
PANEL_MIN, PANEL_MAX = 128, 256  # px, the short side of a shown frame
CELL_MIN_WIDTH = 200  # px: room for a readable label beside a single small frame
MAX_ROW_PANELS = 8  # frames side by side in one row of the grid (sets the cells per row)
TEXT_LINES = 3  # lines of prompt / instruction under a cell's header lines
FONT_SIZE, CAPTION_SIZE = 14, 12
GAP, PAD = 6, 4  # px between frames / around text
BACKGROUND, INK, CAPTION_INK, RULE = (255, 255, 255), (0, 0, 0), (90, 90, 90), (200, 200, 200)

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive


@dataclass(frozen=True)
class Cell:
    """One sample: header ``lines`` (each cut to the cell's width), ``text`` (wrapped, at most
    ``TEXT_LINES`` lines) and ``media``: role -> (T, C, H, W) pixels in [-1, 1], C = 1 or 3."""

    lines: tuple[str, ...]
    text: str
    media: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Panel:
    role: str
    frame: int  # index into the medium's T frames
    box: Box  # where the (scaled) frame lies in the grid image


@dataclass(frozen=True)
class CellLayout:
    label_box: Box
    label: tuple[str, ...]  # the label lines as drawn
    panels: tuple[Panel, ...]


@dataclass
class Grid:
    image: PILImage.Image
    cells: list[CellLayout] = field(default_factory=list)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path)
        return path


# -- from batches to cells ------------------------------------------------------------------------


def distinct(keys: Sequence[str], limit: int | None = None) -> list[int]:
    """Indices of the first occurrence of each key, in order, at most ``limit``: a bucket with
    fewer samples than the batch repeats them, and a grid shows each sample once."""
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    picks = list(first.values())
    return picks if limit is None else picks[:limit]


def text_role(task: str) -> str:
    """What the sample's text is to the task: prompt, instruction or text (understanding)."""
    spec = task_spec(task)
    return "instruction" if spec.edit else "prompt" if spec.generation else "text"


def input_cells(batch: TaskBatch, bucket: Any, limit: int) -> list[Cell]:
    """One cell per distinct sample of ``batch`` (at most ``limit``): edits show source and
    target, other tasks their image or video."""
    cells = []
    for i in distinct(batch.keys, limit):
        if batch.source_pixels is not None:
            media = {"source": batch.source_pixels[i], "target": batch.pixels[i]}
        else:
            media = {"video" if batch.pixels.shape[1] > 1 else "image": batch.pixels[i]}
        cells.append(sample_cell(batch, i, bucket, media))
    return cells


def sample_cell(batch: TaskBatch, i: int, bucket: Any, media: Mapping[str, torch.Tensor]) -> Cell:
    """The cell of sample ``i`` of ``batch``: task, bucket and key over its text."""
    text = batch.texts[i] if i < len(batch.texts) else ""
    return Cell(
        lines=(f"{batch.task} · {bucket}", batch.keys[i]),
        text=f"{text_role(batch.task)}: {text}" if text else "",
        media=media,
    )


# -- rendering ------------------------------------------------------------------------------------


def render_grid(cells: Sequence[Cell], title: str = "", max_frames: int = MAX_FRAMES) -> Grid:
    """The cells in rows under ``title``: as many cells per row as keep a row within
    ``MAX_ROW_PANELS`` frames; every cell the same size (the largest frame, the longest label)."""
    from PIL import Image, ImageDraw

    if not cells:
        raise ValueError("a grid needs at least one cell")
    font, small = _font(FONT_SIZE), _font(CAPTION_SIZE)
    line_h, caption_h = _line_height(font), _line_height(small)
    # per cell: rows of (role, frame index, scaled frame)
    laid = [_cell_rows(c, max_frames) for c in cells]
    frames = [im for rows in laid for row in rows for _, _, im in row]
    slot_w, slot_h = max(im.width for im in frames), max(im.height for im in frames)
    num_cols = max(len(row) for rows in laid for row in rows)
    num_rows = max(len(rows) for rows in laid)
    cell_w = max(num_cols * slot_w + (num_cols - 1) * GAP, CELL_MIN_WIDTH)
    labels = [_label(c, font, cell_w) for c in cells]
    label_h = max(len(lines) for lines in labels) * line_h + 2 * PAD
    media_h = num_rows * (slot_h + caption_h + GAP)
    cell_h = label_h + media_h
    per_row = max(1, min(len(cells), MAX_ROW_PANELS // num_cols))
    grid_rows = math.ceil(len(cells) / per_row)
    title_lines = _wrap(title, font, per_row * (cell_w + 2 * GAP), 2) if title else []
    top = len(title_lines) * line_h + (2 * PAD if title_lines else 0)
    width = per_row * (cell_w + 2 * GAP) + GAP
    height = top + grid_rows * (cell_h + 2 * GAP) + GAP

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for n, line in enumerate(title_lines):
        draw.text((GAP + PAD, PAD + n * line_h), line, fill=INK, font=font)
    layouts = []
    for k, (rows, lines) in enumerate(zip(laid, labels, strict=True)):
        x0 = GAP + (k % per_row) * (cell_w + 2 * GAP) + GAP // 2
        y0 = top + GAP + (k // per_row) * (cell_h + 2 * GAP)
        draw.rectangle((x0 - GAP // 2, y0 - GAP // 2, x0 + cell_w + GAP // 2, y0 + cell_h),
                       outline=RULE)  # fmt: skip
        for n, line in enumerate(lines):
            draw.text((x0 + PAD, y0 + PAD + n * line_h), line, fill=INK, font=font)
        panels = []
        for r, row in enumerate(rows):
            y = y0 + label_h + r * (slot_h + caption_h + GAP)
            for c, (role, index, im) in enumerate(row):
                x = x0 + c * (slot_w + GAP)
                left, upper = x + (slot_w - im.width) // 2, y + (slot_h - im.height) // 2
                image.paste(im, (left, upper))
                panels.append(Panel(role, index, (left, upper, left + im.width, upper + im.height)))
                caption = _fit(_caption(role, index, cells[k].media[role]), small, slot_w)
                draw.text((x, y + slot_h + 1), caption, fill=CAPTION_INK, font=small)
        box = (x0, y0, x0 + cell_w, y0 + label_h)
        layouts.append(CellLayout(box, tuple(lines), tuple(panels)))
    return Grid(image, layouts)


def frame_indices(num_frames: int, max_frames: int = MAX_FRAMES) -> list[int]:
    """Up to ``max_frames`` indices evenly spaced from the first frame to the last."""
    picks = torch.linspace(0, num_frames - 1, min(num_frames, max_frames)).round().long()
    return picks.unique().tolist()


def to_image(frame: torch.Tensor) -> PILImage.Image:
    """(C, H, W) in [-1, 1], C = 1 or 3 -> RGB image, scaled to a readable size."""
    from PIL import Image

    if frame.dim() != 3 or frame.shape[0] not in (1, 3):
        raise ValueError(f"a frame must be (C, H, W) with C = 1 or 3, got {tuple(frame.shape)}")
    rgb = frame.detach().float().cpu().expand(3, -1, -1)
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return scaled(Image.fromarray(array))


def scaled(image: PILImage.Image) -> PILImage.Image:
    """Short side under ``PANEL_MIN``: enlarged by a whole factor, nearest neighbour (model
    pixels stay sharp blocks); over ``PANEL_MAX``: reduced to it (Lanczos)."""
    from PIL import Image

    short = min(image.size)
    if short < PANEL_MIN:
        factor = math.ceil(PANEL_MIN / short)
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    if short > PANEL_MAX:
        ratio = PANEL_MAX / short
        size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
        return image.resize(size, Image.LANCZOS)
    return image


def _cell_rows(cell: Cell, max_frames: int) -> list[list[tuple[str, int, Any]]]:
    """Images: one row, the media side by side; videos: a row per medium, frames across."""
    if not cell.media:
        raise ValueError(f"cell {cell.lines} has no media")
    media = {}
    for role, pixels in cell.media.items():
        if pixels.dim() != 4:
            raise ValueError(f"{role} of {cell.lines}: expected (T, C, H, W), got {pixels.dim()}-d")
        media[role] = [
            (role, i, to_image(pixels[i])) for i in frame_indices(len(pixels), max_frames)
        ]
    if all(len(frames) == 1 for frames in media.values()):
        return [[frames[0] for frames in media.values()]]
    return list(media.values())


def _caption(role: str, index: int, pixels: torch.Tensor) -> str:
    return role if len(pixels) == 1 else f"{role} · frame {index + 1}/{len(pixels)}"


def _label(cell: Cell, font: Any, width: int) -> list[str]:
    lines = [_fit(line, font, width - 2 * PAD) for line in cell.lines]
    return lines + _wrap(cell.text, font, width - 2 * PAD, TEXT_LINES)


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Words in lines of at most ``width`` px (a longer word is cut); past ``max_lines`` the
    last line ends in an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:
            cut = _fit(current, font, width, ellipsis="")
            lines.append(cut)
            current = current[len(cut) :]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = _fit(lines[max_lines - 1] + " …", font, width)  # ends in an ellipsis either way
        lines = [*lines[: max_lines - 1], last]
    return lines


def _fit(text: str, font: Any, width: int, ellipsis: str = "…") -> str:
    """``text`` cut to ``width`` px, the cut marked with ``ellipsis`` (at least one character
    is kept, so that wrapping a long word always moves on)."""
    if font.getlength(text) <= width:
        return text
    body = text
    while body and font.getlength(body.rstrip() + ellipsis) > width:
        body = body[:-1]
    return body.rstrip() + ellipsis if body else text[:1]


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font (FreeType)


def _line_height(font: Any) -> int:
    left, top, right, bottom = font.getbbox("Ag·…")
    return bottom + PAD
