"""Omni-Video (Tan et al. 2025): an MLLM with two heads + an adapter into a video DiT.

Groups (``self.groups``):
- ``mllm``: causal LM over [visual tokens; text; vision slots] (token embedding, decoder body,
  projector from the vision encoder's features into the LM width, VILA style; a pretrained
  VLM instead reads input pixels with its own vision tower, no projector);
- ``text_head``: LM head, next-token CE on captions / answers (understanding);
- ``vision_head``: ``num_vision_tokens`` learned slots appended after the text, and an MLP
  from their hidden states to "vision tokens", regressed (MSE, or cosine) to the frozen vision
  encoder's features of the target medium (generation);
- ``adapter``: vision tokens -> DiT conditioning tokens, + a learned null condition;
- ``dit``: diffusion transformer on VAE latents, flow matching; edits concatenate the source
  latents on channels (zeros when there is no source), Wan-I2V style;
- ``vae``, ``vision_encoder``: frozen; the vision encoder gives the vision head's targets (and
  the MLLM's visual inputs when the MLLM has no tower of its own).

Losses: understanding -> ``text`` (CE); generation -> ``flow`` (velocity MSE) +
``vision_weight * vision`` (regression); ``flow`` only while the adapter or the DiT trains
(stage 1 trains the heads on the vision and text losses alone, omni-video.txt:141).
Condition dropout: ``drop["text"]`` replaces the sample's DiT conditioning by the null
condition; ``drop["source"]`` hides the source from the MLLM (masked out) and zeroes its
latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data.batch import TaskBatch
from training.models.base import Geometry
from training.models.blocks import MultimodalLM, TokenSet, mlp
from training.models.common import FamilyModel
from training.models.flow import Velocity, flow_pair
from training.models.geometry import pool_tokens
from training.models.text import ByteTokenizer, next_token_loss
from training.models.tiny import TinyCausalVAE, TinyDecoder, TinyDiT, TinyVisionEncoder
from training.tasks import EDIT_TASKS, UNDERSTANDING_TASKS


class VisionHead(nn.Module):
    def __init__(self, dim: int, vision_dim: int, num_tokens: int):
        super().__init__()
        self.slots = TokenSet(num_tokens, dim)
        self.proj = mlp(dim, dim, vision_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, Nq, D) -> (B, Nq, De)
        return self.proj(hidden)


class Adapter(nn.Module):
    def __init__(self, vision_dim: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(vision_dim), mlp(vision_dim, context_dim, context_dim)
        )
        self.null = TokenSet(num_tokens, context_dim)  # the dropped-text condition

    def forward(self, vision_tokens: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        ctx = self.proj(vision_tokens)  # (B, Nq, Dc)
        return torch.where(drop[:, None, None], self.null.expand(ctx.shape[0]).to(ctx.dtype), ctx)


class OmniVideo(FamilyModel):
    family = "omni_video"
    frozen_groups = ("vae", "vision_encoder")

    def __init__(
        self,
        *,
        mllm: MultimodalLM,
        text_head: nn.Module,
        vision_encoder: nn.Module,
        vae: nn.Module,
        dit: nn.Module,
        tokenizer,
        geometry: Geometry,
        num_vision_tokens: int = 8,
        timestep_shift: float = 1.0,
        vision_loss: str = "mse",
        vision_weight: float = 1.0,
    ):
        super().__init__()
        if dit.in_channels != 2 * vae.latent_channels:
            raise ValueError(
                f"dit takes {dit.in_channels} channels; omni_video needs 2 x "
                f"{vae.latent_channels} (noisy latents + source latents)"
            )
        if vision_loss not in ("mse", "cosine"):
            raise ValueError(f"vision_loss {vision_loss!r}; allowed: mse, cosine")
        self.groups = nn.ModuleDict(
            {
                "mllm": mllm,
                "text_head": text_head,
                "vision_head": VisionHead(mllm.dim, vision_encoder.dim, num_vision_tokens),
                "adapter": Adapter(vision_encoder.dim, dit.context_dim, num_vision_tokens),
                "dit": dit,
                "vae": vae,
                "vision_encoder": vision_encoder,
            }
        )
        self.tokenizer, self.geometry = tokenizer, geometry
        self.timestep_shift, self.vision_loss, self.vision_weight = (
            timestep_shift,
            vision_loss,
            vision_weight,
        )

    def task_loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        batch = self.prepare(batch)
        if batch.task in UNDERSTANDING_TASKS:
            return self._understand(batch)
        return self._generate(batch)

    def _visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        mllm = self.groups["mllm"]  # a pretrained VLM reads pixels with its own tower
        encoder = mllm.vision if mllm.vision is not None else self.groups["vision_encoder"]
        feats = encoder.encode(pixels)  # (B, T', N, De), no grad
        return mllm.embed_visual(feats.flatten(1, 2))  # (B, T'N, D)

    def _understand(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        mllm, ids, mask = self.groups["mllm"], batch.input_ids, batch.attention_mask
        vis = self._visual_tokens(batch.pixels)  # (B, Nv, D)
        seq = torch.cat([vis, mllm.embed_text(ids)], 1)  # (B, Nv + L, D)
        key_mask = torch.cat([torch.ones_like(vis[..., 0], dtype=mask.dtype), mask], 1)
        hidden = mllm(seq, key_mask)
        nv = vis.shape[1]
        logits = self.groups["text_head"](hidden[:, nv - 1 : nv - 1 + ids.shape[1]])  # predicts ids
        loss_mask = mask if batch.loss_mask is None else batch.loss_mask  # answers only
        return self._result({"text": next_token_loss(logits, ids, loss_mask)})

    def _vision(self, ids, mask, source=None, source_keep=None) -> torch.Tensor:
        """Vision-head tokens (B, Nq, De) from the MLLM over [source (edits); text; slots]."""
        g, b = self.groups, ids.shape[0]
        mllm = g["mllm"]
        text = mllm.embed_text(ids)  # (B, L, D)
        slots = g["vision_head"].slots.expand(b).to(text.dtype)  # (B, Nq, D)
        seq, key_mask = [text, slots], [mask, torch.ones_like(slots[..., 0], dtype=torch.long)]
        if source is not None:
            seq.insert(0, source)
            key_mask.insert(0, source_keep[:, None].expand(b, source.shape[1]).long())
        hidden = mllm(torch.cat(seq, 1), torch.cat(key_mask, 1))
        return g["vision_head"](hidden[:, -slots.shape[1] :])

    def _velocity(self, xt, src_latents, t, context) -> torch.Tensor:
        return self.groups["dit"](
            torch.cat([xt, src_latents], 2), t, context, torch.ones_like(context[..., 0])
        )

    def _generate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        g, b = self.groups, batch.size
        vae = g["vae"]
        drop_text, drop_source = self._drop(batch, "text"), self._drop(batch, "source")
        x0 = vae.encode(batch.pixels)  # (B, T', C, h, w)
        source = None
        if batch.task in EDIT_TASKS:
            source = self._visual_tokens(batch.source_pixels)  # (B, Ns, D)
            src_latents = vae.encode(batch.source_pixels) * (~drop_source).view(b, 1, 1, 1, 1)
        else:
            src_latents = torch.zeros_like(x0)
        vision = self._vision(batch.input_ids, batch.attention_mask, source, ~drop_source)

        with torch.no_grad():
            target = g["vision_encoder"].encode(batch.pixels).flatten(1, 2)  # (B, T'N, De)
            target = pool_tokens(target, vision.shape[1]).to(vision.dtype)  # (B, Nq, De)
        if self.vision_loss == "mse":
            vision_loss = F.mse_loss(vision.float(), target.float())
        else:
            vision_loss = 1 - F.cosine_similarity(vision.float(), target.float(), -1).mean()

        if not any(p.requires_grad for n in ("adapter", "dit") for p in g[n].parameters()):
            # stage 1 (omni-video.txt:141): the heads learn from the vision and text losses
            # only; a flow loss would train the vision head through the frozen, fresh adapter
            return self._result({"vision": self.vision_weight * vision_loss})
        context = g["adapter"](vision, drop_text)  # (B, Nq, Dc)
        t = self._sample_t(b, x0.device)
        xt, velocity = flow_pair(x0, t)
        pred = self._velocity(xt, src_latents, t, context)
        flow = F.mse_loss(pred.float(), velocity.float())
        return self._result({"flow": flow, "vision": self.vision_weight * vision_loss})

    def _text_velocity(self, ids, mask) -> Velocity:
        """Sampling: the DiT's velocity for the prompts' context, or the null context."""
        vision = self._vision(ids, mask)
        drop = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        contexts = {u: self.groups["adapter"](vision, drop if u else ~drop) for u in (False, True)}
        return lambda xt, t, uncond: self._velocity(xt, torch.zeros_like(xt), t, contexts[uncond])


def build_tiny(timestep_shift: float = 1.0) -> OmniVideo:
    """In-process, CPU-seconds model: byte tokenizer, 2-layer LM (64 wide), 2-block DiT."""
    geometry = Geometry(spatial_factor=8, temporal_factor=4, max_text_len=32)
    tok = ByteTokenizer(geometry.max_text_len)
    dim, vision_dim, latent_channels = 64, 32, 8
    mllm = MultimodalLM(nn.Embedding(tok.vocab_size, dim), TinyDecoder(dim, 2, 4), vision_dim, dim)
    return OmniVideo(
        mllm=mllm,
        text_head=nn.Linear(dim, tok.vocab_size, bias=False),
        vision_encoder=TinyVisionEncoder(vision_dim, geometry.temporal_factor),
        vae=TinyCausalVAE(
            latent_channels=latent_channels, temporal_factor=geometry.temporal_factor
        ),
        dit=TinyDiT(2 * latent_channels, latent_channels, 64, 2, 4, context_dim=64),
        tokenizer=tok,
        geometry=geometry,
        timestep_shift=timestep_shift,
    )
