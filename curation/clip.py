"""CLIP image embeddings for the curation scorers: which model, from which file, how frames
become embeddings.

``curation.weights.ClipSpec`` says which open_clip architecture embeds frames and where its
weights are; this module loads them (``load_clip``) and embeds frames (``ClipEmbedder``).

Embedding view: a frame is embedded whole, **squashed** to the model's square input (open_clip
``resize_mode="squash"``), not centre-cropped: logos and watermarks sit in corners and along
edges that a centre crop throws away (16:9 frames lose 44 % of their width). The LAION head
was fitted on centre crops; on the whole frame its scores shift somewhat for very wide or tall
frames. Both scorers use the same view so the embedding is computed once: the first scorer
leaves it in the working column ``EMBEDDING_COLUMN`` (``share_embeddings``), the other reads it
back when its key matches (``shared_embeddings``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a model is read or run: not by the driver
    import torch
    from torch import nn

from core.weights import WeightsError, require_all
from curation.weights import VIEW, ClipSpec

# Working column shared by the aesthetic and watermark stages: {"key": ClipSpec.key,
# "emb": (N, D) float32 L2-normalised embeddings, one per scored frame}. The sink drops it
# (``curation.sink.WORKING_ONLY``); it never reaches the index.
EMBEDDING_COLUMN = "clip_embedding"


def import_open_clip():
    """open_clip, importable next to a CPU torch (see core.compat)."""
    import importlib

    import core.compat  # noqa: F401  (patches torchvision's C-op registration if needed)

    # import_module, not an import statement: isort must not hoist open_clip above compat
    return importlib.import_module("open_clip")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch file loaded with ``weights_only``
    (never unpickling code). Unreadable files raise ``WeightsError`` naming the file."""
    import torch

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
    import torch

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
    require_all(spec.required_files())
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
            import torch

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, self.preprocess = load_clip(self.spec.arch, self.spec, device)
            self.visual = model.visual
            self.device = device
            self.dim = int(getattr(model.visual, "output_dim", 0)) or None
        return self

    def embed(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32, one L2-normalised embedding per (H, W, 3) uint8 RGB frame."""
        import torch
        from PIL import Image
        from torch import nn

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


def share_embeddings(row: dict[str, Any], key: str, emb: np.ndarray) -> dict[str, Any]:
    """``row`` with its frames' embeddings left for the other CLIP scorer."""
    return {**row, EMBEDDING_COLUMN: {"key": key, "emb": emb}}


def shared_embeddings(row: dict[str, Any], key: str) -> np.ndarray | None:
    """The (N, D) embeddings another scorer left in ``row`` with ``key``; None when there are
    none or they were made by another model / view."""
    value = row.get(EMBEDDING_COLUMN)
    if not isinstance(value, dict) or value.get("key") != key:
        return None
    return value.get("emb")
