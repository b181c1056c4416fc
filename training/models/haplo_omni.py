"""HaploOmni (Xiao et al. 2025): one transformer, split into pre / base / post decoders.

Groups (``self.groups``):
- ``pre_decoder``: the input layers: a ViT over pixels (visual tokens, width Dv), the text
  embedding (already at the base width Db), the noisy-latent patch embedding and the timestep
  token embedding (width Dv);
- ``pre_connector``: Dv -> Db for visual / latent / timestep tokens, with HaploOmni's feature
  pre-scaling (a learned scale per modality, so their norms match the text embeddings), and
  ``adaln_layers`` HaploOmni blocks with multimodal AdaLN (``adaln.py``) that every sequence
  passes through on its way into the base decoder (0 = none; the paper uses 2);
- ``base_decoder``: the shared transformer (an LLM in production) + the LM head: text CE is
  read here, so understanding never runs the post decoder;
- ``post_connector``: Db -> the post decoder's context width, on every base state;
- ``post_decoder``: the generation layers: a DiT that predicts the velocity of the noisy
  latents, adaLN-modulated by the timestep and cross-attending to the post-connector states;
- ``vae``: frozen.

Sequences use HaploOmni's hybrid mask: text and the timestep token are causal, visual tokens
and latents attend bidirectionally within their block. Understanding: [visual; text] -> CE.
Generation: [source visual + source latents (edits); text; timestep; noisy latents] through
pre -> base -> post, flow-matching velocity MSE. Condition dropout masks the dropped text
(or source) tokens out of attention, i.e. an empty prompt (or no source).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data.batch import TaskBatch
from training.models.adaln import HaploBlock
from training.models.base import Geometry
from training.models.blocks import Block, attention_mask, mlp
from training.models.common import FamilyModel
from training.models.flow import Velocity, flow_pair
from training.models.geometry import group_frames, patchify, pos_embed_3d, sinusoid
from training.models.text import ByteTokenizer, next_token_loss
from training.models.tiny import TinyCausalVAE, TinyDecoder, TinyDiT
from training.tasks import EDIT_TASKS, UNDERSTANDING_TASKS

VISUAL, LATENT, TIME = 0, 1, 2  # modality index of the pre-connector's scales


class TinyViT(nn.Module):
    """Trainable tiny vision input layers: 8x8 patches + one block, per latent frame."""

    def __init__(self, dim: int, temporal_factor: int, channels: int = 3):
        super().__init__()
        self.dim, self.temporal_factor = dim, temporal_factor
        self.patch = nn.Conv2d(channels, dim, 8, 8)
        self.block = Block(dim, 2)
        self.norm = nn.RMSNorm(dim)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W) -> (B, T', N, Dv)
        b, t = pixels.shape[:2]
        x = self.patch(pixels.flatten(0, 1))  # (B*T, Dv, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + pos_embed_3d(1, h, w, self.dim, x.device).to(x.dtype)
        x = self.norm(self.block(x))
        return group_frames(x.unflatten(0, (b, t)), self.temporal_factor)


class PreDecoder(nn.Module):
    def __init__(self, vit: nn.Module, text_embed: nn.Module, latent_channels: int, patch: int):
        super().__init__()
        self.vit, self.text_embed, self.patch = vit, text_embed, patch
        self.latent_embed = nn.Linear(latent_channels * patch * patch, vit.dim)
        self.time_embed = mlp(vit.dim, vit.dim)

    def latents(self, z: torch.Tensor) -> torch.Tensor:  # (B, T', C, h, w) -> (B, N, Dv)
        f, h, w = z.shape[1], z.shape[3] // self.patch, z.shape[4] // self.patch
        tokens = self.latent_embed(patchify(z, self.patch).to(self.latent_embed.weight.dtype))
        return tokens + pos_embed_3d(f, h, w, self.vit.dim, z.device).to(tokens.dtype)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 1, Dv)
        emb = sinusoid(t * 1000, self.vit.dim).to(self.latent_embed.weight.dtype)
        return self.time_embed(emb)[:, None]


class PreConnector(nn.Module):
    def __init__(self, dim: int, base_dim: int, adaln_layers: int = 0, heads: int = 4):
        super().__init__()
        self.proj = nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, base_dim))
        self.scale = nn.Parameter(torch.ones(3))  # feature pre-scaling per modality
        # multimodal-AdaLN blocks over the whole sequence; identity at initialisation
        self.blocks = nn.ModuleList(HaploBlock(base_dim, heads) for _ in range(adaln_layers))

    def forward(self, x: torch.Tensor, modality: int) -> torch.Tensor:  # (B, N, Dv) -> (B, N, Db)
        return self.proj(x) * self.scale[modality]


class BaseDecoder(nn.Module):
    def __init__(self, decoder: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.decoder, self.lm_head = decoder, lm_head

    def forward(self, embeds, key_mask, block_ids):
        return self.decoder(embeds, key_mask, block_ids)


class HaploOmni(FamilyModel):
    family = "haplo_omni"
    frozen_groups = ("vae",)

    def __init__(
        self,
        *,
        pre_decoder: PreDecoder,
        base_decoder: BaseDecoder,
        base_dim: int,
        post_decoder: nn.Module,
        vae: nn.Module,
        tokenizer,
        geometry: Geometry,
        timestep_shift: float = 1.0,
        adaln_layers: int = 0,
        adaln_heads: int = 4,
    ):
        super().__init__()
        ctx_dim = post_decoder.context_dim
        pre_connector = PreConnector(pre_decoder.vit.dim, base_dim, adaln_layers, adaln_heads)
        self.groups = nn.ModuleDict(
            {
                "pre_decoder": pre_decoder,
                "pre_connector": pre_connector,
                "base_decoder": base_decoder,
                "post_connector": nn.Sequential(nn.RMSNorm(base_dim), nn.Linear(base_dim, ctx_dim)),
                "post_decoder": post_decoder,
                "vae": vae,
            }
        )
        self.tokenizer, self.geometry, self.timestep_shift = tokenizer, geometry, timestep_shift
        self.distiller = None  # set by ``set_distillation`` (warmup stages)

    def set_distillation(self, distiller) -> None:
        """Make this a multimodal-warmup model (haplo-omni.txt:162): the pre- and post-decoder
        train independently, with feature distillation from frozen teachers
        (``training/models/distill.py``); see ``_warmup_loss``. The teachers live in the
        distiller, outside ``groups`` and the state dict, so they never train and are never
        saved. ``None`` returns to the connected model."""
        self.distiller = distiller

    def task_loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        batch = self.prepare(batch)
        if self.distiller is not None:
            return self._warmup_loss(batch)
        segments = []  # (tokens (B, n, Db), key mask (B, n), bidirectional)
        g, b, pre = self.groups, batch.size, self.groups["pre_decoder"]

        def add(tokens, keep, bidirectional):
            segments.append((tokens, keep.long(), bidirectional))

        def visual(pixels):  # (B, N, Db)
            return g["pre_connector"](pre.vit.encode(pixels).flatten(1, 2), VISUAL)

        ones = torch.ones(b, dtype=torch.bool, device=batch.pixels.device)
        if batch.task in UNDERSTANDING_TASKS:
            vis = visual(batch.pixels)
            add(vis, ones[:, None].expand(b, vis.shape[1]), True)
            add(pre.text_embed(batch.input_ids), batch.attention_mask, False)
            hidden, _ = self._base(segments, torch.zeros(b, device=vis.device))
            nv, ids = segments[0][0].shape[1], batch.input_ids
            logits = g["base_decoder"].lm_head(hidden[:, nv - 1 : nv - 1 + ids.shape[1]])
            trained = batch.attention_mask if batch.loss_mask is None else batch.loss_mask
            text_loss = next_token_loss(logits, ids, trained)
            return self._result({"text": text_loss})

        keep_text = ~self._drop(batch, "text")
        if batch.task in EDIT_TASKS:
            keep_src = ~self._drop(batch, "source")
            src = visual(batch.source_pixels)
            add(src, keep_src[:, None].expand(b, src.shape[1]), True)
            src_lat = g["pre_connector"](pre.latents(g["vae"].encode(batch.source_pixels)), LATENT)
            add(src_lat, keep_src[:, None].expand(b, src_lat.shape[1]), True)
        add(
            pre.text_embed(batch.input_ids), batch.attention_mask.bool() & keep_text[:, None], False
        )
        x0 = g["vae"].encode(batch.pixels)  # (B, T', C, h, w)
        t = self._sample_t(b, x0.device)
        xt, velocity = flow_pair(x0, t)
        pred = self._velocity(segments, xt, t)
        return self._result({"flow": F.mse_loss(pred.float(), velocity.float())})

    def _warmup_loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """The multimodal warmup (haplo-omni.txt:162): the pre- and post-decoder "fine-tuned
        independently", so nothing passes the connectors or the base decoder (the connectors
        start from random weights and train only in the alignment stage).

        - Understanding: the pre-decoder's visual tokens against the teacher's (distillation
          only). Its text path, the embedding table, passes text unchanged: the paper's identity
          loss for the linguistic modality holds by construction.
        - Generation: the post-decoder denoises the video on its own, conditioned on the null
          context (one zero token: the empty prompt), flow-matching loss plus distillation
          against the teacher on the same noisy latents (which also reads the null prompt).
          The paper conditions this on the text; here the text would reach the post-decoder
          only through the fresh connectors, so the warmup learns unconditional denoising."""
        g, distill = self.groups, self.distiller
        if batch.task in UNDERSTANDING_TASKS:
            if "pre_decoder" not in distill.groups:
                raise ValueError(
                    f"warmup stage: {batch.task} trains only by distillation into the "
                    "pre-decoder, and this stage has no pre_decoder teacher"
                )
            vit = g["pre_decoder"].vit
            return self._result(distill.pre_decoder(batch.pixels, vit.encode(batch.pixels), vit))
        if batch.task in EDIT_TASKS:
            raise ValueError(f"warmup stage: {batch.task} needs the connectors; train it later")
        post = g["post_decoder"]
        x0 = g["vae"].encode(batch.pixels)  # (B, T', C, h, w)
        t = self._sample_t(batch.size, x0.device)
        xt, velocity = flow_pair(x0, t)
        null = xt.new_zeros(batch.size, 1, post.context_dim)
        keep = torch.ones(batch.size, 1, dtype=torch.long, device=xt.device)
        parts: dict[str, torch.Tensor] = {}
        if "post_decoder" in distill.groups:
            with distill.capture_post(post) as student:
                pred = post(xt, t, null, keep)
            parts.update(distill.post_decoder(xt, t, student()))
        else:
            pred = post(xt, t, null, keep)
        return self._result({"flow": F.mse_loss(pred.float(), velocity.float()), **parts})

    def _velocity(self, segments, xt, t) -> torch.Tensor:
        """The post decoder's velocity for noisy latents xt (B, T', C, h, w) at times t (B,):
        [conditions; timestep token; noisy latents] through pre -> base -> post."""
        g, pre = self.groups, self.groups["pre_decoder"]
        ones = torch.ones(xt.shape[0], 1, dtype=torch.long, device=xt.device)
        noisy = g["pre_connector"](pre.latents(xt), LATENT)
        segments = [
            *segments,
            (g["pre_connector"](pre.timestep(t).to(xt.dtype), TIME), ones, False),
            (noisy, ones.expand(-1, noisy.shape[1]), True),
        ]
        hidden, key_mask = self._base(segments, t)
        context = g["post_connector"](hidden)  # (B, L, Dc)
        return g["post_decoder"](xt, t, context, key_mask)

    def _text_velocity(self, ids, mask) -> Velocity:
        """Sampling: the velocity given the prompts, or the empty prompt (null condition)."""
        text = self.groups["pre_decoder"].text_embed(ids)
        keep = {False: mask.long(), True: torch.zeros_like(mask, dtype=torch.long)}
        return lambda xt, t, uncond: self._velocity([(text, keep[uncond], False)], xt, t)

    def _base(self, segments, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate segments, build the hybrid block ids, run the multimodal-AdaLN blocks
        (conditioned on the flow time t (B,); 0, clean, for understanding), then the base
        decoder."""
        ids, start = [], 0
        for tokens, _, bidirectional in segments:
            n = tokens.shape[1]
            ids.append(torch.full((n,), start) if bidirectional else torch.arange(start, start + n))
            start += 1 if bidirectional else n
        seq = torch.cat([s[0] for s in segments], 1)
        key_mask = torch.cat([s[1] for s in segments], 1)
        block_ids = torch.cat(ids).to(seq.device)
        blocks = self.groups["pre_connector"].blocks
        if len(blocks):
            mask = attention_mask(key_mask, block_ids)
            for block in blocks:
                seq = block(seq, t, mask)
        return self.groups["base_decoder"](seq, key_mask, block_ids), key_mask


