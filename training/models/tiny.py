"""The tiny sizes' backbones, built from scratch behind the backbone interfaces (``base``):
decoder body, DiT, and frozen stand-ins for the causal video VAE and SigLIP (fixed seeds,
the global RNG untouched).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.blocks import Block, Frozen, attention_mask, mlp
from training.models.geometry import (
    group_frames,
    latent_frames,
    patchify,
    pos_embed_3d,
    sinusoid,
    unpatchify,
)


class TinyDecoder(nn.Module):
    """The tiny language-model body: learned positions + Blocks + final RMSNorm.
    forward(embeds (B, L, D), key_mask (B, L), block_ids) -> hidden (B, L, D)."""

    def __init__(self, dim: int, depth: int, heads: int, max_positions: int = 256):
        super().__init__()
        self.dim = dim
        self.pos = nn.Embedding(max_positions, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)

    def forward(self, embeds, key_mask, block_ids=None):
        n = embeds.shape[1]
        if n > self.pos.num_embeddings:
            raise ValueError(f"sequence of {n} tokens > {self.pos.num_embeddings} positions")
        x = embeds + self.pos.weight[:n]
        mask = attention_mask(key_mask, block_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


class TinyDiT(nn.Module):
    """Wan-style DiT on latents: patch embed + 3D sinusoidal positions, blocks with adaLN from
    the timestep and cross-attention to the conditioning tokens, adaLN final layer.
    forward(x (B, T, C_in, h, w), t (B,), context (B, N, Dc), context_mask (B, N)) ->
    velocity (B, T, C_out, h, w)."""

    def __init__(self, in_channels, out_channels, dim, depth, heads, context_dim, patch=1):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.context_dim, self.patch = context_dim, patch
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.time = mlp(dim, dim)
        self.context = mlp(context_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dim, adaln=True) for _ in range(depth))
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out = nn.Linear(dim, out_channels * patch * patch)

    def forward(self, x, t, context, context_mask):
        b, f, _, h, w = x.shape
        p = self.patch
        pos = pos_embed_3d(f, h // p, w // p, self.embed.out_features, x.device)
        tokens = self.embed(patchify(x, p)) + pos.to(x.dtype)  # (B, N, D)
        temb = self.time(sinusoid(t * 1000, tokens.shape[-1]).to(x.dtype))  # (B, D)
        ctx = self.context(context)  # (B, N, D)
        for block in self.blocks:
            tokens = block(tokens, context=ctx, context_mask=context_mask, cond=temb)
        shift, scale = self.final_mod(F.silu(temb))[:, None].chunk(2, -1)
        out = self.out(self.final_norm(tokens) * (1 + scale) + shift)
        return unpatchify(out, (f, self.out_channels, h, w), p)


class TinyCausalVAE(Frozen):
    """Stand-in for a causal video VAE (tiny sizes). Encoding is linear: frame 0 alone through a
    (1, 8, 8)-strided Conv3d, later frames in groups of ``temporal_factor`` through a
    (tf, 8, 8)-strided one. Filters are orthonormal rows (fixed seed), so latents keep the pixel
    scale and ``decode`` (the transpose) is the least-squares reconstruction."""

    def __init__(self, channels=3, latent_channels=8, temporal_factor=4, seed=1234):
        super().__init__()
        self.latent_channels, self.temporal_factor = latent_channels, temporal_factor
        self.spatial_factor = 8
        gen = torch.Generator().manual_seed(seed)
        self.first = nn.Parameter(self._orthonormal(latent_channels, channels, 1, gen))
        self.rest = nn.Parameter(self._orthonormal(latent_channels, channels, temporal_factor, gen))
        self._freeze()

    @staticmethod
    def _orthonormal(out, channels, frames, gen):
        q, _ = torch.linalg.qr(torch.randn(channels * frames * 64, out, generator=gen))
        return q.T.reshape(out, channels, frames, 8, 8).contiguous()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W) -> (B, T', C', h, w)
        latent_frames(pixels.shape[1], self.temporal_factor)  # validates T
        x = pixels.transpose(1, 2)  # (B, C, T, H, W)
        z = F.conv3d(x[:, :, :1], self.first, stride=(1, 8, 8))
        if x.shape[2] > 1:
            rest = F.conv3d(x[:, :, 1:], self.rest, stride=(self.temporal_factor, 8, 8))
            z = torch.cat([z, rest], 2)
        return z.transpose(1, 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, T', C', h, w) -> pixels
        z = latents.transpose(1, 2)
        x = F.conv_transpose3d(z[:, :, :1], self.first, stride=(1, 8, 8))
        if z.shape[2] > 1:
            rest = F.conv_transpose3d(z[:, :, 1:], self.rest, stride=(self.temporal_factor, 8, 8))
            x = torch.cat([x, rest], 2)
        return x.transpose(1, 2)


class TinyVisionEncoder(Frozen):
    """Frozen stand-in for SigLIP (tiny sizes): 8x8 patch embed + one block + LayerNorm, from a
    fixed seed. encode(pixels (B, T, C, H, W)) -> (B, T', grid*grid, dim) unit-scale features
    (per-frame features averaged per latent frame, spatially pooled to ``grid``)."""

    def __init__(self, dim=32, temporal_factor=4, grid=4, channels=3, seed=4321):
        super().__init__()
        self.dim, self.temporal_factor, self.grid = dim, temporal_factor, grid
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch = nn.Conv2d(channels, dim, 8, 8)
            self.block = Block(dim, 2)
            self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self._freeze()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, t = pixels.shape[:2]
        x = self.patch(pixels.flatten(0, 1))  # (B*T, D, H/8, W/8)
        x = F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # (B*T, g*g, D)
        x = x + pos_embed_3d(1, self.grid, self.grid, self.dim, x.device).to(x.dtype)
        x = self.norm(self.block(x))
        return group_frames(x.unflatten(0, (b, t)), self.temporal_factor)
