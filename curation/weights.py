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

CLIP weights can also come from a local Hugging Face hub cache (``hf_hub_cache``; see
``curation.clip.ClipSpec``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def _hf_snapshot(repo: str) -> Path:
    """The cached ``main`` snapshot folder of ``repo`` (it may not exist)."""
    repo_dir = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        return repo_dir / "snapshots" / ref.read_text().strip()
    snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    if len(snapshots) == 1:  # a cache filled by copying, without refs/
        return snapshots[0]
    return repo_dir / "snapshots" / "<main>"
