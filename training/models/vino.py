"""VINO (Chen et al. 2026): a VLM reads all conditions; learnable queries carry them to an MMDiT.

Groups (``self.groups``):
- ``vlm``: causal LM over [source visual tokens (edits); text; queries] (token embedding,
  decoder body, projector from the vision encoder's features); frozen in the paper's recipe;
- ``learnable_queries``: ``num_queries`` tokens appended to the VLM input; they see every
  condition (causal mask) and, with the text states, form the MMDiT context;
- ``connector``: 2-layer MLP from VLM hidden states to the MMDiT context width;
- ``mmdit``: joint-attention (dual-stream) transformer over [context tokens; latent tokens],
  adaLN from the timestep + pooled context, flow matching;
- ``boundary_connector``: 2-layer MLP from the VLM's hidden states at a reference's
  ``<|vision_start|>`` / ``<|vision_end|>`` tokens to the MMDiT token width: the boundary
  tokens that wrap the same reference's latents in the MMDiT (vino.txt:46, 111);
- ``vae``, ``vision_encoder``: frozen.

Visual references (an edit's source; the model takes any number, ``References``) are shown
twice: to the VLM as ``[<|vision_start|>, visual tokens, <|vision_end|>]`` before the text,
and to the MMDiT as clean VAE latents wrapped in the boundary tokens, before the noisy target
on one timeline (``latent_stream``); the loss reads the target only. A video reference's
VLM frames are ``TaskBatch.vlm_frames`` (the task's ``vlm_fps`` / ``vlm_max_frames``: 1 fps,
at most 8 in the paper, vino.txt:475), each encoded alone; without them the VLM reads one
token set per latent frame. Loss: generation -> ``flow``; understanding (not in VINO's paper;
a generator) is not supported. Condition dropout: ``drop["text"]`` masks the text out of the
VLM (an empty prompt: the queries then carry only the other conditions); ``drop["source"]``
masks the source out of the VLM (markers included) and its latents and markers out of the
MMDiT's attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.data.batch import TaskBatch
from training.models.base import Geometry
from training.models.blocks import MultimodalLM, TokenSet, mlp
from training.models.common import FamilyModel
from training.models.flow import Velocity, flow_pair
from training.models.geometry import patchify, pos_embed_at, sinusoid, unpatchify
from training.models.latent_stream import LatentRef, LatentStream, latent_stream
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

    def forward(self, x, c, c_mask, temb, x_mask):
        # x (B, N, D), c (B, M, D), c_mask (B, M), temb (B, D), x_mask (B, N)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, c_mask, temb, x_mask, use_reentrant=False)
        return self._forward(x, c, c_mask, temb, x_mask)

    def _forward(self, x, c, c_mask, temb, x_mask):
        mods = [s.mod(F.silu(temb))[:, None].chunk(6, -1) for s in (self.c, self.x)]
        qkv = [
            s.qkv(s.norm1(h) * (1 + m[1]) + m[0])
            for s, h, m in zip((self.c, self.x), (c, x), mods, strict=True)
        ]
        q, k, v = torch.cat(qkv, 1).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        keys = torch.cat([c_mask.bool(), x_mask.bool()], 1)
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
    context_mask (B, M), refs: reference latents with their boundary tokens (``LatentRef``,
    width ``dim``)) -> velocity of the target (B, T, C, h, w)."""

    def __init__(self, channels: int, dim: int, depth: int, heads: int, context_dim: int, patch=1):
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.context_dim, self.patch, self.dim = context_dim, patch, dim
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.context = nn.Linear(context_dim, dim)
        self.time, self.pooled = mlp(dim, dim), nn.Linear(context_dim, dim)
        self.blocks = nn.ModuleList(JointBlock(dim, heads) for _ in range(depth))
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out = nn.Linear(dim, channels * patch * patch)

    def stream(self, x, refs=()) -> LatentStream:
        """The latent token sequence (before positions): references wrapped, then ``x``."""
        return latent_stream(lambda z: self.embed(patchify(z, self.patch)), x, refs, self.patch)

    def forward(self, x, t, context, context_mask, refs: tuple[LatentRef, ...] = ()):
        f, _, h, w = x.shape[1:]
        stream = self.stream(x, refs)
        pos = pos_embed_at(stream.positions, self.dim).to(x.dtype)
        tokens = stream.tokens + pos  # (B, N, D)
        weights = context_mask.to(context.dtype)[..., None]
        pooled = (context * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, Dc)
        temb = self.time(sinusoid(t * 1000, self.dim).to(tokens.dtype)) + self.pooled(pooled)
        c = self.context(context)
        for block in self.blocks:
            tokens, c = block(tokens, c, context_mask, temb, stream.key_mask)
        shift, scale = self.final_mod(F.silu(temb))[:, None].chunk(2, -1)
        out = self.out(self.final_norm(tokens[:, stream.target]) * (1 + scale) + shift)
        return unpatchify(out, (f, self.out_channels, h, w), self.patch)


