"""Where curation's model weights are: the models-dir layout and the CLIP weights spec.

The lookup and its errors are the shared policy of ``core.weights``: an explicit path from the
config wins; otherwise the file is looked up under the model roots (the config's
``models_dir``, ``$OMNIFORGE_MODELS``, ``~/.cache/omniforge/models``). Nothing downloads; a
missing file is reported at pipeline start-up (``Stage.required_files`` ->
``stages.base.check_required`` -> ``MissingWeights``) with the path that was expected and how to
obtain it, and a file that does not match its architecture fails loudly when loaded
(``WeightsError``). There is no random-initialisation fallback anywhere. Models dir layout::

    open_clip/<ARCH>.safetensors            open_clip checkpoint (state dict) of architecture
    open_clip/<ARCH>.pt | <ARCH>.bin        <ARCH> (an ``open_clip.list_models()`` name); the
                                            first of the three suffixes that exists is used
    aesthetic/sac+logos+ava1-l14-linearMSE.pth
                                            LAION improved-aesthetic-predictor MLP head (state
                                            dict as published; it scores OpenAI ViT-L/14
                                            embeddings, i.e. ``ViT-L-14-quickgelu`` + the
                                            ``openai`` weights)
    watermark/<ARCH>-watermark-head.safetensors
                                            our watermark classifier head for <ARCH>
                                            (``curation.heads.WatermarkHead``)

CLIP weights can also come from a local Hugging Face hub cache: ``clip_weights:
hf-hub:ORG/NAME`` reads ``open_clip_config.json`` and the weights
(``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``) of the repository's
``main`` snapshot (``core.weights.hf_snapshot``). The architecture then comes from that config;
``clip_model`` still names it (watermark head file, embedding key).

This module imports no torch: the driver checks every weights file without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.weights import CHECKPOINT, LocalWeights, hf_hub_cache, hf_repo, resolve_weights

CLIP_SUFFIXES = (".safetensors", ".pt", ".bin")
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG_FILE = "open_clip_config.json"
VIEW = "squash"  # how a frame becomes the model's square input (see curation.clip)

# Where the published open_clip weights of common architectures can be fetched (a machine with
# network access; then copy the file into the models dir under the expected name).
_HF_HINTS = {
    "ViT-L-14": "timm/vit_large_patch14_clip_224.openai",
    "ViT-L-14-quickgelu": "timm/vit_large_patch14_clip_224.openai",
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
    "ViT-B-32-quickgelu": "timm/vit_base_patch32_clip_224.openai",
    "ViT-B-16": "timm/vit_base_patch16_clip_224.openai",
    "ViT-B-16-quickgelu": "timm/vit_base_patch16_clip_224.openai",
}


# A model worker's process without its weights (Python, Ray's worker, the libraries, buffers):
# P1's OCR actors (5 MB of weights) peaked at 380-460 MB (PSS).
WORKER_BASE_MB = 500


def memory_estimate_mb(path: Path | str | None) -> int:
    """What one model worker holds: its weights' size on disk (a file, or a directory's files)
    plus ``WORKER_BASE_MB``; for the planner (``curation.adapter.plan_workers``), not a limit."""
    p = Path(path) if path is not None else None
    if p is not None and p.is_dir():
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    else:
        size = p.stat().st_size if p is not None and p.is_file() else 0
    return WORKER_BASE_MB + size // 2**20


def clip_relatives(arch: str) -> list[str]:
    return [f"open_clip/{arch}{suffix}" for suffix in CLIP_SUFFIXES]


AESTHETIC_HEAD = "aesthetic/sac+logos+ava1-l14-linearMSE.pth"


def watermark_head_relative(arch: str) -> str:
    return f"watermark/{arch}-watermark-head.safetensors"


@dataclass(frozen=True)
class ClipSpec:
    """Which open_clip model embeds frames, and the file its weights are read from."""

    arch: str
    weights: Path  # checkpoint file; for hf-hub: the weights file in the cached snapshot
    hf_repo: str | None = None

    @classmethod
    def resolve(
        cls, arch: str, clip_weights: Path | str | None, models_dir: Path | str | None
    ) -> ClipSpec:
        repo = hf_repo(clip_weights)
        if repo is not None:
            snapshot = resolve_weights(clip_weights, [], kind=CHECKPOINT)
            found = [snapshot / f for f in HF_WEIGHT_FILES if (snapshot / f).is_file()]
            return cls(arch, found[0] if found else snapshot / HF_WEIGHT_FILES[0], repo)
        return cls(arch, resolve_weights(clip_weights, clip_relatives(arch), models_dir))

    @property
    def config_file(self) -> Path | None:
        """open_clip_config.json of an hf-hub snapshot (None for a plain checkpoint)."""
        return self.weights.parent / HF_CONFIG_FILE if self.hf_repo else None

    @property
    def key(self) -> str:
        """Identifies the embedding: two stages with equal keys produce equal embeddings."""
        source = f"hf-hub:{self.hf_repo}" if self.hf_repo else str(self.weights)
        return f"{self.arch}|{source}|{VIEW}"

    def required_files(self) -> list[LocalWeights]:
        if self.hf_repo:
            how = (
                f"on a machine with network access run `huggingface-cli download {self.hf_repo} "
                f"{HF_CONFIG_FILE} {HF_WEIGHT_FILES[0]}` (or {HF_WEIGHT_FILES[1]}) and copy the "
                f"cache to {hf_hub_cache()}; the run itself never downloads"
            )
            what = f"open_clip weights of hf-hub:{self.hf_repo} (local Hugging Face cache)"
            cfg = self.config_file
            assert cfg is not None
            return [
                LocalWeights(self.weights, what, how),
                LocalWeights(cfg, f"open_clip config of hf-hub:{self.hf_repo}", how),
            ]
        hint = _HF_HINTS.get(self.arch)
        fetch = (
            f"e.g. `huggingface-cli download {hint} open_clip_pytorch_model.bin --local-dir "
            f"DIR` on a machine with network access, then copy DIR/open_clip_pytorch_model.bin "
            f"to {self.weights.with_suffix('.bin')}"
            if hint
            else f"any open_clip checkpoint of {self.arch} "
            f"(open_clip.list_pretrained_tags_by_model('{self.arch}') lists published ones)"
        )
        how = (
            f"{fetch}; or set aesthetic.clip_weights to a checkpoint file, or hf-hub:ORG/NAME "
            "for a local Hugging Face cache"
        )
        if self.arch == "ViT-L-14":
            how += (
                "; note: the LAION aesthetic head scores OpenAI ViT-L/14 embeddings, which "
                "need clip_model ViT-L-14-quickgelu"
            )
        return [LocalWeights(self.weights, f"open_clip {self.arch} weights", how)]
