"""Shapes between pixels, latents and tokens: causal frame groups, patches, positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def latent_frames(num_frames: int, temporal_factor: int) -> int:
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(
            f"frame count {num_frames} is not 1 + k * {temporal_factor} (causal video VAE: "
            f"the first frame alone, then groups of {temporal_factor})"
        )
    return 1 + (num_frames - 1) // temporal_factor


def group_frames(x: torch.Tensor, temporal_factor: int) -> torch.Tensor:
    """(B, T, ...) per-frame features -> (B, T', ...): frame 0 alone, then means of groups."""
    rest = x[:, 1:]
    if rest.shape[1] == 0:
        return x[:, :1]
    rest = rest.unflatten(1, (-1, temporal_factor)).mean(2)  # (B, k, ...)
    return torch.cat([x[:, :1], rest], 1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Latents (B, T, C, h, w) -> tokens (B, T * h/p * w/p, C * p * p), frame-major."""
    b, t, c, h, w = x.shape
    x = x.reshape(b, t, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, t * (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, shape: tuple[int, int, int, int], p: int) -> torch.Tensor:
    """Inverse of ``patchify``; shape = (T, C, h, w) of the latents."""
    t, c, h, w = shape
    x = tokens.reshape(tokens.shape[0], t, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(tokens.shape[0], t, c, h, w)


def pool_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, D) -> (B, n, D) by averaging consecutive runs (adaptive average pooling)."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)


def sinusoid(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Positions / timesteps (...,) -> (..., dim) [cos | sin] embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def pos_embed_3d(t: int, h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed (t, y, x) sinusoidal position embedding -> (t*h*w, dim), frame-major like patchify."""
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, device=device) for n in (t, h, w)), indexing="ij"), -1
    ).reshape(-1, 3)  # (N, 3)
    return pos_embed_at(grid, dim)


def pos_embed_at(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The same embedding at given (t, y, x) positions (N, 3) -> (N, dim)."""
    part = (dim // 3) // 2 * 2
    emb = torch.cat([sinusoid(positions[:, i], part) for i in range(3)], -1)
    return F.pad(emb, (0, dim - emb.shape[-1]))
