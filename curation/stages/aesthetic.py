"""aesthetic: LAION improved-aesthetic-predictor on CLIP image embeddings (1-10 scale).

Each sampled frame is embedded with the configured open_clip model (``aesthetic.clip_model``,
weights from ``aesthetic.clip_weights`` or the models dir, see ``curation.models``), the
L2-normalised embedding goes through the LAION MLP head, and

- image: ``aesthetic`` = the score of its frame;
- video clip: ``aesthetic`` = the **minimum** over its sampled frames (as published video
  curation pipelines do: one ugly stretch is enough to drop a clip);
- edit pairs (``image_edit`` / ``video_edit``): **both sides** are scored, source ``frames``
  and ``target_frames`` together (minimum over all of them: a pair is as good as its worse
  side; the watermark stage takes the maximum the same way).

Scores are clamped to [0, 10] (the head's raw output can step slightly outside 1-10).

All frames of a batch go through CLIP in one forward pass (chunked by
``ClipEmbedder.max_batch``). The per-frame embeddings are left in the working column
``clip_embedding`` (``curation.models.EMBEDDING_COLUMN``: the embedding key, then one float32
vector per frame), which the watermark stage reuses instead of running CLIP again when the key
matches (same architecture, weights and view); the sink drops the column. Either stage reuses
the other's embeddings, so their order does not matter for correctness, only for which one
pays for CLIP.

Weights are required files (``required_files``): the open_clip checkpoint and the LAION head.
Reason tags: ``decode_error`` (a frame is not an RGB array), ``aesthetic_failed``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from curation.config import CurationConfig
from curation.media import as_frames
from curation.models import (
    AESTHETIC_HEAD,
    EMBEDDING_COLUMN,
    AestheticHead,
    ClipEmbedder,
    ClipSpec,
    WeightsError,
    pack_embeddings,
    resolve,
    unpack_embeddings,
)

from .base import RequiredFile, Resources, Row, Stage, mark_error

EDIT_KINDS = ("image_edit", "video_edit")
VIDEO_KINDS = ("video", "video_edit")
SCORE_RANGE = (0.0, 10.0)


def scored_frames(row: Row) -> list[np.ndarray]:
    """The frames a CLIP scorer looks at: ``frames``, plus an edit pair's ``target_frames``."""
    frames = list(row.get("frames") or [])
    if row.get("kind") in EDIT_KINDS:
        frames += list(row.get("target_frames") or [])
    return frames


class FrameBatch:
    """The live rows of a batch with their decoded frames and CLIP embeddings.

    ``rows`` is the output list (rows in error pass through; rows whose frames do not decode
    become errors); ``frames[i]`` are the decoded frames of row ``i`` (only rows that have
    frames); ``embeddings[i]`` their (N, D) embeddings once ``embed`` ran.
    """

    def __init__(self, rows: list[Row], stage: str, decode: bool = True):
        self.stage = stage
        self.rows = list(rows)
        self.data: dict[int, list[np.ndarray]] = {}
        self.frames: dict[int, list[np.ndarray]] = {}
        self.embeddings: dict[int, np.ndarray] = {}
        for i, row in enumerate(self.rows):
            if row.get("status") == "error":
                continue
            data = scored_frames(row)
            if data:
                self.data[i] = data
        if decode:
            self.decode(list(self.data))

    def decode(self, indices: list[int]) -> None:
        for i in indices:
            if i in self.frames or i not in self.data:
                continue
            try:
                self.frames[i] = as_frames(self.data[i])
            except Exception as e:
                self.fail(i, "decode_error", f"{self.stage}: {type(e).__name__}: {e}")

    def fail(self, i: int, reason: str, detail: str) -> None:
        self.rows[i] = mark_error(self.rows[i], reason, detail)
        self.data.pop(i, None)
        self.frames.pop(i, None)
        self.embeddings.pop(i, None)

    def reuse(self, key: str) -> None:
        """Take embeddings another stage left in ``clip_embedding`` with the same key."""
        for i in list(self.data):
            emb = unpack_embeddings(self.rows[i].get(EMBEDDING_COLUMN), key)
            if emb is not None and len(emb) == len(self.data[i]):
                self.embeddings[i] = emb

    def embed(self, embedder: ClipEmbedder) -> None:
        """Embed every row still missing embeddings: one batched pass; if that fails, row by
        row so that only the rows that break it become errors."""
        todo = [i for i in self.data if i not in self.embeddings]
        self.decode(todo)
        todo = [i for i in todo if i in self.frames]
        if not todo:
            return
        embedder.load()  # a model that does not load is a configuration error: raise
        try:
            flat = embedder.embed([f for i in todo for f in self.frames[i]])
        except Exception:
            for i in todo:
                try:
                    self.embeddings[i] = embedder.embed(self.frames[i])
                except Exception as e:
                    self.fail(i, f"{self.stage}_failed", f"CLIP: {type(e).__name__}: {e}")
            return
        at = 0
        for i in todo:
            n = len(self.frames[i])
            self.embeddings[i] = flat[at : at + n]
            at += n

    def share(self, key: str) -> None:
        """Leave the embeddings in the row for the other CLIP scorer."""
        for i, emb in self.embeddings.items():
            self.rows[i] = {**self.rows[i], EMBEDDING_COLUMN: pack_embeddings(key, emb)}


