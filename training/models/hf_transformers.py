"""transformers backbones behind the family interfaces (``base``): a causal LM as token
embedding + decoder body + LM head + tokenizer; a vision-language model (Qwen2.5-VL, Qwen3-VL)
as the same plus its own vision tower (``VLMVision``, with its pretrained merger into the LM
width, so no projector starts fresh); SigLIP as the vision encoder. Loaded from local
directories only (``local_files_only``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.weights import is_config_only
from training.models.blocks import attention_mask
from training.models.checkpointing import checkpoint_ready
from training.models.geometry import group_frames
from training.models.text import chat_ids, pad_chat, pad_sequences


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

    def chat(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions and conversations -> (ids, mask, loss_mask) (``text`` module docstring);
        a conversation starts with what the tokenizer puts before a text (e.g. bos)."""
        prefix = [i for i in self.tok("", add_special_tokens=True)["input_ids"] if i != self.eos]
        seqs = []
        for item in items:
            if isinstance(item, str):
                ids, mask = self([item])
                ids = ids[0][mask[0].bool()].tolist()
                seqs.append((ids, [1] * len(ids)))
            else:
                seqs.append(chat_ids(item, self._encode, prefix, self.eos))
        return pad_chat(seqs, self.pad, self.max_len)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def hf_model(cls, root: Path, **kwargs):
    """``cls.from_pretrained`` from the local folder; under ``core.weights.config_only`` the
    same class built from the folder's config on the ``meta`` device (no weights read)."""
    if not is_config_only():
        return cls.from_pretrained(root, local_files_only=True, **kwargs)
    config_cls = getattr(cls, "config_class", None)
    if config_cls is not None:  # a concrete class (SiglipVisionModel): its own config
        config = config_cls.from_pretrained(root, local_files_only=True)
        with torch.device("meta"):
            return cls(config).to(kwargs["dtype"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(root, local_files_only=True)
    with torch.device("meta"):
        return cls.from_config(config, **kwargs)


def load_causal_lm(root: Path, dtype: torch.dtype, max_text_len: int, hidden_layer: int = -1):
    """-> (token embedding, HFDecoder, LM head, HFTokenizer). The embedding and head leave the
    body so they can sit in other groups; a tied head is untied (copied)."""
    import core.compat  # noqa: F401  (torchvision with CPU torch)

    # isort: split
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = checkpoint_ready(
        hf_model(AutoModelForCausalLM, root, dtype=dtype, attn_implementation="sdpa")
    )
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        untied = nn.Linear(head.in_features, head.out_features, bias=False, dtype=dtype)
        untied.weight = nn.Parameter(embed.weight.detach().clone())
        head = untied
    body = model.base_model
    body.set_input_embeddings(None)  # fed inputs_embeds; the table lives in its own group
    return embed, HFDecoder(body, hidden_layer), head, HFTokenizer(tokenizer, max_text_len)


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
    model = checkpoint_ready(hf_model(SiglipVisionModel, root, dtype=dtype))
    pre = root / "preprocessor_config.json"
    stats = json.loads(pre.read_text()) if pre.is_file() else {}
    mean, std = stats.get("image_mean", [0.5] * 3), stats.get("image_std", [0.5] * 3)
    return HFVisionEncoder(model, temporal_factor, grid, mean, std, trainable)


VLM_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class VLMVision(nn.Module):
    """A VLM's own vision tower behind the vision-encoder interface. Frames are resized to a
    square of ``grid`` x ``grid`` merged patches (``grid * patch * merge`` pixels, 224 px for
    Qwen2.5-VL, 256 for Qwen3-VL), so each frame gives ``grid**2`` tokens as the SigLIP path
    does; the VLM's image processor normalises and patchifies them (``image_grid_thw``) and the
    tower with its merger maps them into the LM width (``dim``). Per latent frame as in
    ``group_frames``. Always frozen. The decoder is fed ``inputs_embeds`` only: visual tokens
    take sequential positions (not the VLM's 3D M-RoPE ones) and Qwen3-VL's deepstack features
    are not injected."""

    def __init__(self, visual: nn.Module, processor, temporal_factor: int, grid: int, dim: int):
        super().__init__()
        self.visual, self.processor = visual, processor
        self.temporal_factor, self.grid, self.dim = temporal_factor, grid, dim
        cfg = visual.config
        self.patch, self.merge = cfg.patch_size, cfg.spatial_merge_size
        self.side = grid * self.patch * self.merge
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W) -> (B, T', N, D)
        b, t = pixels.shape[:2]
        x = F.interpolate(
            pixels.flatten(0, 1).float(), (self.side, self.side), mode="bilinear", antialias=True
        )
        inputs = self.processor(
            images=list(((x + 1) / 2).clamp(0, 1)),
            do_resize=False,
            do_rescale=False,
            patch_size=self.patch,
            merge_size=self.merge,
            return_tensors="pt",
        )
        dtype = next(self.visual.parameters()).dtype
        h = self.visual(
            inputs["pixel_values"].to(pixels.device, dtype),
            grid_thw=inputs["image_grid_thw"].to(pixels.device),
        ).pooler_output  # (B*T*grid*grid, D), merged patches in raster order per frame
        return group_frames(h.reshape(b, t, self.grid * self.grid, -1), self.temporal_factor)


def load_vlm(
    root: Path,
    dtype: torch.dtype,
    max_text_len: int,
    temporal_factor: int,
    grid: int,
    hidden_layer: int = -1,
):
    """-> (token embedding, HFDecoder over the language model, LM head, HFTokenizer,
    VLMVision) of a Qwen2-VL-family checkpoint (``AutoModelForImageTextToText``); a tied head
    is untied (copied) as in ``load_causal_lm``."""
    import core.compat  # noqa: F401

    # isort: split
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    kind = json.loads((root / "config.json").read_text()).get("model_type")
    if kind not in VLM_TYPES:
        raise ValueError(
            f"{root}: the VLM must be a Qwen2-VL family checkpoint (model_type one of "
            f"{', '.join(VLM_TYPES)}), got {kind!r}"
        )
    model = checkpoint_ready(
        hf_model(AutoModelForImageTextToText, root, dtype=dtype, attn_implementation="sdpa")
    )
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
    body = model.model.language_model
    embed, head = body.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        untied = nn.Linear(head.in_features, head.out_features, bias=False, dtype=dtype)
        untied.weight = nn.Parameter(embed.weight.detach().clone())
        head = untied
    body.set_input_embeddings(None)
    vision = VLMVision(
        model.model.visual, processor, temporal_factor, grid, body.config.hidden_size
    )
    decoder = HFDecoder(body, hidden_layer)
    return embed, decoder, head, HFTokenizer(tokenizer, max_text_len), vision
