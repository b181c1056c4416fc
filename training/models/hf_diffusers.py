"""diffusers backbones behind the family interfaces (``base``): causal video VAEs (Wan,
HunyuanVideo) and DiTs (Wan, HunyuanVideo's MMDiT). Loaded from local folders only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.weights import MissingWeights, is_config_only
from training.models.blocks import Frozen
from training.models.checkpointing import checkpoint_ready
from training.models.geometry import latent_frames
from training.models.latent_stream import LatentStream, latent_stream


class DiffusersVAE(Frozen):
    """A causal video VAE (Wan, HunyuanVideo) behind the VAE interface: posterior mode,
    normalised by the config's latents_mean/std, else by scaling_factor (and shift_factor)."""

    def __init__(self, vae):
        super().__init__()
        cfg = vae.config
        self.vae = vae
        self.latent_channels = cfg.get("z_dim") or cfg.get("latent_channels")
        self.spatial_factor = (
            cfg.get("scale_factor_spatial") or cfg.get("spatial_compression_ratio") or 8
        )
        self.temporal_factor = (
            cfg.get("scale_factor_temporal") or cfg.get("temporal_compression_ratio") or 4
        )
        if cfg.get("latents_mean") is not None:
            mean, scale = torch.tensor(cfg.latents_mean), 1 / torch.tensor(cfg.latents_std)
        else:
            mean = torch.full((self.latent_channels,), float(cfg.get("shift_factor") or 0.0))
            scale = torch.full((self.latent_channels,), float(cfg.get("scaling_factor") or 1.0))
        self.register_buffer("mean", mean.view(1, 1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 1, -1, 1, 1), persistent=False)
        self._freeze()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W) -> (B, T', C', h, w)
        latent_frames(pixels.shape[1], self.temporal_factor)
        z = self.vae.encode(pixels.transpose(1, 2).to(self.vae.dtype)).latent_dist.mode()
        return ((z.transpose(1, 2).float() - self.mean) * self.scale).to(pixels.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, T', C', h, w) -> pixels
        z = latents.float() / self.scale + self.mean
        x = self.vae.decode(z.transpose(1, 2).to(self.vae.dtype), return_dict=False)[0]
        return x.transpose(1, 2).to(latents.dtype)  # (B, T, C, H, W), about [-1, 1]


class WanDiT(nn.Module):
    """Wan 2.x transformer behind the DiT interface (flow time t in [0, 1] -> timestep 1000 t).
    ``extra_channels`` widens the patch embedding for channel-concatenated conditions; the new
    input channels start at zero so the pretrained model is unchanged at step 0."""

    def __init__(self, model, extra_channels: int = 0):
        super().__init__()
        cfg = model.config
        if extra_channels:
            old = model.patch_embedding
            new = nn.Conv3d(
                old.in_channels + extra_channels,
                old.out_channels,
                old.kernel_size,
                old.stride,
                dtype=old.weight.dtype,
            )
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:, : old.in_channels] = old.weight
                new.bias.copy_(old.bias)
            model.patch_embedding = new
            model.register_to_config(in_channels=new.in_channels)
        self.model = model
        self.in_channels, self.out_channels = model.patch_embedding.in_channels, cfg.out_channels
        self.context_dim, self.patch = cfg.text_dim, cfg.patch_size[1]

    def forward(self, x, t, context, context_mask):
        # Wan's cross-attention has no key mask: padding is zeros, as with its T5 prompts.
        ctx = context * context_mask[..., None].to(context.dtype)
        dtype = self.model.dtype
        out = self.model(
            hidden_states=x.transpose(1, 2).to(dtype),
            timestep=(t * 1000).to(dtype),
            encoder_hidden_states=ctx.to(dtype),
            return_dict=False,
        )[0]
        return out.transpose(1, 2)


