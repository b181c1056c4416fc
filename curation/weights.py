"""Where model weights are: the lookup shared by every curation model, and its errors.

Nothing here downloads anything. Weights are local files; a missing file is reported at
pipeline start-up (``RequiredFile`` -> ``stages.base.check_required`` -> ``MissingWeights``)
with the path that was expected and how to obtain it, and a file that does not match its
architecture fails loudly when loaded (``WeightsError``). There is no random-initialisation
fallback anywhere.

Lookup (``resolve``): an explicit path from the config wins; otherwise the file is looked up
under, in this order, the config's ``models_dir``, ``$OMNIFORGE_MODELS`` and
``~/.cache/omniforge/models``. The first root holding the file is used; when none does, the
path under the first root is reported as the expected location. Models dir layout::

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
``main`` snapshot under ``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``, ``~/.cache/huggingface/
hub``). Only files already in the cache are used: no Hugging Face API is called, so nothing
can reach the network (the same as ``HF_HUB_OFFLINE=1``). The architecture then comes from
that config; ``clip_model`` still names it (watermark head file, embedding key).

This module imports no torch: the driver checks every weights file without loading a model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLIP_SUFFIXES = (".safetensors", ".pt", ".bin")
HF_PREFIX = "hf-hub:"
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG_FILE = "open_clip_config.json"
VIEW = "squash"  # how a frame becomes the model's square input (see the module docstring)

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
MODELS_ENV = "OMNIFORGE_MODELS"
DEFAULT_MODELS_DIR = Path("~/.cache/omniforge/models")


class MissingWeights(RuntimeError):
    """A configured model's weights are not where they were looked for (raised at start-up)."""


class WeightsError(RuntimeError):
    """A weights file exists but cannot be used (corrupt, wrong format or architecture)."""


@dataclass(frozen=True)
class RequiredFile:
    """A file a stage needs before it can run, and how a user obtains it."""

    path: Path
    what: str
    how_to_get: str


def model_roots(models_dir: Path | str | None) -> list[Path]:
    """Roots searched in order: ``models_dir``, ``$OMNIFORGE_MODELS``, the user cache."""
    roots = []
    if models_dir is not None:
        roots.append(Path(models_dir).expanduser())
    if os.environ.get(MODELS_ENV):
        roots.append(Path(os.environ[MODELS_ENV]).expanduser())
    roots.append(DEFAULT_MODELS_DIR.expanduser())
    return roots


def resolve_any(
    explicit: Path | str | None, relatives: Sequence[str], models_dir: Path | str | None
) -> Path:
    """``explicit`` if given, else the first existing ``root/relative`` (roots in
    ``model_roots`` order, relatives in the given order per root), else the expected path
    ``first root / first relative``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    candidates = [root / rel for root in model_roots(models_dir) for rel in relatives]
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0]


def resolve(explicit: Path | str | None, relative: str, models_dir: Path | str | None) -> Path:
    """Where a weights file is: see the module docstring (the path is returned even when the
    file does not exist, so that the start-up check names where it was expected)."""
    return resolve_any(explicit, [relative], models_dir)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()
    return base / "huggingface" / "hub"


def hf_snapshot(repo: str) -> Path:
    """The cached ``main`` snapshot folder of ``repo`` (it may not exist)."""
    repo_dir = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        return repo_dir / "snapshots" / ref.read_text().strip()
    snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    if len(snapshots) == 1:  # a cache filled by copying, without refs/
        return snapshots[0]
    return repo_dir / "snapshots" / "<main>"


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
        if clip_weights is not None and str(clip_weights).startswith(HF_PREFIX):
            repo = str(clip_weights)[len(HF_PREFIX) :].strip("/")
            if repo.count("/") != 1:
                raise ValueError(f"clip_weights {clip_weights!r}: expected hf-hub:ORG/NAME")
            snapshot = hf_snapshot(repo)
            found = [snapshot / f for f in HF_WEIGHT_FILES if (snapshot / f).is_file()]
            return cls(arch, found[0] if found else snapshot / HF_WEIGHT_FILES[0], repo)
        return cls(arch, resolve_any(clip_weights, clip_relatives(arch), models_dir))

    @property
    def config_file(self) -> Path | None:
        """open_clip_config.json of an hf-hub snapshot (None for a plain checkpoint)."""
        return self.weights.parent / HF_CONFIG_FILE if self.hf_repo else None

    @property
    def key(self) -> str:
        """Identifies the embedding: two stages with equal keys produce equal embeddings."""
        source = f"hf-hub:{self.hf_repo}" if self.hf_repo else str(self.weights)
        return f"{self.arch}|{source}|{VIEW}"

    def required_files(self) -> list[RequiredFile]:
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
                RequiredFile(self.weights, what, how),
                RequiredFile(cfg, f"open_clip config of hf-hub:{self.hf_repo}", how),
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
        return [RequiredFile(self.weights, f"open_clip {self.arch} weights", how)]
