"""PNG grids of pixels in [-1, 1]: the stage's training inputs per bucket, and stage-end samples.

A grid is rows of media side by side: ``rows`` is a list of (B, C, H, W) tensors of one shape;
row ``r`` holds sample ``b`` at column ``b``.
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_FRAMES = 4  # frames shown per video sample (first to last, evenly spaced)


def save_grid(rows: list[torch.Tensor], path: Path) -> Path:
    """Write rows of (B, C, H, W) media as one RGB PNG at ``path``."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r.float()), dim=2) for r in rows], dim=1)  # (C, rH, BW)
    rgb = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def frame_rows(pixels: torch.Tensor, max_frames: int = MAX_FRAMES) -> list[torch.Tensor]:
    """(B, T, C, H, W) -> up to ``max_frames`` rows (B, C, H, W): frames evenly spaced from the
    first to the last (one row for images)."""
    t = pixels.shape[1]
    picks = torch.linspace(0, t - 1, min(t, max_frames)).round().long().unique().tolist()
    return [pixels[:, i] for i in picks]
