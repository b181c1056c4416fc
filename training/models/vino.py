"""VINO (Chen et al. 2026): a VLM reads all conditions; learnable queries carry them to an MMDiT.

Groups (``self.groups``):
- ``vlm``: causal LM over [source visual tokens (edits); text; queries] (token embedding,
  decoder body, projector from the vision encoder's features); frozen in the paper's recipe;
- ``learnable_queries``: ``num_queries`` tokens appended to the VLM input; they see every
  condition (causal mask) and, with the text states, form the MMDiT context;
- ``connector``: 2-layer MLP from VLM hidden states to the MMDiT context width;
- ``mmdit``: joint-attention (dual-stream) transformer over [context tokens; latent tokens],
  adaLN from the timestep + pooled context, flow matching;
- ``vae``, ``vision_encoder``: frozen.

Edits put the clean source latents in-context: they are concatenated in time before the noisy
latents (so positions tell them apart) and the loss reads the target frames only; the source
is also shown to the VLM as visual tokens. Loss: generation -> ``flow``; understanding (not
in VINO's paper; a generator) is not supported. Condition dropout: ``drop["text"]`` masks the
text out of the VLM (an empty prompt: the queries then carry only the other conditions);
``drop["source"]`` masks the source tokens and zeroes the source latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.data.batch import TaskBatch
from training.models.base import Geometry
from training.models.blocks import MultimodalLM, TokenSet, mlp
from training.models.common import FamilyModel
from training.models.flow import Velocity, flow_pair
from training.models.geometry import patchify, pos_embed_3d, sinusoid, unpatchify
from training.models.text import ByteTokenizer
from training.models.tiny import TinyCausalVAE, TinyDecoder, TinyVisionEncoder
from training.tasks import EDIT_TASKS, GENERATION_TASKS


class _Stream(nn.Module):
    """One modality's weights in an MMDiT block (SD3 / HunyuanVideo dual-stream)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = (
            nn.LayerNorm(dim, elementwise_affine=False),
            nn.LayerNorm(dim, elementwise_affine=False),
        )
        self.qkv, self.out, self.mlp = (
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
            mlp(dim, 4 * dim),
        )
        self.mod = nn.Linear(dim, 6 * dim)


class JointBlock(nn.Module):
    checkpointable = True

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.x, self.c = heads, _Stream(dim), _Stream(dim)
        self.gradient_checkpointing = False

    def forward(self, x, c, c_mask, temb):  # x (B, N, D), c (B, M, D), c_mask (B, M), temb (B, D)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, c_mask, temb, use_reentrant=False)
        return self._forward(x, c, c_mask, temb)

    def _forward(self, x, c, c_mask, temb):
        mods = [s.mod(F.silu(temb))[:, None].chunk(6, -1) for s in (self.c, self.x)]
        qkv = [
            s.qkv(s.norm1(h) * (1 + m[1]) + m[0])
            for s, h, m in zip((self.c, self.x), (c, x), mods, strict=True)
        ]
        q, k, v = torch.cat(qkv, 1).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        keys = torch.cat([c_mask.bool(), torch.ones_like(x[..., 0], dtype=torch.bool)], 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None])  # (B, H, M+N, d)
        y = y.transpose(1, 2).flatten(2).split([c.shape[1], x.shape[1]], 1)
        outs = []
        for s, h, m, yy in zip((self.c, self.x), (c, x), mods, y, strict=True):
            h = h + m[2] * s.out(yy)
            outs.append(h + m[5] * s.mlp(s.norm2(h) * (1 + m[4]) + m[3]))
        return outs[1], outs[0]


