"""The production (pretrained) sizes of the families: which checkpoints, put together how.

Size ``"7b"`` wraps pretrained backbones from local checkpoint folders, found and checked by the
local-weights policy of ``core.weights`` before anything loads: a ``model.pretrained`` entry
(module group -> folder, or ``hf-hub:ORG/NAME`` for the local Hugging Face cache) wins; an unset
entry is looked up as ``<root>/<NAME>`` (the checkpoint's repository name, e.g.
``Qwen2.5-7B-Instruct``) under the model roots ``$OMNIFORGE_MODELS``,
``~/.cache/omniforge/models``. Loading is ``local_files_only``: nothing is ever downloaded. A
missing folder, config.json, weights file or shard raises ``MissingWeights`` naming the group,
the path and the download command; a production size never falls back to random backbone
weights. Dimensions come from the checkpoints' configs, so any compatible checkpoint works.
Weights load in the dtype asked for (the trainer: bf16 on GPU unless ``precision: fp32``,
fp32 on CPU).

The papers' model families are used where transformers / diffusers can load them: Omni-Video
and VINO read images and video frames with a vision-language model's own vision tower and
merger (``image_grid_thw`` through its image processor), not a fresh projector over a separate
encoder. Only the glue the papers train from scratch starts fresh (Omni-Video: vision head,
adapter; HaploOmni: pre-/post-connector; VINO: learnable queries, connector, boundary
connector), and
``training.recipe`` refuses a 7b recipe whose first stage using such a group keeps it frozen.

Production size "7b" (``pretrained`` key: class; checkpoint named in the error messages):
- omni_video: mllm (+ text_head, + its vision tower for the inputs): AutoModelForImageText-
  ToText, Qwen/Qwen2.5-VL-7B-Instruct (the paper's VILA, omni-video-report.txt:408, has no
  transformers class); vision_encoder (the vision head's targets, SigLIP-v2 as in
  omni-video.txt:66): SiglipVisionModel, google/siglip2-so400m-patch14-384; dit / vae (vae
  defaults to the dit dir): WanTransformer3DModel / AutoencoderKLWan,
  Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
- haplo_omni: pre_decoder (its ViT): SiglipVisionModel, google/siglip-so400m-patch14-384;
  base_decoder: AutoModelForCausalLM, Qwen/Qwen2.5-7B-Instruct (a plain LLM, as in
  haplo-omni.txt:211); post_decoder / vae: Wan as above.
- vino: vlm (penultimate-layer states; its vision tower is the ``vision_encoder`` group):
  AutoModelForImageTextToText, Qwen/Qwen3-VL-4B-Instruct (vino.txt:154), whose tokenizer
  must have ``<|vision_start|>`` / ``<|vision_end|>`` (the boundary tokens reuse them); mmdit /
  vae:
  HunyuanVideoTransformer3DModel / AutoencoderKLHunyuanVideo,
  hunyuanvideo-community/HunyuanVideo.
A diffusers folder may be given as the repo root (``transformer/``, ``vae/`` subfolders) or as
the model folder itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.weights import CHECKPOINT, LocalWeights, model_roots, require_all, resolve_weights
from training.models import haplo_omni, omni_video, vino
from training.models.base import Geometry
from training.models.blocks import MultimodalLM
from training.models.hf_diffusers import DiffusersVAE, HunyuanMMDiT, WanDiT, load_diffusers
from training.models.hf_transformers import load_causal_lm, load_siglip, load_vlm

MAX_TEXT_LEN = 512  # production captions / instructions, in backbone tokens
QWEN = "Qwen/Qwen2.5-7B-Instruct"
QWEN_VL = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN3_VL = "Qwen/Qwen3-VL-4B-Instruct"
SIGLIP = "google/siglip-so400m-patch14-384"
SIGLIP2 = "google/siglip2-so400m-patch14-384"
WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
HUNYUAN = "hunyuanvideo-community/HunyuanVideo"
GRID = 8  # vision-encoder features pooled to 8 x 8 tokens per latent frame
NUM_TOKENS = 64  # Omni-Video vision tokens / VINO learnable queries


def locate_all(pretrained: dict[str, str], where: str, specs: list[tuple]) -> dict[str, Path]:
    """The checked checkpoint folder of each (group, repo, subfolder, fallback) spec, before
    anything loads; every problem is reported in one ``MissingWeights``. ``where``: "family
    size". Keys of ``pretrained`` outside ``specs`` are errors."""
    allowed = [spec[0] for spec in specs]
    unknown = sorted(set(pretrained) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown model.pretrained keys {unknown}; allowed: {', '.join(allowed)}"
        )
    weights = [pretrained_weights(pretrained, where, *spec) for spec in specs]
    return dict(zip(allowed, require_all(weights), strict=True))