class HunyuanMMDiT(nn.Module):
    """HunyuanVideo's dual/single-stream MMDiT behind the DiT interface, with VINO's reference
    latents (``refs``, see ``latent_stream``): its forward is diffusers' own, step for step,
    except that the latent tokens are the interleaved stream and RoPE is taken at the stream's
    positions (without references both are diffusers' grid: the same output). Its pooled
    (CLIP) text input comes from a new projection of the context's masked mean; its refiner
    wants the valid context tokens first, so they are moved to the front (stable order)."""

    def __init__(self, model, guidance_scale: float = 6.0):
        super().__init__()
        cfg = model.config
        if cfg.image_condition_type is not None or cfg.patch_size_t != 1:
            raise ValueError(
                "the VINO MMDiT needs a text-to-video HunyuanVideo transformer "
                f"(image_condition_type None, patch_size_t 1), got {cfg.image_condition_type!r}, "
                f"{cfg.patch_size_t}"
            )
        self.model, self.guidance_scale = model, guidance_scale
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.context_dim, self.patch = cfg.text_embed_dim, cfg.patch_size
        self.dim = cfg.num_attention_heads * cfg.attention_head_dim  # latent token width
        self.pool = nn.Linear(cfg.text_embed_dim, cfg.pooled_projection_dim, dtype=model.dtype)

    def stream(self, x, refs=()) -> LatentStream:
        embed = self.model.x_embedder  # (B, C, F, H, W) -> (B, F*H/p*W/p, D), frame-major
        return latent_stream(lambda z: embed(z.transpose(1, 2)), x, refs, self.patch)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (N, head_dim) at (t, y, x) positions, as ``HunyuanVideoRotaryPosEmbed``."""
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        rope = self.model.rope
        freqs = [
            get_1d_rotary_pos_embed(rope.rope_dim[i], positions[:, i], rope.theta, use_real=True)
            for i in range(3)
        ]
        return torch.cat([f[0] for f in freqs], 1), torch.cat([f[1] for f in freqs], 1)

    def forward(self, x, t, context, context_mask, refs=()):
        m = self.model
        order = torch.argsort((context_mask == 0).int(), dim=1, stable=True)
        context = context.gather(1, order[..., None].expand_as(context))
        mask = context_mask.gather(1, order)
        w = mask[..., None].to(context.dtype)
        dtype = m.dtype
        pooled = self.pool(((context * w).sum(1) / w.sum(1).clamp(min=1)).to(dtype))
        guidance = None
        if m.config.guidance_embeds:
            guidance = torch.full(
                (x.shape[0],), self.guidance_scale * 1000, device=x.device, dtype=dtype
            )
        timestep = (t * 1000).to(dtype)
        temb, _ = m.time_text_embed(timestep, pooled, guidance)
        stream = self.stream(x.to(dtype), [r._replace(latents=r.latents.to(dtype)) for r in refs])
        rotary = self.rope(stream.positions)
        hidden = stream.tokens.to(dtype)
        ctx = m.context_embedder(context.to(dtype), timestep, mask)
        keys = torch.cat([stream.key_mask, mask.bool()], 1)[:, None, None]  # (B, 1, 1, N + M)
        for block in [*m.transformer_blocks, *m.single_transformer_blocks]:
            if torch.is_grad_enabled() and m.gradient_checkpointing:
                hidden, ctx = m._gradient_checkpointing_func(block, hidden, ctx, temb, keys, rotary)
            else:
                hidden, ctx = block(hidden, ctx, temb, keys, rotary)
        out = m.proj_out(m.norm_out(hidden[:, stream.target], temb))
        b, f, _, h, w = x.shape
        p = self.patch
        out = out.reshape(b, f, h // p, w // p, -1, 1, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        out = out.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)
        return out.transpose(1, 2)


def load_diffusers(cls_name: str, root: Path, dtype):
    """A diffusers model from a local folder. With accelerate installed this is
    ``from_pretrained``; without it (diffusers then refuses models that keep fp32 modules) the
    model is built from its config and its safetensors are loaded strictly."""
    import importlib.util

    import core.compat  # noqa: F401

    # isort: split
    import diffusers
    from safetensors.torch import load_file

    cls = getattr(diffusers, cls_name)
    if is_config_only():  # the architecture only, on the meta device
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(root, local_files_only=True))
        return checkpoint_ready(model.to(dtype).eval())
    if importlib.util.find_spec("accelerate") is not None:
        return checkpoint_ready(cls.from_pretrained(root, local_files_only=True, torch_dtype=dtype))
    model = cls.from_config(cls.load_config(root, local_files_only=True))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise MissingWeights(f"{root}: no *.safetensors weights (needed without accelerate)")
    state = {}
    for f in files:
        state.update(load_file(f))
    model.load_state_dict(state, strict=True)
    model = model if dtype == torch.float32 else model.to(dtype)
    return checkpoint_ready(model.eval())
