"""Model weights of the curation scorers: where they are looked up, how they load, the heads.

Nothing here downloads anything. Weights are local files; a missing file is reported at
pipeline start-up (``RequiredFile`` -> ``check_required`` -> ``MissingWeights``) with the path
that was expected and how to obtain it, and a file that does not match its architecture fails
loudly when loaded. There is no random-initialisation fallback anywhere.

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
                                            (``WatermarkHead``)

CLIP weights can also come from a local Hugging Face hub cache: ``clip_weights:
hf-hub:ORG/NAME`` reads ``open_clip_config.json`` and the weights
(``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``) of the repository's
``main`` snapshot under ``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``, ``~/.cache/huggingface/
hub``). Only files already in the cache are used: no Hugging Face API is called, so nothing
can reach the network (the same as ``HF_HUB_OFFLINE=1``). The architecture then comes from
that config; ``clip_model`` still names it (watermark head file, embedding key).

Embedding view: a frame is embedded whole, **squashed** to the model's square input (open_clip
``resize_mode="squash"``), not centre-cropped: logos and watermarks sit in corners and along
edges that a centre crop throws away (16:9 frames lose 44 % of their width). The LAION head
was fitted on centre crops; on the whole frame its scores shift somewhat for very wide or tall
frames. Both scorers use the same view so the embedding is computed once (``EMBEDDING_COLUMN``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from curation.stages.base import MissingWeights, RequiredFile

MODELS_ENV = "OMNIFORGE_MODELS"
DEFAULT_MODELS_DIR = Path("~/.cache/omniforge/models")
CLIP_SUFFIXES = (".safetensors", ".pt", ".bin")
AESTHETIC_HEAD = "aesthetic/sac+logos+ava1-l14-linearMSE.pth"
HF_PREFIX = "hf-hub:"
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG_FILE = "open_clip_config.json"
VIEW = "squash"  # how a frame becomes the model's square input (see the module docstring)

# Working column shared by the aesthetic and watermark stages: element 0 is the embedding key
# (``ClipSpec.key``, UTF-8), then one little-endian float32 L2-normalised embedding per scored
# frame. The sink drops it (``curation.sink.WORKING_ONLY``), it never reaches the index.
EMBEDDING_COLUMN = "clip_embedding"

WATERMARK_HEAD_FORMAT = "omniforge-watermark-head/1"

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


class WeightsError(RuntimeError):
    """A weights file exists but cannot be used (corrupt, wrong format or architecture)."""


# ------------------------------------------------------------------------------ lookup


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


def clip_relatives(arch: str) -> list[str]:
    return [f"open_clip/{arch}{suffix}" for suffix in CLIP_SUFFIXES]


def watermark_head_relative(arch: str) -> str:
    return f"watermark/{arch}-watermark-head.safetensors"


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
            snapshot = _hf_snapshot(repo)
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


# ----------------------------------------------------------------------- state dicts


def import_open_clip():
    """open_clip, importable next to a CPU torch (see catalog.compat)."""
    import importlib

    import catalog.compat  # noqa: F401  (patches torchvision's C-op registration if needed)

    # import_module, not an import statement: isort must not hoist open_clip above compat
    return importlib.import_module("open_clip")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch file loaded with ``weights_only``
    (never unpickling code). Unreadable files raise ``WeightsError`` naming the file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{path} does not hold a state dict (name -> tensor)")
    return state


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of a checkpoint's tensors without loading it whole (None: unknown)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as e:
            raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # legacy (non-zip) torch file or unreadable: open_clip's loader reports it
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return None
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k.removeprefix("module."): s for k, s in shapes.items()}


# ---------------------------------------------------------------------------- CLIP


def load_clip(
    arch: str, weights: Path | str | ClipSpec, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """open_clip model ``arch`` with the weights of a local file, and its preprocessing
    (PIL image -> tensor, whole frame squashed to the input size).

    Fails with ``MissingWeights`` when the file is absent and ``WeightsError`` when it cannot be
    read or does not match ``arch``: open_clip loads strictly (missing / unexpected keys and
    shape mismatches raise) except that it silently interpolates position embeddings of a
    checkpoint made for another input size; that case is refused here as well.
    """
    spec = weights if isinstance(weights, ClipSpec) else ClipSpec(arch, Path(weights))
    for req in spec.required_files():
        if not Path(req.path).is_file():
            raise MissingWeights(f"{req.what} not found at {req.path} ({req.how_to_get})")
    open_clip = import_open_clip()
    if spec.hf_repo:
        name, pretrained = f"local-dir:{spec.weights.parent}", None
    else:
        if arch not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip architecture {arch!r} (open_clip.list_models() lists them)"
            )
        name, pretrained = arch, str(spec.weights)
    shapes = _tensor_shapes(spec.weights)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained,
            device=device,
            image_resize_mode=VIEW,
            require_pretrained=True,
        )
    except Exception as e:
        raise WeightsError(
            f"cannot load {spec.weights} as open_clip {arch}: {type(e).__name__}: {e}"
        ) from e
    if shapes:
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        bad = [f"{k} {shapes[k]} != {own[k]}" for k in own if k in shapes and shapes[k] != own[k]]
        if bad:
            raise WeightsError(
                f"{spec.weights} does not match open_clip {arch} (checkpoint made for another "
                f"configuration, e.g. input size): {'; '.join(bad[:5])}"
            )
    model.eval().requires_grad_(False)
    return model, preprocess


class ClipEmbedder:
    """The image tower of a CLIP model: RGB frames -> L2-normalised embeddings, batched.

    Built cheaply (picklable); ``load()`` reads the weights. Only the image tower is kept.
    """

    def __init__(self, spec: ClipSpec, device: str | None = None, max_batch: int = 32):
        self.spec = spec
        self.device = device
        self.max_batch = max_batch
        self.visual: nn.Module | None = None
        self.preprocess: Any = None
        self.dim: int | None = None

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def loaded(self) -> bool:
        return self.visual is not None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(visual=None, preprocess=None, dim=None)  # ship the spec, not the model
        return state

    def load(self) -> ClipEmbedder:
        if self.visual is None:
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, self.preprocess = load_clip(self.spec.arch, self.spec, device)
            self.visual = model.visual
            self.device = device
            self.dim = int(getattr(model.visual, "output_dim", 0)) or None
        return self

    def embed(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32, one L2-normalised embedding per (H, W, 3) uint8 RGB frame."""
        from PIL import Image

        self.load()
        assert self.visual is not None
        out = []
        for start in range(0, len(frames), self.max_batch):
            chunk = frames[start : start + self.max_batch]
            x = torch.stack([self.preprocess(Image.fromarray(f)) for f in chunk])
            with torch.inference_mode():
                emb = self.visual(x.to(self.device))
            out.append(nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim or 0), np.float32)
        emb = np.concatenate(out).astype(np.float32)
        self.dim = emb.shape[1]
        return emb


