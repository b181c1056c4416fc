"""Pieces shared by the model families: tokenizer, frozen stand-ins, flow matching, blocks.

Tiny sizes build everything here from scratch; production sizes (``registry``) swap in
pretrained backbones behind the same small interfaces:
- a *decoder* maps ``(embeds (B, L, D), key_mask (B, L), block_ids (B, L) | None)`` to hidden
  states ``(B, L, D)``; ``block_ids`` gives the attention pattern (see ``attention_mask``);
- a *vision encoder* maps pixels ``(B, T, C, H, W)`` to frozen features ``(B, T', N, De)``;
- a *VAE* maps pixels to latents ``(B, T', C_lat, H/8, W/8)``, ``T' = 1 + (T - 1) / tf``;
- a *DiT* maps ``(x (B, T', C_in, h, w), t (B,), context (B, N, Dc), context_mask (B, N))`` to
  a velocity ``(B, T', C_out, h, w)``.
Every random choice in ``forward`` uses torch's global RNG (the trainer seeds it); the frozen
stand-ins are initialised from fixed seeds without touching it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.data.batch import TaskBatch
from training.data.buckets import BucketShape
from training.models.base import UnifiedModel
from training.tasks import EDIT_TASKS, IMAGE_TASKS, TASKS, TEXT_TO_MEDIA_TASKS


# ---------------------------------------------------------------- text
def pad_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence -> (ids (B, L) int64, mask (B, L) int64)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) + pad/bos/eos: ``[bos, bytes..., eos]``, at most max_len ids.

    Long texts keep their first ``max_len - 2`` bytes (eos always ends a sequence); a batch is
    right-padded to its longest sequence. Unencodable characters (lone surrogates) become '?'.
    """

    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259

    def __init__(self, max_len: int):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 (bos + 1 byte + eos), got {max_len}")
        self.max_len = max_len

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [
            [self.BOS, *t.encode("utf-8", errors="replace")[: self.max_len - 2], self.EOS]
            for t in texts
        ]
        return pad_sequences(seqs, self.PAD)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE of logits (B, L, V) at position i against ids[:, i], padding (mask == 0) ignored."""
    target = ids.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)


# ---------------------------------------------------------------- geometry helpers
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
    part = (dim // 3) // 2 * 2
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, device=device) for n in (t, h, w)), indexing="ij"), -1
    ).reshape(-1, 3)  # (N, 3)
    emb = torch.cat([sinusoid(grid[:, i], part) for i in range(3)], -1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


# ---------------------------------------------------------------- flow matching
def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Wan timestep shift: t' = s t / (1 + (s - 1) t); s > 1 favours noisier t."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, shift: float = 1.0, kind: str = "logit_normal", device=None):
    """(n,) flow times in (0, 1) from the global RNG: logit-normal (SD3) or uniform, shifted."""
    if kind == "logit_normal":
        t = torch.sigmoid(torch.randn(n, device=device))
    elif kind == "uniform":
        t = torch.rand(n, device=device)
    else:
        raise ValueError(f"timestep sampling {kind!r}; allowed: logit_normal, uniform")
    return shift_timesteps(t, shift)


def flow_pair(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x0 + t noise and the velocity target noise - x0 (rectified flow)."""
    noise = torch.randn_like(x0)
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * noise, noise - x0


# velocity(x_t (B, T', C, h, w), t (B,) float32, uncond) -> predicted velocity like x_t;
# uncond=True: the family's null condition (what condition dropout trains)
Velocity = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


