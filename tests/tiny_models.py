"""Tiny open_clip models and heads for tests (CPU, seconds), written to disk in the real formats;
tiny transformers / diffusers backbones of the production model sizes (``save_tiny_backbones``).

Nothing here is used by the pipeline. Tests build models, save them where a real run would find
real weights (``<models_dir>/open_clip/<ARCH>.safetensors``, ...) and load them back through
``curation.weights`` / ``curation.clip``, exactly like a run with downloaded weights.

Two architectures are registered with open_clip (``add_model_config``):

- ``omniforge-tiny-vit``: ViT, 64 px input, patch 16, width 64, 2 layers, 32-d embedding.
  Random weights (seeded): enough for plumbing tests (the aesthetic head is set by hand).
- ``omniforge-tiny-rn``: open_clip ModifiedResNet, 128 px input, width 4, 32-d embedding.
  A random tiny CLIP does not see watermarks: with a linear probe on its embedding, held-out
  corpus images separate at AUC 0.47-0.70 (random ViTs of 64-224 px input, 32-256 d
  embeddings), and a tiny ViT trained end to end for 300 steps did no better. The conv tower
  here learns it, so it is briefly *trained* (``train_watermark_tower``, 250 steps, ~20-30 s
  on one CPU thread) as a stand-in for a pretrained CLIP whose embedding carries the cue; the
  watermark head is then fitted separately on the frozen embeddings, as on a real CLIP.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from helpers import torch_threads
from PIL import Image
from torch import nn

from curation.clip import import_open_clip
from curation.media import fit_max_side
from curation.sample_data.images import WATERMARK_TEXT, place_text_lines
from curation.sample_data.render import (
    PALETTES,
    apply_overlay,
    landscape,
    logo_layer,
    watermark_layer,
)

TINY_VIT = "omniforge-tiny-vit"
TINY_RN = "omniforge-tiny-rn"
EMBED_DIM = 32
_TEXT = {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    TINY_VIT: {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": 64,
            "patch_size": 16,
            "head_width": 32,
        },
        "text_cfg": _TEXT,
    },
    # Same as TINY_VIT but for 96 px input: a checkpoint of one must not load into the other.
    TINY_VIT + "-96": {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": 96,
            "layers": 2,
            "width": 64,
            "patch_size": 16,
            "head_width": 32,
        },
        "text_cfg": _TEXT,
    },
    TINY_RN: {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 4, "head_width": 16},
        "text_cfg": _TEXT,
    },
}
_registered: Path | None = None


def register_tiny_configs() -> None:
    """Make the tiny architectures known to open_clip (once per process)."""
    global _registered
    if _registered is not None:
        return
    folder = Path(tempfile.mkdtemp(prefix="omniforge-tiny-clip-"))
    atexit.register(shutil.rmtree, folder, True)
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    import_open_clip().add_model_config(folder)
    _registered = folder


def build_clip(arch: str, seed: int = 0) -> nn.Module:
    """A freshly initialised (seeded) open_clip model of a tiny architecture."""
    register_tiny_configs()
    torch.manual_seed(seed)
    return import_open_clip().create_model(arch).eval()


def save_clip(model: nn.Module, path: Path) -> Path:
    """Save a model's state dict the way published open_clip checkpoints come."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def laion_head_state(input_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LAION-format aesthetic head state dict with seeded random weights."""
    from curation.heads import AestheticHead

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in AestheticHead(input_size).state_dict().items()}


def designed_laion_head_state(
    input_size: int, scale: float = 4.0, offset: float = 5.0
) -> dict[str, torch.Tensor]:
    """A LAION-format head computing ``offset + scale * e[0]`` (each layer passes unit 0 on)."""
    state = {k: torch.zeros_like(v) for k, v in laion_head_state(input_size).items()}
    for i in (0, 2, 4, 6):
        state[f"layers.{i}.weight"][0, 0] = 1.0
    state["layers.7.weight"][0, 0] = scale
    state["layers.7.bias"][0] = offset
    return state