def pack_embeddings(key: str, emb: np.ndarray) -> list[bytes]:
    """``EMBEDDING_COLUMN`` value: the key, then one float32 vector per frame."""
    return [key.encode()] + [np.ascontiguousarray(e, "<f4").tobytes() for e in emb]


def unpack_embeddings(value: Any, key: str) -> np.ndarray | None:
    """The (N, D) embeddings of an ``EMBEDDING_COLUMN`` value made with ``key``; None when the
    value is absent, empty or was computed by another model / view."""
    if not value or len(value) < 2 or bytes(value[0]) != key.encode():
        return None
    return np.stack([np.frombuffer(bytes(v), "<f4") for v in value[1:]])


# --------------------------------------------------------------------------- heads


def _check_keys(path: Path, state: dict[str, torch.Tensor], expected: set[str], what: str):
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{path} is not a {what}: missing keys {missing}, unexpected keys {unexpected}"
        )


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``), exactly its
    state-dict layout: ``layers`` = Linear(D, 1024), Dropout(0.2), Linear(1024, 128),
    Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1). The input is an
    L2-normalised CLIP image embedding; the output is a score on a ~1-10 scale. ``D`` is read
    from the state dict (768 for the published file)."""

    KEYS = frozenset(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)

    @classmethod
    def load(cls, path: Path | str) -> AestheticHead:
        path = Path(path)
        if not path.is_file():
            raise MissingWeights(f"aesthetic head not found at {path}")
        state = read_state_dict(path)
        _check_keys(path, state, set(cls.KEYS), "LAION aesthetic head (layers.{0,2,4,6,7})")
        w0 = state["layers.0.weight"]
        if w0.ndim != 2:
            raise WeightsError(f"{path}: layers.0.weight has shape {tuple(w0.shape)}")
        head = cls(int(w0.shape[1]))
        try:
            head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as e:
            raise WeightsError(f"{path} does not fit the LAION aesthetic head: {e}") from e
        if not all(torch.isfinite(p).all() for p in head.parameters()):
            raise WeightsError(f"{path} holds non-finite values")
        return head.eval().requires_grad_(False)

    def score(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) L2-normalised embeddings -> (N,) scores (unclamped)."""
        _check_dim(emb, self.input_size, "aesthetic head")
        with torch.inference_mode():
            return self(torch.from_numpy(np.asarray(emb, np.float32)))[:, 0].numpy()