@torch.no_grad()
def euler_sample(
    velocity: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0, guidance: float = 1.0
) -> torch.Tensor:
    """Integrate the flow from noise (t = 1) to data (t = 0) with ``steps`` Euler steps on the
    shifted grid ``shift_timesteps(linspace(1, 0, steps + 1), shift)`` (the training shift).
    ``guidance`` != 1: classifier-free guidance ``v_u + guidance * (v_c - v_u)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    # The state accumulates in fp32 (bf16 would lose ~1e-2 over 20 steps); the model sees its
    # own dtype.
    dtype, x = noise.dtype, noise.float()
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        tt = torch.full((x.shape[0],), t, device=x.device)
        v = velocity(x.to(dtype), tt, False).float()
        if guidance != 1.0:
            v_uncond = velocity(x.to(dtype), tt, True).float()
            v = v_uncond + guidance * (v - v_uncond)
        x = x + (t_next - t) * v
    return x.to(dtype)


# ---------------------------------------------------------------- attention + blocks
def attention_mask(key_mask: torch.Tensor, block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, 1, L, L), True = may attend. Query i sees key j when j is not padding and
    block_ids[j] <= block_ids[i]: increasing ids give causal attention, equal ids a bidirectional
    block (HaploOmni: causal text, bidirectional visual/latent tokens); None means causal.
    Every query also sees itself so no row is empty (padding rows stay finite, never read)."""
    b, n = key_mask.shape
    if block_ids is None:
        block_ids = torch.arange(n, device=key_mask.device)
    block_ids = block_ids.expand(b, n)
    allowed = (block_ids[:, None, :] <= block_ids[:, :, None]) & key_mask.bool()[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool, device=key_mask.device)
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):  # x (B, L, D), context (B, N, Dkv)
        ctx = x if context is None else context
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, L, d)
        k, v = self.kv(ctx).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).flatten(2))


def mlp(dim: int, hidden: int, out: int | None = None) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, out or dim)
    )


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention (Wan style, not
    modulated), MLP; with ``adaln`` a conditioning vector (B, D) or per token (B, L, D) gives
    shift/scale/gate of the self-attention and MLP branches (DiT adaLN).
    ``gradient_checkpointing`` (attribute) recomputes the block in backward."""

    checkpointable = True

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, adaln=False):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross = Attention(dim, heads, context_dim) if context_dim else None
        self.norm_c = nn.RMSNorm(dim) if context_dim else None
        self.mlp = mlp(dim, 4 * dim)
        self.mod = nn.Linear(dim, 6 * dim) if adaln else None
        self.gradient_checkpointing = False

    def forward(self, x, mask=None, context=None, context_mask=None, cond=None):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(
                self._forward, x, mask, context, context_mask, cond, use_reentrant=False
            )
        return self._forward(x, mask, context, context_mask, cond)

    def _forward(self, x, mask, context, context_mask, cond):
        if self.mod is None:
            shift1 = scale1 = shift2 = scale2 = 0.0
            gate1 = gate2 = 1.0
        else:
            mods = self.mod(F.silu(cond))
            mods = mods[:, None] if mods.dim() == 2 else mods  # (B, 1 | L, 6D)
            shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, -1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, mask=mask)
        if self.cross is not None:
            cmask = None if context_mask is None else context_mask.bool()[:, None, None, :]
            x = x + self.cross(self.norm_c(x), context, cmask)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


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


# ---------------------------------------------------------------- frozen stand-ins
class Frozen(nn.Module):
    """A module that never trains: parameters without grad, always in eval mode."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


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