# ------------------------------------------------------------ watermark training data


def _finish(img: np.ndarray, gray: bool, quality: int) -> np.ndarray:
    """Grey / JPEG round trip as stored, then downscaled like the frames stage does."""
    if gray:
        img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, 2)
    if quality:
        ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(fit_max_side(img))


def _overlay(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The corpus' overlay styles (text logo or shape logo, any corner, alpha 0.3-0.5)."""
    out = img.copy()
    h, w = out.shape[:2]
    corner = str(rng.choice(["tl", "tr", "bl", "br"]))
    if rng.random() < 0.6:
        layer = watermark_layer(h, w, WATERMARK_TEXT, corner, rel_width=0.3)
    else:
        layer = logo_layer(h, w, corner, rel_size=0.18)
    apply_overlay(out, layer, float(rng.uniform(0.3, 0.5)))
    return out, layer


def watermark_training_set(
    n_scenes: int = 150, variants: int = 3, seed: int = 1
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray | None], np.ndarray]:
    """Scenes drawn like the corpus (``landscape``, burned-in text on some), each clean and
    with ``variants`` overlays. Sizes 48x36 .. 1280x720 px (a fifth tiny), aspect ratios
    1:4.5 .. 4:1 (a third extreme), a tenth grey, half JPEG-compressed. Large scenes are
    rendered at ~400x300 and upscaled (they end up squashed to 128 px); overlays are drawn at
    full size, then frames are capped to 640 px like the frames stage does. Returns images,
    labels, overlay masks (None for clean) and scene ids."""
    rng = np.random.default_rng(seed)
    images, labels, masks, scenes = [], [], [], []
    for s in range(n_scenes):
        if rng.random() < 0.2:
            area = np.exp(rng.uniform(np.log(48 * 36), np.log(128 * 96)))
        else:
            area = np.exp(rng.uniform(np.log(128 * 96), np.log(1280 * 720)))
        v = rng.random()
        if v < 0.15:
            aspect = np.exp(rng.uniform(np.log(0.22), np.log(0.45)))
        elif v < 0.3:
            aspect = np.exp(rng.uniform(np.log(2.2), np.log(4.0)))
        else:
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        w, h = max(16, int(np.sqrt(area * aspect))), max(16, int(np.sqrt(area / aspect)))
        scale = min(1.0, float(np.sqrt(400 * 300 / (w * h))))
        base = landscape(
            rng, max(16, int(h * scale)), max(16, int(w * scale)), str(rng.choice(list(PALETTES)))
        )
        if scale < 1:
            base = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)
        if rng.random() < 0.3 and min(h, w) > 100:
            words = ["OPEN DAILY", "BIG NEWS", "SALE", "HELLO WORLD", "FRIDAY 9PM"]
            k = int(rng.integers(1, 3))
            place_text_lines(base, tuple(str(t) for t in rng.choice(words, k, replace=False)))
        gray = bool(rng.random() < 0.1)
        quality = int(rng.integers(60, 95)) if rng.random() < 0.5 else 0
        images.append(_finish(base, gray, quality))
        labels.append(False)
        masks.append(None)
        scenes.append(s)
        for _ in range(variants):
            marked, layer = _overlay(base, rng)
            images.append(_finish(marked, gray, quality))
            labels.append(True)
            masks.append(layer)
            scenes.append(s)
    return images, np.array(labels), masks, np.array(scenes)


def _preprocess(model: nn.Module):
    open_clip = import_open_clip()
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    return open_clip.image_transform(
        size,
        is_train=False,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        resize_mode="squash",
    )