def build_tiny(timestep_shift: float = 1.0, adaln_layers: int = 0) -> HaploOmni:
    """In-process, CPU-seconds model: 48-wide ViT, 2-layer 64-wide base, 2-block DiT, and
    ``adaln_layers`` 64-wide multimodal-AdaLN blocks."""
    geometry = Geometry(spatial_factor=8, temporal_factor=4, max_text_len=32)
    tok = ByteTokenizer(geometry.max_text_len)
    base_dim, latent_channels = 64, 8
    pre = PreDecoder(
        TinyViT(48, geometry.temporal_factor),
        nn.Embedding(tok.vocab_size, base_dim),
        latent_channels,
        patch=1,
    )
    base = BaseDecoder(TinyDecoder(base_dim, 2, 4), nn.Linear(base_dim, tok.vocab_size, bias=False))
    return HaploOmni(
        pre_decoder=pre,
        base_decoder=base,
        base_dim=base_dim,
        post_decoder=TinyDiT(latent_channels, latent_channels, 64, 2, 4, context_dim=64),
        vae=TinyCausalVAE(
            latent_channels=latent_channels, temporal_factor=geometry.temporal_factor
        ),
        tokenizer=tok,
        geometry=geometry,
        timestep_shift=timestep_shift,
        adaln_layers=adaln_layers,
    )