# ---------------------------------------------------------------- family base
class FamilyModel(UnifiedModel):
    """What the three families share: tokenizer, trainable-group rules, batch checks, losses.

    Attributes a trainer may set between stages: ``timestep_shift`` (flow-matching shift),
    ``timestep_sampling`` ("logit_normal" | "uniform"); ``set_gradient_checkpointing(bool)``.
    """

    frozen_groups: tuple[str, ...] = ()  # never trainable, whatever the stage globs say
    timestep_shift: float = 1.0
    timestep_sampling: str = "logit_normal"

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(list(texts))

    def supported_tasks(self) -> tuple[str, ...]:
        return TASKS

    def set_trainable(self, patterns: list[str]) -> list[str]:
        """Like the base, but frozen groups (VAE, vision encoder) are never made trainable: a
        pattern matching only frozen groups is an error, one that also matches others skips
        them."""
        for pattern in patterns:
            hits = self.select_groups([pattern])  # errors on a pattern matching nothing
            if all(h in self.frozen_groups for h in hits):
                raise ValueError(
                    f"module group {hits[0]!r} of {self.family} is frozen (a fixed pretrained "
                    f"component); trainable groups: {', '.join(self.trainable_groups())}"
                )
        chosen = [g for g in self.select_groups(patterns) if g not in self.frozen_groups]
        for name, group in self.groups.items():
            group.requires_grad_(name in chosen)
        return chosen

    def trainable_groups(self) -> list[str]:
        return [n for n in self.groups if n not in self.frozen_groups]

    def group_parameter_counts(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in g.parameters()) for n, g in self.groups.items()}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in backward (non-reentrant): our blocks, transformers models,
        diffusers models that support it."""
        for module in self.modules():
            if getattr(type(module), "checkpointable", False):  # our blocks
                module.gradient_checkpointing = enabled
            elif getattr(module, "supports_gradient_checkpointing", False):  # transformers
                _hf_checkpointing(module, enabled)
            elif getattr(module, "_supports_gradient_checkpointing", False):  # diffusers
                if enabled:
                    module.enable_gradient_checkpointing()
                else:
                    module.disable_gradient_checkpointing()
        checkpoint_ready(self)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the parameters (float32, or bf16 under DeepSpeed)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def prepare(self, batch: TaskBatch) -> TaskBatch:
        """Check the batch against the task and geometry; media cast to the compute dtype."""
        self.check_batch(batch)
        src = batch.source_pixels
        return replace(
            batch,
            pixels=batch.pixels.to(self.dtype),
            source_pixels=None if src is None else src.to(self.dtype),
        )

    def check_batch(self, batch: TaskBatch) -> None:
        g = self.geometry
        if batch.task not in self.supported_tasks():
            raise ValueError(
                f"task {batch.task!r} is not supported by {self.family}; "
                f"supported: {', '.join(self.supported_tasks())}"
            )
        media = [("pixels", batch.pixels)]
        if batch.task in EDIT_TASKS:
            if batch.source_pixels is None:
                raise ValueError(f"task {batch.task} needs source_pixels (the edit source)")
            if batch.source_pixels.shape != batch.pixels.shape:
                raise ValueError(
                    f"edit source {tuple(batch.source_pixels.shape)} and target "
                    f"{tuple(batch.pixels.shape)} must have the same shape (B, T, C, H, W)"
                )
            media.append(("source_pixels", batch.source_pixels))
        for name, px in media:
            if px.dim() != 5:
                raise ValueError(f"{name} must be (B, T, C, H, W), got {tuple(px.shape)}")
            t, h, w = px.shape[1], px.shape[3], px.shape[4]
            if h % g.spatial_factor or w % g.spatial_factor:
                raise ValueError(f"{name} {h}x{w}: sides must be multiples of {g.spatial_factor}")
            if batch.task in IMAGE_TASKS and t != 1:
                raise ValueError(f"{name}: image task {batch.task} needs T == 1, got {t}")
            latent_frames(t, g.temporal_factor)

    def can_generate(self) -> bool:
        """Whether ``sample`` works: the family has a text-to-image / text-to-video path."""
        return hasattr(self, "_text_velocity") and any(
            t in self.supported_tasks() for t in TEXT_TO_MEDIA_TASKS
        )

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        shape: BucketShape | tuple[int, int, int],
        steps: int = 20,
        generator: torch.Generator | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """Text-to-image / video samples: pixels (B, T, C, H, W) in [-1, 1], B = len(prompts),
        (T, H, W) = ``shape`` (a BucketShape or (frames, height, width)).

        Flow-matching Euler sampling (``euler_sample``) on the training timestep shift;
        ``guidance`` != 1 is classifier-free guidance against the null condition that condition
        dropout trains (dropped text). The only randomness is the initial noise, drawn on the
        CPU from ``generator``: a fixed seed gives the same samples. Runs in eval mode."""
        if not self.can_generate():
            raise NotImplementedError(f"{self.family} has no text-to-image/video path")
        if isinstance(shape, tuple):
            shape = BucketShape(*shape)
        geo, vae = self.geometry, self.groups["vae"]
        if shape.height % geo.spatial_factor or shape.width % geo.spatial_factor:
            raise ValueError(f"{shape}: sides must be multiples of {geo.spatial_factor}")
        device, dtype = next(self.parameters()).device, self.dtype
        latent_shape = (
            len(prompts),
            latent_frames(shape.frames, geo.temporal_factor),
            vae.latent_channels,
            shape.height // vae.spatial_factor,
            shape.width // vae.spatial_factor,
        )
        noise = torch.randn(latent_shape, generator=generator).to(device, dtype)
        was_training = self.training
        self.eval()
        try:
            ids, mask = self.tokenize(list(prompts))
            velocity = self._text_velocity(ids.to(device), mask.to(device))
            latents = euler_sample(velocity, noise, steps, self.timestep_shift, guidance)
            return vae.decode(latents).float().clamp(-1, 1)
        finally:
            self.train(was_training)

    def _drop(self, batch: TaskBatch, name: str) -> torch.Tensor:
        """(B,) bool: True where the condition `name` is dropped for the sample."""
        flags = batch.drop.get(name)
        if flags is None:
            return torch.zeros(batch.size, dtype=torch.bool, device=batch.pixels.device)
        return flags.to(device=batch.pixels.device, dtype=torch.bool)

    def _sample_t(self, n: int, device) -> torch.Tensor:
        return sample_timesteps(n, self.timestep_shift, self.timestep_sampling, device)

    @staticmethod
    def _result(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"loss": sum(parts.values())}
        out.update({f"loss/{k}": v.detach() for k, v in parts.items()})
        return out


def checkpoint_ready(model: nn.Module) -> nn.Module:
    """Give every transformers / diffusers submodule with a ``gradient_checkpointing`` flag a
    non-reentrant checkpoint function (diffusers leaves the reentrant default after a disable),
    so flipping the flags alone also works."""
    for module in model.modules():
        has_flag = hasattr(module, "gradient_checkpointing") and not getattr(
            type(module), "checkpointable", False
        )
        func = getattr(module, "_gradient_checkpointing_func", None)
        if has_flag and (func is None or func is checkpoint):
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return model


def _hf_checkpointing(model: nn.Module, enabled: bool) -> None:
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its "embeddings not exposed" note: ours sit outside the body
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            if enabled:
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.activation_checkpointing_disable()
        elif enabled:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    finally:
        logging.set_verbosity(verbosity)


class MultimodalLM(nn.Module):
    """A causal LM that also reads visual features: token embedding + decoder body + an MLP
    projector from vision-encoder features into the LM width (LLaVA / VILA style).
    The LM head lives elsewhere (``text_head``)."""

    def __init__(self, embed: nn.Module, decoder: nn.Module, vision_dim: int, dim: int):
        super().__init__()
        self.embed, self.decoder = embed, decoder
        self.projector = mlp(vision_dim, dim, dim)
        self.dim = dim

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        return self.embed(ids)

    def embed_visual(self, feats: torch.Tensor) -> torch.Tensor:  # (B, N, De) -> (B, N, D)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def forward(self, embeds, key_mask, block_ids=None):
        return self.decoder(embeds, key_mask, block_ids)


class TokenSet(nn.Module):
    """n learned tokens (n, dim): vision-head slots, VINO's learnable queries, null conditions."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(n, dim) * 0.02)

    def expand(self, batch: int) -> torch.Tensor:  # (B, n, dim)
        return self.tokens[None].expand(batch, -1, -1)