def train_watermark_tower(
    images: list[np.ndarray],
    labels: np.ndarray,
    masks: list[np.ndarray | None],
    scenes: np.ndarray,
    steps: int = 250,
    seed: int = 0,
) -> nn.Module:
    """Train the image tower of a fresh ``omniforge-tiny-rn`` to put watermark evidence in its
    embedding (stand-in for CLIP pretraining; the probe used here is thrown away).

    Batches pair a clean scene with one of its overlaid variants (horizontal flips at random);
    the loss is a 2-way probe on the L2-normalised embedding plus a dense auxiliary loss on
    ``layer3`` (8x8 cells at 128 px) predicting which cells the overlay covers, which makes the
    tower learn local evidence from ~150 scenes. Preprocessing is the one the stages use (whole
    frame squashed to 128 px, open_clip bicubic). Deterministic for a seed.
    """
    model = build_clip(TINY_RN, seed)
    visual = model.visual
    preprocess = _preprocess(model)
    x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    grid = visual.image_size // 16 if isinstance(visual.image_size, int) else 8
    cover = np.stack(
        [
            np.zeros((grid, grid), np.float32)
            if m is None
            else cv2.resize(m, (grid, grid), interpolation=cv2.INTER_AREA)
            for m in masks
        ]
    )
    cells = torch.from_numpy(cover > 0.01).float()
    y = torch.from_numpy(labels.astype(np.int64))
    clean = {int(s): i for i, s in enumerate(scenes) if not labels[i]}
    marked: dict[int, list[int]] = {}
    for i, s in enumerate(scenes):
        if labels[i]:
            marked.setdefault(int(s), []).append(i)
    scene_ids = sorted(set(clean) & set(marked))

    probe = nn.Linear(EMBED_DIM, 2)
    aux = nn.Conv2d(visual.layer3[-1].conv3.out_channels, 1, 1)
    feats: dict[str, torch.Tensor] = {}
    hook = visual.layer3.register_forward_hook(lambda m, i, o: feats.__setitem__("l3", o))
    params = [*visual.parameters(), *probe.parameters(), *aux.parameters()]
    opt = torch.optim.AdamW(params, lr=4e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-3, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    pos_weight = torch.tensor(5.0)
    half = 16
    visual.train().requires_grad_(True)
    with torch_threads(1):  # training is many tiny ops
        for _ in range(steps):
            pick = torch.randint(0, len(scene_ids), (half,), generator=gen).tolist()
            a = [clean[scene_ids[p]] for p in pick]
            b = [
                marked[scene_ids[p]][
                    int(torch.randint(0, len(marked[scene_ids[p]]), (1,), generator=gen))
                ]
                for p in pick
            ]
            idx = torch.tensor(a + b)
            flip = (torch.rand(half, generator=gen) < 0.5).repeat(2)
            xb = torch.where(flip[:, None, None, None], x[idx].flip(3), x[idx])
            cb = torch.where(flip[:, None, None], cells[idx].flip(2), cells[idx])
            emb = nn.functional.normalize(visual(xb), dim=-1)
            loss = nn.functional.cross_entropy(probe(emb) * 10, y[idx])
            loss = loss + nn.functional.binary_cross_entropy_with_logits(
                aux(feats["l3"])[:, 0], cb, pos_weight=pos_weight
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    hook.remove()
    visual.eval().requires_grad_(False)
    return model.eval()


def auc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    p, n = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(np.mean((p > n) + 0.5 * (p == n)))


def save_tiny_vlm(path: Path, tokenizer, version: str = "qwen2_5_vl") -> Path:
    """A tiny random Qwen2.5-VL or Qwen3-VL (``version`` "qwen3_vl") checkpoint folder, saved as
    the real ones ship: ``AutoModelForImageTextToText`` weights + config, ``tokenizer`` and the
    Qwen2-VL image processor (built offline; no chat template or video processor is needed by
    ``training.models.hf_transformers.load_vlm``). Tied embeddings, 32-d LM, 2 layers."""
    import core.compat  # noqa: F401

    # isort: split
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    if version == "qwen3_vl":
        patch = 16
        config = Qwen3VLConfig(
            text_config=dict(
                text,
                head_dim=8,
                rope_scaling={
                    "rope_type": "default",
                    "mrope_section": [1, 1, 2],
                    "mrope_interleaved": True,
                },
            ),
            vision_config=dict(
                vision,
                depth=2,
                patch_size=patch,
                num_position_embeddings=16,
                deepstack_visual_indexes=[1],
            ),
            tie_word_embeddings=True,
        )
        model = Qwen3VLForConditionalGeneration(config)
    else:
        patch = 14
        config = Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(
                vision, depth=1, patch_size=patch, fullatt_block_indexes=[0], window_size=56
            ),
            tie_word_embeddings=True,
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2).save_pretrained(
        path
    )
    return path


def save_tiny_backbones(root: Path) -> dict[str, dict[str, Path]]:
    """Tiny random checkpoints under ``root``, saved the way the real ones are: a Qwen2 causal
    LM + tokenizer, Qwen2.5-VL and Qwen3-VL (+ image processor), a SigLIP vision tower, Wan and
    HunyuanVideo transformers + VAEs (diffusers folders). Returns each family's
    ``model.pretrained`` for its 7b size. Seeded: the same weights every time."""
    import core.compat  # noqa: F401

    # isort: split
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        AutoencoderKLWan,
        HunyuanVideoTransformer3DModel,
        WanTransformer3DModel,
    )
    from tokenizers import pre_tokenizers
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2Tokenizer,
        SiglipConfig,
        SiglipModel,
    )

    torch.manual_seed(0)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            # Qwen's vision markers (VINO wraps visual inputs in them)
            "additional_special_tokens": ["<|vision_start|>", "<|vision_end|>"],
        }
    )
    llm = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(llm).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    save_tiny_vlm(root / "qwen2_5_vl", tok)
    save_tiny_vlm(root / "qwen3_vl", tok, "qwen3_vl")
    siglip = SiglipConfig(  # the full two-tower checkpoint, as google/siglip* ship it
        text_config=dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    SiglipModel(siglip).save_pretrained(root / "siglip")
    WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    ).save_pretrained(root / "wan" / "transformer")
    AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).save_pretrained(root / "wan" / "vae")
    HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    ).save_pretrained(root / "hunyuan" / "transformer")
    AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
    ).save_pretrained(root / "hunyuan" / "vae")
    return {
        "omni_video": {
            "mllm": root / "qwen2_5_vl",
            "vision_encoder": root / "siglip",
            "dit": root / "wan",
        },
        "haplo_omni": {
            "pre_decoder": root / "siglip",
            "base_decoder": root / "llm",
            "post_decoder": root / "wan",
        },
        "vino": {"vlm": root / "qwen3_vl", "mmdit": root / "hunyuan"},
    }


def save_tiny_teachers(root: Path, latent_channels: int = 8, patch: int = 1) -> dict[str, Path]:
    """Tiny random HaploOmni warmup teachers of the paper's classes (haplo-omni.txt:271), saved
    as their libraries save them: a transformers ``CLIPVisionModel`` and a diffusers
    ``CogVideoXTransformer3DModel`` (in a repo's ``transformer/`` subfolder) reading
    ``latent_channels``-channel latents. Returns each warmup group's teacher folder."""
    import core.compat  # noqa: F401

    # isort: split
    from diffusers import CogVideoXTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    clip = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8)
    )  # fmt: skip
    clip.save_pretrained(root / "clip")
    cog = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=latent_channels,
        out_channels=latent_channels, time_embed_dim=32, text_embed_dim=16, num_layers=1,
        sample_width=8, sample_height=8, sample_frames=1, patch_size=patch, max_text_seq_length=4,
    )  # fmt: skip
    cog.save_pretrained(root / "cogvideox" / "transformer")  # a diffusers repo layout
    return {"pre_decoder": root / "clip", "post_decoder": root / "cogvideox"}
