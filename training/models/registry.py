"""The model families by name, and the production loaders behind their pretrained sizes.

``build_model(family, size, pretrained, timestep_shift)``:
- size ``"tiny"`` (every family) builds in-process from scratch (CPU, seconds);
- size ``"7b"`` wraps pretrained backbones loaded from LOCAL directories (``pretrained``: module
  group -> dir; ``local_files_only``: nothing is ever downloaded). Dimensions come from the
  checkpoints' configs, so any compatible checkpoint works. A missing entry, directory or
  weights file raises ``MissingPretrained`` naming the group, the path and the download
  command; a production size never falls back to random backbone weights. The glue that the
  papers train from scratch (vision head, adapter, projector, connectors, queries) starts fresh.

Production size "7b" (``pretrained`` key: class; checkpoint named in the error messages):
- omni_video: mllm (+ text_head): AutoModelForCausalLM, Qwen/Qwen2.5-7B-Instruct;
  vision_encoder: SiglipVisionModel, google/siglip2-so400m-patch14-384; dit / vae (vae defaults
  to the dit dir): WanTransformer3DModel / AutoencoderKLWan, Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
- haplo_omni: pre_decoder (its ViT): SiglipVisionModel, google/siglip-so400m-patch14-384;
  base_decoder: AutoModelForCausalLM, Qwen/Qwen2.5-7B-Instruct; post_decoder / vae: Wan as above.
- vino: vlm: AutoModelForCausalLM (penultimate-layer states), Qwen/Qwen2.5-7B-Instruct;
  vision_encoder: SigLIP2 as above; mmdit / vae: HunyuanVideoTransformer3DModel /
  AutoencoderKLHunyuanVideo, hunyuanvideo-community/HunyuanVideo.
A diffusers folder may be given as the repo root (``transformer/``, ``vae/`` subfolders) or as
the model folder itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.models import haplo_omni, omni_video, vino
from training.models.base import Geometry, UnifiedModel
from training.models.blocks import Frozen, MultimodalLM, attention_mask
from training.models.checkpointing import checkpoint_ready
from training.models.geometry import group_frames, latent_frames
from training.models.text import pad_sequences

MAX_TEXT_LEN = 512  # production captions / instructions, in backbone tokens

# (size, pretrained, timestep_shift, dtype) -> model
Builder = Callable[[str, dict[str, str], float, torch.dtype], UnifiedModel]
FAMILIES: dict[str, Builder] = {}
SIZES: dict[str, tuple[str, ...]] = {}


def register(name: str, builder: Builder, sizes: tuple[str, ...]) -> None:
    if name in FAMILIES:
        raise ValueError(f"model family {name!r} is already registered")
    FAMILIES[name], SIZES[name] = builder, sizes


def build_model(
    family: str,
    size: str,
    pretrained: dict[str, str] | None = None,
    timestep_shift: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> UnifiedModel:
    """A family's model; ``dtype`` is the weights' dtype of production sizes (tiny: float32)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    if size not in SIZES[family]:
        raise ValueError(f"unknown size {size!r} for {family}; allowed: {', '.join(SIZES[family])}")
    return FAMILIES[family](size, dict(pretrained or {}), timestep_shift, dtype)


# ---------------------------------------------------------------- locating local weights
class MissingPretrained(FileNotFoundError):
    """A production size needs a local checkpoint that is not there (nothing is downloaded)."""


WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def locate(
    pretrained: dict[str, str],
    group: str,
    repo: str,
    where: str,
    subfolder: str | None = None,
    fallback: str | None = None,
) -> Path:
    """The local directory of ``group`` (or of ``fallback``'s entry), checked: it exists, has a
    config.json and weights (every shard of a sharded index). ``where``: "family size"."""
    raw = pretrained.get(group) or (pretrained.get(fallback) if fallback else None)
    fetch = f"`hf download {repo} --local-dir DIR`"
    if not raw:
        also = f" (or model.pretrained.{fallback})" if fallback else ""
        raise MissingPretrained(
            f"{where}: model.pretrained.{group}{also} is not set; it must name a local "
            f"directory holding {repo} (fetch it on a machine with network: {fetch})"
        )
    path = Path(raw).expanduser()
    root = path / subfolder if subfolder and (path / subfolder).is_dir() else path
    fetch = f"`hf download {repo} --local-dir {path}`"
    if not root.is_dir():
        raise MissingPretrained(
            f"{where}: {group} directory {path} does not exist; fetch it: {fetch}"
        )
    if not (root / "config.json").is_file():
        raise MissingPretrained(
            f"{where}: {group}: no config.json in {root} (expected a {repo} checkpoint"
            f"{f' with a {subfolder}/ folder' if subfolder else ''}); fetch it: {fetch}"
        )
    for index in root.glob("*.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise MissingPretrained(
                f"{where}: {group}: {index} lists missing weight files {missing[:3]} "
                f"(incomplete download?); fetch it: {fetch}"
            )
    if not any(f for pattern in WEIGHTS for f in root.glob(pattern)):
        raise MissingPretrained(
            f"{where}: {group}: no weights ({', '.join(WEIGHTS)}) in {root}; fetch it: {fetch}"
        )
    return root