def pretrained_weights(
    pretrained: dict[str, str],
    where: str,
    group: str,
    repo: str,
    subfolder: str | None = None,
    fallback: str | None = None,
) -> LocalWeights:
    """Where ``group``'s checkpoint is: its ``model.pretrained`` entry (or ``fallback``'s), else
    ``<root>/<repo name>`` under the model roots. A diffusers repo folder stands for its
    ``subfolder`` (``transformer/``, ``vae/``) when it has one."""
    explicit = pretrained.get(group) or (pretrained.get(fallback) if fallback else None)
    base = resolve_weights(explicit, repo.split("/")[-1], kind=CHECKPOINT)
    root = base / subfolder if subfolder and (base / subfolder).is_dir() else base
    folder = f" (with its {subfolder}/ folder)" if subfolder else ""
    how = f"fetch {repo}{folder}: `hf download {repo} --local-dir {base}`"
    if not explicit:
        also = f" (or model.pretrained.{fallback})" if fallback else ""
        roots = ", ".join(map(str, model_roots()))
        how = (
            f"model.pretrained.{group}{also} is not set, so it was looked up under {roots}; "
            f"{how}, or set model.pretrained.{group} to a local folder holding it"
        )
    return LocalWeights(root, f"{where}: {group}", how, CHECKPOINT)


def _geometry(vae: DiffusersVAE, patch: int) -> Geometry:
    return Geometry(vae.spatial_factor * patch, vae.temporal_factor, MAX_TEXT_LEN)


def build_omni_video(size: str, pretrained: dict[str, str], shift: float, dtype: torch.dtype):
    where = f"omni_video size {size!r}"
    roots = locate_all(
        pretrained,
        where,
        [
            ("mllm", QWEN_VL, None, None),
            ("vision_encoder", SIGLIP2, None, None),
            ("dit", WAN, "transformer", None),
            ("vae", WAN, "vae", "dit"),
        ],
    )
    vae = DiffusersVAE(load_diffusers("AutoencoderKLWan", roots["vae"], dtype))
    dit = WanDiT(load_diffusers("WanTransformer3DModel", roots["dit"], dtype), vae.latent_channels)
    encoder = load_siglip(roots["vision_encoder"], dtype, vae.temporal_factor, GRID)
    embed, decoder, head, tokenizer, tower = load_vlm(
        roots["mllm"], dtype, MAX_TEXT_LEN, vae.temporal_factor, GRID
    )
    model = omni_video.OmniVideo(
        mllm=MultimodalLM(embed, decoder, tower.dim, decoder.dim, projector=False, vision=tower),
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


def build_haplo_omni(
    size: str, pretrained: dict[str, str], shift: float, dtype: torch.dtype, adaln_layers: int = 0
):
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
    embed, decoder, head, tokenizer = load_causal_lm(roots["base_decoder"], dtype, MAX_TEXT_LEN)
    model = haplo_omni.HaploOmni(
        pre_decoder=haplo_omni.PreDecoder(vit, embed, vae.latent_channels, post.patch),
        base_decoder=haplo_omni.BaseDecoder(decoder, head),
        base_dim=decoder.dim,
        post_decoder=post,
        vae=vae,
        tokenizer=tokenizer,
        geometry=_geometry(vae, post.patch),
        timestep_shift=shift,
        adaln_layers=adaln_layers,  # fresh blocks, identity at initialisation (adaln.py)
        adaln_heads=max(1, decoder.dim // 128),
    )
    return model if dtype == torch.float32 else model.to(dtype)


VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>")  # Qwen2.5 / Qwen3(-VL) special tokens


def vision_token_ids(tokenizer, vocab_rows: int, root: Path) -> tuple[int, int]:
    """The VLM's ids of ``<|vision_start|>`` / ``<|vision_end|>``: VINO wraps each visual
    input in them and reuses their states as the boundary tokens of its latents (vino.txt:111).
    A tokenizer without them (not a Qwen2.5 / Qwen3 family one) is refused."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_MARKERS]
    bad = [
        t
        for t, i in zip(VISION_MARKERS, ids, strict=True)
        if i is None or i == tokenizer.unk_token_id or not 0 <= i < vocab_rows
    ]
    if bad:
        raise ValueError(
            f"vino: the VLM tokenizer at {root} has no {' / '.join(bad)} token (VINO's boundary "
            "tokens reuse the VLM's vision start / end tokens, vino.txt:111); use a Qwen2.5 or "
            "Qwen3 checkpoint, whose vocabulary has them"
        )
    return ids[0], ids[1]


def build_vino(size: str, pretrained: dict[str, str], shift: float, dtype: torch.dtype):
    where = f"vino size {size!r}"
    roots = locate_all(
        pretrained,
        where,
        [
            ("vlm", QWEN3_VL, None, None),
            ("mmdit", HUNYUAN, "transformer", None),
            ("vae", HUNYUAN, "vae", "mmdit"),
        ],
    )
    vae = DiffusersVAE(load_diffusers("AutoencoderKLHunyuanVideo", roots["vae"], dtype))
    mmdit = HunyuanMMDiT(load_diffusers("HunyuanVideoTransformer3DModel", roots["mmdit"], dtype))
    embed, decoder, _, tokenizer, tower = load_vlm(
        roots["vlm"], dtype, MAX_TEXT_LEN, vae.temporal_factor, GRID, hidden_layer=-2
    )
    model = vino.Vino(
        vlm=MultimodalLM(embed, decoder, tower.dim, decoder.dim, projector=False),
        vision_encoder=tower,
        vae=vae,
        mmdit=mmdit,
        tokenizer=tokenizer,
        geometry=_geometry(vae, mmdit.patch),
        vision_tokens=vision_token_ids(tokenizer.tok, embed.num_embeddings, roots["vlm"]),
        num_queries=NUM_TOKENS,
        timestep_shift=shift,
    )
    return model if dtype == torch.float32 else model.to(dtype)
