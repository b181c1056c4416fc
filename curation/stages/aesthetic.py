"""aesthetic: LAION improved-aesthetic-predictor on CLIP image embeddings (1-10 scale).

Each scored frame is embedded with the configured open_clip model (``aesthetic.clip_model``,
weights from ``aesthetic.clip_weights`` or the models dir, see ``curation.weights`` and
``curation.clip``), the L2-normalised embedding goes through the LAION MLP head
(``curation.heads.AestheticHead``), and

- image: ``aesthetic`` = the score of its frame;
- video clip: ``aesthetic`` = the **minimum** over its sampled frames (as published video
  curation pipelines do: one ugly stretch is enough to drop a clip);
- edit pairs (``image_edit`` / ``video_edit``): **both sides** are scored, source ``frames``
  and ``target_frames`` together (minimum over all of them: a pair is as good as its worse
  side; the watermark stage takes the maximum the same way).

Scores are clamped to [0, 10] (the head's raw output can step slightly outside 1-10). The CLIP
pass and the embedding shared with the watermark stage are ``stages/clip_head.py``'s.

Weights are required files (``required_files``): the open_clip checkpoint and the LAION head.
Reason tags: ``decode_error`` (a frame is not an RGB array), ``aesthetic_failed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from core.weights import WeightsError, resolve_weights
from curation.config import AestheticConfig
from curation.weights import AESTHETIC_HEAD, ClipSpec

from .base import SampleError
from .clip_head import ClipHeadStage, FrameBatch

SCORE_RANGE = (0.0, 10.0)


def clip_spec(section: AestheticConfig, models_dir: Path | str | None) -> ClipSpec:
    """The CLIP model both scorers use: its settings live in the aesthetic section."""
    return ClipSpec.resolve(section.clip_model, section.clip_weights, models_dir)


class AestheticStage(ClipHeadStage):
    """LAION aesthetic score of images / clips / edit pairs (see the module docstring)."""

    name: ClassVar[str] = "aesthetic"
    head_what: ClassVar[str] = "LAION aesthetic head"

    def __init__(
        self,
        cfg: AestheticConfig,
        clip: ClipSpec | None = None,
        models_dir: Path | str | None = None,
    ):
        head = resolve_weights(cfg.head_weights, AESTHETIC_HEAD, models_dir)
        super().__init__(clip or clip_spec(cfg, models_dir), head, cfg.batch_size)

    def head_how(self) -> str:
        return (
            "download sac+logos+ava1-l14-linearMSE.pth from "
            "https://github.com/christophschuhmann/improved-aesthetic-predictor (it scores "
            "OpenAI ViT-L/14 embeddings: clip_model ViT-L-14-quickgelu with the openai "
            f"weights) to {self.head_path}, or set aesthetic.head_weights"
        )

    def load_head(self) -> Any:
        from curation.heads import AestheticHead  # torch: on the worker, not the driver

        head = AestheticHead.load(self.head_path)
        self.embedder.load()
        dim = self.embedder.dim
        if dim is not None and dim != head.input_size:
            raise WeightsError(
                f"aesthetic head {self.head_path} takes {head.input_size}-d embeddings but "
                f"open_clip {self.clip.arch} produces {dim}-d ones"
            )
        return head

    def score(self, batch: FrameBatch, i: int) -> dict[str, Any]:
        emb = batch.embeddings.get(i)
        if emb is None:  # no frames to score
            return {"aesthetic": None}
        scores = self.head.score(emb)  # a head / CLIP mismatch raises: configuration error
        if not np.all(np.isfinite(scores)):
            raise SampleError(f"{self.name}_failed", f"non-finite scores {scores.tolist()}")
        return {"aesthetic": float(np.clip(scores.min(), *SCORE_RANGE))}
