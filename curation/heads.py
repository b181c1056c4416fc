"""The heads the curation scorers put on CLIP embeddings: LAION's aesthetic predictor and our
watermark classifier (with ``fit_watermark_head`` to make one). Loading is strict: a file that
is not the expected layout fails with ``WeightsError`` naming it; there is no random fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.weights import LocalWeights, WeightsError
from curation.clip import read_state_dict
from curation.weights import AESTHETIC_HEAD, watermark_head_relative

WATERMARK_HEAD_FORMAT = "omniforge-watermark-head/1"
__all__ = ["AESTHETIC_HEAD", "AestheticHead", "WatermarkHead", "watermark_head_relative"]


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
        path = LocalWeights(Path(path), "aesthetic head").require()
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
        path = LocalWeights(Path(path), "watermark head").require()
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