class TinyMMDiT(nn.Module):
    """MMDiT on latents: patch tokens + 3D positions, joint blocks with the context tokens,
    adaLN from timestep + pooled context. forward(x (B, T, C, h, w), t (B,), context (B, M, Dc),
    context_mask (B, M)) -> velocity (B, T, C, h, w)."""

    def __init__(self, channels: int, dim: int, depth: int, heads: int, context_dim: int, patch=1):
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.context_dim, self.patch = context_dim, patch
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.context = nn.Linear(context_dim, dim)
        self.time, self.pooled = mlp(dim, dim), nn.Linear(context_dim, dim)
        self.blocks = nn.ModuleList(JointBlock(dim, heads) for _ in range(depth))
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out = nn.Linear(dim, channels * patch * patch)

    def forward(self, x, t, context, context_mask):
        f, _, h, w = x.shape[1:]
        p, dim = self.patch, self.embed.out_features
        pos = pos_embed_3d(f, h // p, w // p, dim, x.device).to(x.dtype)
        tokens = self.embed(patchify(x, p)) + pos  # (B, N, D)
        weights = context_mask.to(context.dtype)[..., None]
        pooled = (context * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, Dc)
        temb = self.time(sinusoid(t * 1000, dim).to(tokens.dtype)) + self.pooled(pooled)
        c = self.context(context)
        for block in self.blocks:
            tokens, c = block(tokens, c, context_mask, temb)
        shift, scale = self.final_mod(F.silu(temb))[:, None].chunk(2, -1)
        out = self.out(self.final_norm(tokens) * (1 + scale) + shift)
        return unpatchify(out, (f, self.out_channels, h, w), p)


class Vino(FamilyModel):
    family = "vino"
    frozen_groups = ("vae", "vision_encoder")

    def __init__(
        self,
        *,
        vlm: MultimodalLM,
        vision_encoder: nn.Module,
        vae: nn.Module,
        mmdit: nn.Module,
        tokenizer,
        geometry: Geometry,
        num_queries: int = 8,
        timestep_shift: float = 1.0,
    ):
        super().__init__()
        self.groups = nn.ModuleDict(
            {
                "vlm": vlm,
                "learnable_queries": TokenSet(num_queries, vlm.dim),
                "connector": mlp(vlm.dim, mmdit.context_dim, mmdit.context_dim),
                "mmdit": mmdit,
                "vae": vae,
                "vision_encoder": vision_encoder,
            }
        )
        self.tokenizer, self.geometry, self.timestep_shift = tokenizer, geometry, timestep_shift

    def supported_tasks(self) -> tuple[str, ...]:
        return GENERATION_TASKS

    def task_loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        batch = self.prepare(batch)
        g, b = self.groups, batch.size
        vae = g["vae"]
        keep_text = ~self._drop(batch, "text")
        x0 = vae.encode(batch.pixels)  # (B, T', C, h, w)
        source, src_latents = None, None
        if batch.task in EDIT_TASKS:
            keep_src = ~self._drop(batch, "source")
            feats = g["vision_encoder"].encode(batch.source_pixels).flatten(1, 2)  # (B, Ns, De)
            source = (g["vlm"].embed_visual(feats), keep_src[:, None].expand(b, feats.shape[1]))
            src_latents = vae.encode(batch.source_pixels) * keep_src.view(b, 1, 1, 1, 1)
        context, key_mask = self._context(batch.input_ids, batch.attention_mask, keep_text, source)

        t = self._sample_t(b, x0.device)
        xt, velocity = flow_pair(x0, t)
        x = xt if src_latents is None else torch.cat([src_latents, xt], 1)  # in-context source
        pred = g["mmdit"](x, t, context, key_mask)[:, -x0.shape[1] :]  # target frames only
        return self._result({"flow": F.mse_loss(pred.float(), velocity.float())})

    def _context(self, ids, mask, keep_text, source=None) -> tuple[torch.Tensor, torch.Tensor]:
        """MMDiT context (B, M, Dc) and its key mask (B, M) from the VLM over [source tokens
        (edits; ``source`` = (tokens (B, Ns, D), keep (B, Ns))); text; queries]."""
        g, b = self.groups, ids.shape[0]
        vlm = g["vlm"]
        text = vlm.embed_text(ids)  # (B, L, D)
        queries = g["learnable_queries"].expand(b).to(text.dtype)  # (B, Nq, D)
        seq = [text, queries]
        key_mask = [mask * keep_text[:, None], torch.ones_like(queries[..., 0], dtype=torch.long)]
        if source is not None:
            seq.insert(0, source[0])
            key_mask.insert(0, source[1].long())
        key_mask = torch.cat(key_mask, 1)
        return g["connector"](vlm(torch.cat(seq, 1), key_mask)), key_mask

    def _text_velocity(self, ids, mask) -> Velocity:
        """Sampling: the MMDiT's velocity for the prompts, or for the empty prompt (null)."""
        keep = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        contexts = {u: self._context(ids, mask, ~keep if u else keep) for u in (False, True)}
        return lambda xt, t, uncond: self.groups["mmdit"](xt, t, *contexts[uncond])


def build_tiny(timestep_shift: float = 1.0) -> Vino:
    """In-process, CPU-seconds model: 2-layer 64-wide VLM, 8 queries, 2 joint blocks."""
    geometry = Geometry(spatial_factor=8, temporal_factor=4, max_text_len=32)
    tok = ByteTokenizer(geometry.max_text_len)
    dim, vision_dim, latent_channels = 64, 32, 8
    vlm = MultimodalLM(nn.Embedding(tok.vocab_size, dim), TinyDecoder(dim, 2, 4), vision_dim, dim)
    return Vino(
        vlm=vlm,
        vision_encoder=TinyVisionEncoder(vision_dim, geometry.temporal_factor),
        vae=TinyCausalVAE(
            latent_channels=latent_channels, temporal_factor=geometry.temporal_factor
        ),
        mmdit=TinyMMDiT(latent_channels, 64, 2, 4, context_dim=64),
        tokenizer=tok,
        geometry=geometry,
        timestep_shift=timestep_shift,
    )
