"""Where model weights are on local disk: the one policy curation and training share.

- Nothing is downloaded at run time. Weights are local files or checkpoint folders; loaders get
  a local path (transformers / diffusers with ``local_files_only``).
- Lookup (``resolve_weights``): a path given in the config wins, as given. ``hf-hub:ORG/NAME``
  names the cached ``main`` snapshot of that repository in the local Hugging Face hub cache
  (``hf_snapshot``): no hub API is called, as with ``HF_HUB_OFFLINE=1``. Without an explicit
  path, the weights' conventional relative name is looked up under the model roots, in order:
  the config's ``models_dir``, ``$OMNIFORGE_MODELS``, ``~/.cache/omniforge/models``. The first
  root holding it wins; when none does, the path under the first root is where it was expected.
- Checking (``LocalWeights``): a weights file must exist; a checkpoint folder (transformers /
  diffusers layout) must hold ``config.json``, weights and every shard its index lists.
  ``require`` / ``require_all`` raise ``MissingWeights`` naming what is needed, the path looked
  at and how to get it, before anything loads (``require_all``: every problem at once). There is
  no fallback to random weights anywhere.
- A weights file that is there but cannot be used (corrupt, wrong format or architecture)
  raises ``WeightsError`` naming it.
- Config only (``config_only()``): within it a checkpoint folder needs only its config.json
  (and the tokenizer / processor files its loader reads), and the training loaders build their
  models from the configs on the ``meta`` device: shapes and parameter counts without weights
  or memory (``train plan`` of a recipe whose weights live on the cluster).

This module imports no torch: a driver checks every path without loading a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

MODELS_ENV = "OMNIFORGE_MODELS"
DEFAULT_MODELS_DIR = Path("~/.cache/omniforge/models")
HF_PREFIX = "hf-hub:"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
FILE, CHECKPOINT = "file", "checkpoint"  # LocalWeights kinds
_CONFIG_ONLY: ContextVar[bool] = ContextVar("omniforge_config_only", default=False)


@contextmanager
def config_only() -> Iterator[None]:
    """Within the block, checkpoints need only their configs and models build on ``meta``."""
    token = _CONFIG_ONLY.set(True)
    try:
        yield
    finally:
        _CONFIG_ONLY.reset(token)


def is_config_only() -> bool:
    return _CONFIG_ONLY.get()


class MissingWeights(FileNotFoundError):
    """Weights a model needs are not where they were looked for (nothing is downloaded)."""


class WeightsError(RuntimeError):
    """A weights file exists but cannot be used (corrupt, wrong format or architecture)."""


def model_roots(models_dir: Path | str | None = None) -> list[Path]:
    """Roots searched in order: ``models_dir``, ``$OMNIFORGE_MODELS``, the user cache."""
    roots = []
    if models_dir is not None:
        roots.append(Path(models_dir).expanduser())
    if os.environ.get(MODELS_ENV):
        roots.append(Path(os.environ[MODELS_ENV]).expanduser())
    roots.append(DEFAULT_MODELS_DIR.expanduser())
    return roots


def hf_repo(spec: Path | str | None) -> str | None:
    """``ORG/NAME`` of an ``hf-hub:ORG/NAME`` spec; None for anything else (a path)."""
    if spec is None or not str(spec).startswith(HF_PREFIX):
        return None
    repo = str(spec)[len(HF_PREFIX) :].strip("/")
    if repo.count("/") != 1:
        raise ValueError(f"{spec!r}: expected hf-hub:ORG/NAME")
    return repo


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


def resolve_weights(
    explicit: Path | str | None,
    relatives: str | Sequence[str],
    models_dir: Path | str | None = None,
    *,
    kind: str = FILE,
) -> Path:
    """Where weights are, or where they were expected (see the module docstring): never raises
    for absent weights, so that a check can name the path. ``relatives``: the conventional
    names under a model root, tried in order per root; ``kind``: FILE or CHECKPOINT (a folder;
    ``explicit`` may then be ``hf-hub:ORG/NAME``)."""
    repo = hf_repo(explicit)
    if repo is not None:
        if kind != CHECKPOINT:
            raise ValueError(f"{explicit!r} names a repository, not a weights file")
        return hf_snapshot(repo)
    if explicit is not None:
        return Path(explicit).expanduser()
    rels = [relatives] if isinstance(relatives, str) else list(relatives)
    if not rels:
        raise ValueError("no explicit path and no relative name to look up under the model roots")
    candidates = [root / rel for root in model_roots(models_dir) for rel in rels]
    exists = Path.is_dir if kind == CHECKPOINT else Path.is_file
    return next((path for path in candidates if exists(path)), candidates[0])


@dataclass(frozen=True)
class LocalWeights:
    """Weights a model needs on local disk: where, what they are, how a user obtains them.

    ``kind`` FILE: one weights file; CHECKPOINT: a transformers / diffusers folder (config.json,
    weights, every shard of a sharded index)."""

    path: Path
    what: str
    how_to_get: str = ""
    kind: str = FILE

    def problem(self) -> str | None:
        """Why the weights cannot be used as they are on disk now; None when they can."""
        path = Path(self.path)
        if self.kind == FILE:
            return None if path.is_file() else f"{self.what} not found at {path}"
        if not path.is_dir():
            return f"{self.what} directory {path} does not exist"
        if not (path / "config.json").is_file():
            return f"{self.what}: no config.json in {path}"
        if is_config_only():
            return None
        for index in sorted(path.glob("*.index.json")):
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                return (
                    f"{self.what}: {index} lists missing weight files {missing[:3]} "
                    "(incomplete download?)"
                )
        if not any(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)):
            return f"{self.what}: no weights ({', '.join(WEIGHT_PATTERNS)}) in {path}"
        return None

    def require(self) -> Path:
        """The path, or ``MissingWeights`` naming it and how to get the weights."""
        require_all([self])
        return Path(self.path)


def require_all(weights: Iterable[LocalWeights]) -> list[Path]:
    """The paths, or one ``MissingWeights`` listing every problem (each with how to get it)."""
    weights = list(weights)
    problems = []
    for w in weights:
        problem = w.problem()
        if problem is not None:
            problems.append(f"{problem}; {w.how_to_get}" if w.how_to_get else problem)
    if len(problems) == 1 and len(weights) == 1:
        raise MissingWeights(problems[0])
    if problems:
        raise MissingWeights("model weights are missing:\n  - " + "\n  - ".join(problems))
    return [Path(w.path) for w in weights]