class Reference(NamedTuple):
    """A visual condition: ``pixels`` (B, T, C, H, W); ``keep`` (B,) bool (False: dropped for
    that sample); ``vlm_frames``: the frames (indices into T) the VLM reads, None: one token
    set per latent frame."""

    pixels: torch.Tensor
    keep: torch.Tensor
    vlm_frames: tuple[int, ...] | None = None


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
        vision_tokens: tuple[int, int],
        num_queries: int = 8,
        timestep_shift: float = 1.0,
    ):
        """``vision_tokens``: the ids of ``<|vision_start|>`` and ``<|vision_end|>`` in the
        VLM's vocabulary (they wrap each visual input, and their states mark its latents)."""
        super().__init__()
        self.groups = nn.ModuleDict(
            {
                "vlm": vlm,
                "learnable_queries": TokenSet(num_queries, vlm.dim),
                "connector": mlp(vlm.dim, mmdit.context_dim, mmdit.context_dim),
                "mmdit": mmdit,
                "boundary_connector": mlp(vlm.dim, mmdit.dim, mmdit.dim),
                "vae": vae,
                "vision_encoder": vision_encoder,
            }
        )
        self.tokenizer, self.geometry, self.timestep_shift = tokenizer, geometry, timestep_shift
        self.vision_tokens = tuple(vision_tokens)

    def supported_tasks(self) -> tuple[str, ...]:
        return GENERATION_TASKS

    def task_loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        batch = self.prepare(batch)
        refs = []
        if batch.task in EDIT_TASKS:
            keep = ~self._drop(batch, "source")
            refs.append(Reference(batch.source_pixels, keep, batch.vlm_frames))
        keep_text = ~self._drop(batch, "text")
        flow = self.flow_loss(batch.pixels, batch.input_ids, batch.attention_mask, keep_text, refs)
        return self._result({"flow": flow})

    def flow_loss(self, pixels, ids, mask, keep_text, refs=()) -> torch.Tensor:
        """Velocity MSE on the target ``pixels`` (B, T, C, H, W) given the text and ``refs``."""
        g = self.groups
        vae = g["vae"]
        x0 = vae.encode(pixels)  # (B, T', C, h, w)
        context, key_mask, marks = self.condition(ids, mask, keep_text, refs)
        latents = [
            LatentRef(vae.encode(r.pixels), st, ed, r.keep)
            for r, (st, ed) in zip(refs, marks, strict=True)
        ]
        t = self._sample_t(x0.shape[0], x0.device)
        xt, velocity = flow_pair(x0, t)
        pred = g["mmdit"](xt, t, context, key_mask, tuple(latents))
        return F.mse_loss(pred.float(), velocity.float())

    def condition(self, ids, mask, keep_text, refs=()):
        """The VLM over [per reference: <|vision_start|>, visual tokens, <|vision_end|>; text;
        queries] -> (MMDiT context (B, M, Dc), its key mask (B, M), per reference the boundary
        tokens (start (B, Dm), end (B, Dm)) projected from the states at its markers)."""
        g, b = self.groups, ids.shape[0]
        vlm = g["vlm"]
        text = vlm.embed_text(ids)  # (B, L, D)
        marks = vlm.embed_text(torch.tensor(self.vision_tokens, device=ids.device))  # (2, D)
        seq, key_mask, where, n = [], [], [], 0
        for ref in refs:
            visual = vlm.embed_visual(self._vlm_features(ref)).to(text.dtype)  # (B, Nv, D)
            start, end = (m.to(text.dtype).expand(b, 1, -1) for m in marks[:, None])
            seq += [start, visual, end]
            key_mask.append(ref.keep.long()[:, None].expand(b, visual.shape[1] + 2))
            where.append((n, n + visual.shape[1] + 1))
            n += visual.shape[1] + 2
        queries = g["learnable_queries"].expand(b).to(text.dtype)  # (B, Nq, D)
        seq += [text, queries]
        key_mask += [mask * keep_text[:, None], torch.ones_like(queries[..., 0], dtype=torch.long)]
        key_mask = torch.cat(key_mask, 1)
        hidden = vlm(torch.cat(seq, 1), key_mask)  # (B, M, D)
        project = g["boundary_connector"]
        bounds = [(project(hidden[:, s]), project(hidden[:, e])) for s, e in where]
        return g["connector"](hidden), key_mask, bounds

    def _vlm_features(self, ref: Reference) -> torch.Tensor:
        """Vision-encoder features (B, N, De) of a reference as the VLM reads it."""
        encoder, px = self.groups["vision_encoder"], ref.pixels
        if ref.vlm_frames is None or px.shape[1] == 1:
            return encoder.encode(px).flatten(1, 2)  # one token set per latent frame
        frames = px[:, list(ref.vlm_frames)]  # (B, n, C, H, W), each frame encoded alone
        feats = encoder.encode(frames.flatten(0, 1)[:, None])  # (B*n, 1, N, De)
        return feats.unflatten(0, frames.shape[:2]).flatten(1, 3)

    def _text_velocity(self, ids, mask) -> Velocity:
        """Sampling: the MMDiT's velocity for the prompts, or for the empty prompt (null)."""
        keep = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        contexts = {u: self.condition(ids, mask, ~keep if u else keep)[:2] for u in (False, True)}
        return lambda xt, t, uncond: self.groups["mmdit"](xt, t, *contexts[uncond])


def build_tiny(timestep_shift: float = 1.0) -> Vino:
    """In-process, CPU-seconds model: 2-layer 64-wide VLM, 8 queries, 2 joint blocks. The
    byte vocabulary gains two ids for <|vision_start|> and <|vision_end|> (text never yields
    them)."""
    geometry = Geometry(spatial_factor=8, temporal_factor=4, max_text_len=32)
    tok = ByteTokenizer(geometry.max_text_len)
    dim, vision_dim, latent_channels = 64, 32, 8
    vocab = tok.vocab_size + 2
    vlm = MultimodalLM(nn.Embedding(vocab, dim), TinyDecoder(dim, 2, 4), vision_dim, dim)
    return Vino(
        vlm=vlm,
        vision_encoder=TinyVisionEncoder(vision_dim, geometry.temporal_factor),
        vae=TinyCausalVAE(
            latent_channels=latent_channels, temporal_factor=geometry.temporal_factor
        ),
        mmdit=TinyMMDiT(latent_channels, 64, 2, 4, context_dim=64),
        tokenizer=tok,
        geometry=geometry,
        vision_tokens=(vocab - 2, vocab - 1),
        timestep_shift=timestep_shift,
    )