def locate_all(pretrained: dict[str, str], where: str, specs: list[tuple]) -> dict[str, Path]:
    """``locate`` each (group, repo, subfolder, fallback) before anything loads; every problem
    is reported in one MissingPretrained. Keys of ``pretrained`` outside ``specs`` are errors."""
    allowed = [spec[0] for spec in specs]
    unknown = sorted(set(pretrained) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown model.pretrained keys {unknown}; allowed: {', '.join(allowed)}"
        )
    roots, problems = {}, []
    for group, repo, subfolder, fallback in specs:
        try:
            roots[group] = locate(pretrained, group, repo, where, subfolder, fallback)
        except MissingPretrained as e:
            problems.append(str(e))
    if problems:
        raise MissingPretrained("\n".join(problems))
    return roots


# ---------------------------------------------------------------- transformers wrappers
class HFDecoder(nn.Module):
    """A transformers decoder body behind the decoder interface. Our bool (B, 1, L, L) mask is
    passed as a custom 4D mask (sdpa attention), so causal, hybrid and padding all hold.
    ``hidden_layer`` -1: final normed states; -2: the penultimate layer (VINO)."""

    def __init__(self, body: nn.Module, hidden_layer: int = -1):
        super().__init__()
        self.body, self.hidden_layer, self.dim = body, hidden_layer, body.config.hidden_size

    def forward(self, embeds, key_mask, block_ids=None):
        out = self.body(
            inputs_embeds=embeds,
            attention_mask=attention_mask(key_mask, block_ids),
            output_hidden_states=self.hidden_layer != -1,
            use_cache=False,
        )
        return (
            out.last_hidden_state
            if self.hidden_layer == -1
            else out.hidden_states[self.hidden_layer]
        )


class HFTokenizer:
    """A backbone's tokenizer with the ByteTokenizer contract: eos appended, truncation to
    max_len, right padding (pad = pad token, else eos)."""

    def __init__(self, tokenizer, max_len: int):
        self.tok, self.max_len = tokenizer, max_len
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = []
        for ids in self.tok(list(texts), add_special_tokens=True)["input_ids"]:
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids = ids[: self.max_len - 1] + [self.eos]
            seqs.append(ids[: self.max_len])
        return pad_sequences(seqs, self.pad)