class WatermarkHead(nn.Module):
    """Our watermark classifier: a linear layer on the L2-normalised CLIP image embedding,
    ``P(watermark) = softmax(linear(e))[1]`` (class 1 = watermarked, 0 = clean).

    File format (safetensors): ``linear.weight`` float32 (2, D), ``linear.bias`` float32 (2,);
    metadata ``format`` = ``omniforge-watermark-head/1`` and ``clip_model`` = the open_clip
    architecture whose embeddings it was fitted on (checked when the stage starts). Make one
    with ``fit_watermark_head`` on embeddings of labelled frames (``ClipEmbedder.embed``).
    """

    KEYS = frozenset({"linear.weight", "linear.bias"})

    def __init__(self, input_size: int, clip_model: str | None = None):
        super().__init__()
        self.input_size = input_size
        self.clip_model = clip_model
        self.linear = nn.Linear(input_size, 2)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb)

    def probability(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) L2-normalised embeddings -> (N,) watermark probabilities."""
        _check_dim(emb, self.input_size, "watermark head")
        with torch.inference_mode():
            logits = self(torch.from_numpy(np.asarray(emb, np.float32)))
            return torch.softmax(logits, dim=-1)[:, 1].numpy()

    def save(self, path: Path | str) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": WATERMARK_HEAD_FORMAT, "input_size": str(self.input_size)}
        if self.clip_model:
            meta["clip_model"] = self.clip_model
        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path | str) -> WatermarkHead:
        path = Path(path)
        if not path.is_file():
            raise MissingWeights(f"watermark head not found at {path}")
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: a watermark head is a .safetensors file")
        state = read_state_dict(path)
        _check_keys(path, state, set(cls.KEYS), "watermark head (linear.weight, linear.bias)")
        meta = _safetensors_metadata(path)
        if meta.get("format", WATERMARK_HEAD_FORMAT) != WATERMARK_HEAD_FORMAT:
            raise WeightsError(f"{path}: unknown watermark head format {meta['format']!r}")
        w, b = state["linear.weight"], state["linear.bias"]
        if w.ndim != 2 or w.shape[0] != 2 or tuple(b.shape) != (2,):
            raise WeightsError(
                f"{path}: expected linear.weight (2, D) and linear.bias (2,), got "
                f"{tuple(w.shape)} and {tuple(b.shape)}"
            )
        head = cls(int(w.shape[1]), meta.get("clip_model"))
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        if not all(torch.isfinite(p).all() for p in head.parameters()):
            raise WeightsError(f"{path} holds non-finite values")
        return head.eval().requires_grad_(False)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _check_dim(emb: np.ndarray, expected: int, what: str) -> None:
    if emb.ndim != 2 or emb.shape[1] != expected:
        raise ValueError(
            f"{what} takes {expected}-d embeddings, got shape {tuple(emb.shape)} "
            "(head and CLIP model do not belong together)"
        )


def fit_watermark_head(
    embeddings: np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    clip_model: str | None = None,
    *,
    steps: int = 500,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> WatermarkHead:
    """Logistic regression (2-way softmax) on L2-normalised embeddings, classes balanced.

    Features are standardised while fitting and the standardisation is folded into the saved
    linear layer, so the head takes raw normalised embeddings. Deterministic for a seed.
    """
    x = torch.from_numpy(np.asarray(embeddings, np.float32))
    y = torch.as_tensor(np.asarray(labels, bool).astype(np.int64))
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"embeddings {tuple(x.shape)} and {len(y)} labels do not match")
    counts = torch.bincount(y, minlength=2).float()
    if (counts == 0).any():
        raise ValueError("fit_watermark_head needs both watermarked and clean examples")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    inner = nn.Linear(x.shape[1], 2)
    with torch.no_grad():
        inner.weight.copy_(torch.randn(inner.weight.shape, generator=gen) * 0.01)
        inner.bias.zero_()
    opt = torch.optim.Adam(inner.parameters(), lr=lr, weight_decay=weight_decay)
    weight = counts.sum() / (2 * counts)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(inner(z), y, weight=weight)
        loss.backward()
        opt.step()
    head = WatermarkHead(x.shape[1], clip_model)
    with torch.no_grad():
        head.linear.weight.copy_(inner.weight / std)
        head.linear.bias.copy_(inner.bias - (inner.weight / std) @ mean)
    return head.eval().requires_grad_(False)