class AestheticStage(Stage):
    """LAION aesthetic score of images / clips / edit targets (see the module docstring)."""

    name: ClassVar[str] = "aesthetic"
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    batch_size: ClassVar[int] = 16
    uses_model: ClassVar[bool] = True

    def __init__(self, cfg: CurationConfig):
        section = cfg.aesthetic
        self.batch_size = section.batch_size  # type: ignore[misc]  # per-config batch size
        self.clip = ClipSpec.resolve(section.clip_model, section.clip_weights, cfg.models_dir)
        self.head_path = resolve(section.head_weights, AESTHETIC_HEAD, cfg.models_dir)
        self.embedder = ClipEmbedder(self.clip)
        self.head: AestheticHead | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["head"] = None  # loaded in setup() on the worker
        return state

    def required_files(self) -> list[RequiredFile]:
        how = (
            "download sac+logos+ava1-l14-linearMSE.pth from "
            "https://github.com/christophschuhmann/improved-aesthetic-predictor (it scores "
            "OpenAI ViT-L/14 embeddings: clip_model ViT-L-14-quickgelu with the openai "
            f"weights) to {self.head_path}, or set aesthetic.head_weights"
        )
        return [
            *self.clip.required_files(),
            RequiredFile(self.head_path, "LAION aesthetic head", how),
        ]

    def setup(self) -> None:
        if self.head is None:
            self.head = AestheticHead.load(self.head_path)
        self.embedder.load()
        dim = self.embedder.dim
        if dim is not None and dim != self.head.input_size:
            raise WeightsError(
                f"aesthetic head {self.head_path} takes {self.head.input_size}-d embeddings but "
                f"open_clip {self.clip.arch} produces {dim}-d ones"
            )

    def process_row(self, row: Row) -> Row:
        return self.process_batch([row])[0]

    def process_batch(self, rows: list[Row]) -> list[Row]:
        if self.head is None:
            self.setup()
        assert self.head is not None
        batch = FrameBatch(rows, self.name, decode=False)
        batch.reuse(self.embedder.key)
        batch.embed(self.embedder)
        batch.share(self.embedder.key)
        for i, row in enumerate(batch.rows):
            if row.get("status") == "error":
                continue
            emb = batch.embeddings.get(i)
            if emb is None:  # no frames to score
                batch.rows[i] = {**row, "aesthetic": None}
                continue
            scores = self.head.score(emb)  # a head / CLIP mismatch raises: configuration error
            if not np.all(np.isfinite(scores)):
                batch.fail(i, f"{self.name}_failed", f"non-finite scores {scores.tolist()}")
                continue
            value = float(np.clip(scores.min(), *SCORE_RANGE))
            batch.rows[i] = {**batch.rows[i], "aesthetic": value}
        return batch.rows