def load_causal_lm(root: Path, dtype: torch.dtype, hidden_layer: int = -1):
    """-> (token embedding, HFDecoder, LM head, HFTokenizer). The embedding and head leave the
    body so they can sit in other groups; a tied head is untied (copied)."""
    import core.compat  # noqa: F401  (torchvision with CPU torch)

    # isort: split
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = checkpoint_ready(
        AutoModelForCausalLM.from_pretrained(
            root, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        untied = nn.Linear(head.in_features, head.out_features, bias=False, dtype=dtype)
        untied.weight = nn.Parameter(embed.weight.detach().clone())
        head = untied
    body = model.base_model
    body.set_input_embeddings(None)  # fed inputs_embeds; the table lives in its own group
    return embed, HFDecoder(body, hidden_layer), head, HFTokenizer(tokenizer, MAX_TEXT_LEN)


class HFVisionEncoder(nn.Module):
    """SigLIP behind the vision-encoder interface: frames resized to its image size and
    normalised by its processor's mean/std; patch features pooled to ``grid`` x ``grid``,
    then per latent frame. Frozen unless ``trainable`` (HaploOmni's pre-decoder ViT)."""

    def __init__(self, model, temporal_factor: int, grid: int, mean, std, trainable=False):
        super().__init__()
        self.model, self.temporal_factor, self.grid, self.trainable = (
            model,
            temporal_factor,
            grid,
            trainable,
        )
        self.dim, self.size = model.config.hidden_size, model.config.image_size
        self.side = model.config.image_size // model.config.patch_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        if not trainable:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W) -> (B, T', g*g, D)
        b, t = pixels.shape[:2]
        x = F.interpolate(
            pixels.flatten(0, 1).float(), (self.size, self.size), mode="bilinear", antialias=True
        )
        x = ((x + 1) / 2 - self.mean) / self.std
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            h = self.model(pixel_values=x.to(self.model.dtype)).last_hidden_state  # (BT, N, D)
            h = h.transpose(1, 2).unflatten(2, (self.side, self.side))
            h = F.adaptive_avg_pool2d(h, self.grid).flatten(2).transpose(1, 2)  # (BT, g*g, D)
        return group_frames(h.unflatten(0, (b, t)), self.temporal_factor)


def load_siglip(root: Path, dtype, temporal_factor: int, grid: int, trainable=False):
    import core.compat  # noqa: F401

    # isort: split
    from transformers import SiglipVisionModel

    config = json.loads((root / "config.json").read_text())
    if config.get("model_type") not in ("siglip", "siglip_vision_model"):
        raise ValueError(
            f"{root}: vision encoder must be a fixed-resolution SigLIP / SigLIP2 checkpoint "
            f"(model_type siglip), got {config.get('model_type')!r}"
        )
    model = checkpoint_ready(
        SiglipVisionModel.from_pretrained(root, local_files_only=True, dtype=dtype)
    )
    pre = root / "preprocessor_config.json"
    stats = json.loads(pre.read_text()) if pre.is_file() else {}
    mean, std = stats.get("image_mean", [0.5] * 3), stats.get("image_std", [0.5] * 3)
    return HFVisionEncoder(model, temporal_factor, grid, mean, std, trainable)


# ---------------------------------------------------------------- diffusers wrappers
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
    """HunyuanVideo's dual/single-stream MMDiT behind the DiT interface. Its pooled (CLIP) text
    input comes from a new projection of the context's masked mean; its mask wants the valid
    context tokens first, so they are moved to the front (stable order)."""

    def __init__(self, model, guidance_scale: float = 6.0):
        super().__init__()
        cfg = model.config
        self.model, self.guidance_scale = model, guidance_scale
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.context_dim, self.patch = cfg.text_embed_dim, cfg.patch_size
        self.pool = nn.Linear(cfg.text_embed_dim, cfg.pooled_projection_dim, dtype=model.dtype)

    def forward(self, x, t, context, context_mask):
        order = torch.argsort((context_mask == 0).int(), dim=1, stable=True)
        context = context.gather(1, order[..., None].expand_as(context))
        mask = context_mask.gather(1, order)
        w = mask[..., None].to(context.dtype)
        dtype = self.model.dtype
        pooled = self.pool(((context * w).sum(1) / w.sum(1).clamp(min=1)).to(dtype))
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full(
                (x.shape[0],), self.guidance_scale * 1000, device=x.device, dtype=dtype
            )
        out = self.model(
            hidden_states=x.transpose(1, 2).to(dtype),
            timestep=(t * 1000).to(dtype),
            encoder_hidden_states=context.to(dtype),
            encoder_attention_mask=mask,
            pooled_projections=pooled,
            guidance=guidance,
            return_dict=False,
        )[0]
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
    if importlib.util.find_spec("accelerate") is not None:
        return checkpoint_ready(cls.from_pretrained(root, local_files_only=True, torch_dtype=dtype))
    model = cls.from_config(cls.load_config(root, local_files_only=True))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise MissingPretrained(f"{root}: no *.safetensors weights (needed without accelerate)")
    state = {}
    for f in files:
        state.update(load_file(f))
    model.load_state_dict(state, strict=True)
    model = model if dtype == torch.float32 else model.to(dtype)
    return checkpoint_ready(model.eval())


# ---------------------------------------------------------------- production builders
QWEN = "Qwen/Qwen2.5-7B-Instruct"
SIGLIP = "google/siglip-so400m-patch14-384"
SIGLIP2 = "google/siglip2-so400m-patch14-384"
WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
HUNYUAN = "hunyuanvideo-community/HunyuanVideo"
GRID = 8  # vision-encoder features pooled to 8 x 8 tokens per latent frame
NUM_TOKENS = 64  # Omni-Video vision tokens / VINO learnable queries


def _geometry(vae: DiffusersVAE, patch: int) -> Geometry:
    return Geometry(vae.spatial_factor * patch, vae.temporal_factor, MAX_TEXT_LEN)


def _omni_video(size, pretrained, shift, dtype):
    if size == "tiny":
        return omni_video.build_tiny(shift)
    where = f"omni_video size {size!r}"
    roots = locate_all(
        pretrained,
        where,
        [
            ("mllm", QWEN, None, None),
            ("vision_encoder", SIGLIP2, None, None),
            ("dit", WAN, "transformer", None),
            ("vae", WAN, "vae", "dit"),
        ],
    )
    vae = DiffusersVAE(load_diffusers("AutoencoderKLWan", roots["vae"], dtype))
    dit = WanDiT(load_diffusers("WanTransformer3DModel", roots["dit"], dtype), vae.latent_channels)
    encoder = load_siglip(roots["vision_encoder"], dtype, vae.temporal_factor, GRID)
    embed, decoder, head, tokenizer = load_causal_lm(roots["mllm"], dtype)
    model = omni_video.OmniVideo(
        mllm=MultimodalLM(embed, decoder, encoder.dim, decoder.dim),
        text_head=head,
        vision_encoder=encoder,
        vae=vae,
        dit=dit,
        tokenizer=tokenizer,
        geometry=_geometry(vae, dit.patch),
        num_vision_tokens=NUM_TOKENS,
        timestep_shift=shift,
    )
    return model if dtype == torch.float32 else model.to(dtype)


def _haplo_omni(size, pretrained, shift, dtype):
    if size == "tiny":
        return haplo_omni.build_tiny(shift)
    where = f"haplo_omni size {size!r}"
    roots = locate_all(
        pretrained,
        where,
        [
            ("pre_decoder", SIGLIP, None, None),
            ("base_decoder", QWEN, None, None),
            ("post_decoder", WAN, "transformer", None),
            ("vae", WAN, "vae", "post_decoder"),
        ],
    )
    vae = DiffusersVAE(load_diffusers("AutoencoderKLWan", roots["vae"], dtype))
    post = WanDiT(load_diffusers("WanTransformer3DModel", roots["post_decoder"], dtype))
    vit = load_siglip(roots["pre_decoder"], dtype, vae.temporal_factor, GRID, trainable=True)
    embed, decoder, head, tokenizer = load_causal_lm(roots["base_decoder"], dtype)
    model = haplo_omni.HaploOmni(
        pre_decoder=haplo_omni.PreDecoder(vit, embed, vae.latent_channels, post.patch),
        base_decoder=haplo_omni.BaseDecoder(decoder, head),
        base_dim=decoder.dim,
        post_decoder=post,
        vae=vae,
        tokenizer=tokenizer,
        geometry=_geometry(vae, post.patch),
        timestep_shift=shift,
    )
    return model if dtype == torch.float32 else model.to(dtype)


def _vino(size, pretrained, shift, dtype):
    if size == "tiny":
        return vino.build_tiny(shift)
    where = f"vino size {size!r}"
    roots = locate_all(
        pretrained,
        where,
        [
            ("vlm", QWEN, None, None),
            ("vision_encoder", SIGLIP2, None, None),
            ("mmdit", HUNYUAN, "transformer", None),
            ("vae", HUNYUAN, "vae", "mmdit"),
        ],
    )
    vae = DiffusersVAE(load_diffusers("AutoencoderKLHunyuanVideo", roots["vae"], dtype))
    mmdit = HunyuanMMDiT(load_diffusers("HunyuanVideoTransformer3DModel", roots["mmdit"], dtype))
    encoder = load_siglip(roots["vision_encoder"], dtype, vae.temporal_factor, GRID)
    embed, decoder, _, tokenizer = load_causal_lm(roots["vlm"], dtype, hidden_layer=-2)
    model = vino.Vino(
        vlm=MultimodalLM(embed, decoder, encoder.dim, decoder.dim),
        vision_encoder=encoder,
        vae=vae,
        mmdit=mmdit,
        tokenizer=tokenizer,
        geometry=_geometry(vae, mmdit.patch),
        num_queries=NUM_TOKENS,
        timestep_shift=shift,
    )
    return model if dtype == torch.float32 else model.to(dtype)


register("omni_video", _omni_video, ("tiny", "7b"))
register("haplo_omni", _haplo_omni, ("tiny", "7b"))
register("vino", _vino, ("tiny", "7b"))
