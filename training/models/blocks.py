"""Layers the families are built from: attention with block masks, the (adaLN) transformer
block, frozen modules, the multimodal LM wrapper and learned token sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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


class Frozen(nn.Module):
    """A module that never trains: parameters without grad, always in eval mode."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


class MultimodalLM(nn.Module):
    """A causal LM that also reads visual features: token embedding + decoder body + an MLP
    projector from vision-encoder features into the LM width (LLaVA / VILA style).
    The LM head lives elsewhere (``text_head``). A pretrained VLM (production sizes) has no
    projector (``projector=False``: its vision tower already ends in the LM width) and may
    carry its own vision tower (``vision``, frozen), which then reads the inputs' pixels."""

    def __init__(
        self,
        embed: nn.Module,
        decoder: nn.Module,
        vision_dim: int,
        dim: int,
        projector: bool = True,
        vision: nn.Module | None = None,
    ):
        super().__init__()
        self.embed, self.decoder, self.vision = embed, decoder, vision
        self.projector = mlp(vision_dim, dim, dim) if projector else None
        self.dim = dim

    def requires_grad_(self, requires_grad: bool = True) -> MultimodalLM:
        super().requires_grad_(requires_grad)
        if self.vision is not None:  # its own tower stays frozen when the LM trains
            self.vision.requires_grad_(False)
        return self

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        return self.embed(ids)

    def embed_visual(self, feats: torch.Tensor) -> torch.Tensor:  # (B, N, De) -> (B, N, D)
        if self.projector is None:
            return feats.to(self.embed.weight.dtype)
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
