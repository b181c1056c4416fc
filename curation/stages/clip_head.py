"""What the CLIP-embedding scorers share: the frames they score, one embedding pass, the head.

``ClipHeadStage`` is the base of ``aesthetic`` and ``watermark``: each embeds the scored frames
of a batch (``frames``, plus ``target_frames`` of edit pairs) with the same CLIP model in one
batched pass (chunked by ``ClipEmbedder.max_batch``), or reuses the embeddings the other one
left in the working column ``clip_embedding`` when the key matches (same architecture, weights
and view), and turns them into its score columns with its head (``score``). Either stage can
run first; only the first pays for CLIP. With ``dedup.embedding`` the mean embedding of each
row's frames also goes into the index (``embedding``) for ``curate dedup``.

A batch whose embedding pass fails is embedded row by row, so only the rows that break it
become errors (``<stage>_failed``); a model or head that does not load is a configuration
error and stops the run. On a GPU worker (``device`` is ``cuda``) CLIP runs there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from catalog.schema import EDIT_KINDS
from curation.clip import ClipEmbedder, ClipSpec, share_embeddings, shared_embeddings
from curation.media import as_frames
from curation.weights import memory_estimate_mb

from .base import LocalWeights, Resources, Row, SampleError, Stage, mark_error


def scored_frames(row: Row) -> list[np.ndarray]:
    """The frames a CLIP scorer looks at: ``frames``, plus an edit pair's ``target_frames``."""
    frames = list(row.get("frames") or [])
    if row.get("kind") in EDIT_KINDS:
        frames += list(row.get("target_frames") or [])
    return frames


class FrameBatch:
    """The live rows of a batch with their checked frames and CLIP embeddings.

    ``rows`` is the output list (rows in error pass through; rows whose frames are not RGB
    arrays become errors); ``frames[i]`` are the frames of row ``i`` (only rows that have
    frames); ``embeddings[i]`` their (N, D) embeddings once ``embed`` ran.
    """

    def __init__(self, rows: list[Row], stage: str):
        self.stage = stage
        self.rows = list(rows)
        self.frames: dict[int, list[np.ndarray]] = {}
        self.embeddings: dict[int, np.ndarray] = {}
        for i, row in enumerate(self.rows):
            if row.get("status") == "error":
                continue
            try:
                frames = as_frames(scored_frames(row))
            except ValueError as e:
                self.fail(i, "decode_error", f"{stage}: {e}")
                continue
            if frames:
                self.frames[i] = frames

    def fail(self, i: int, reason: str, detail: str) -> None:
        self.rows[i] = mark_error(self.rows[i], reason, detail)
        self.frames.pop(i, None)
        self.embeddings.pop(i, None)

    def reuse(self, key: str) -> None:
        """Take embeddings another stage left in ``clip_embedding`` with the same key."""
        for i, frames in self.frames.items():
            emb = shared_embeddings(self.rows[i], key)
            if emb is not None and len(emb) == len(frames):
                self.embeddings[i] = emb

    def embed(self, embedder: ClipEmbedder) -> None:
        """Embed every row still missing embeddings: one batched pass; if that fails, row by
        row so that only the rows that break it become errors."""
        todo = [i for i in self.frames if i not in self.embeddings]
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
            self.rows[i] = share_embeddings(self.rows[i], key, emb)

    def store(self) -> None:
        """Each row's ``embedding`` index column: its frames' mean embedding, L2-normalised,
        as float16 (the semantic duplicate signal, ``curation/dedup.py``)."""
        for i, emb in self.embeddings.items():
            mean = np.asarray(emb, dtype=np.float32).mean(axis=0)
            mean /= max(float(np.linalg.norm(mean)), 1e-12)
            self.rows[i] = {**self.rows[i], "embedding": mean.astype(np.float16).tolist()}


class ClipHeadStage(Stage):
    """Base of the CLIP-embedding scorers (see the module docstring)."""

    resources: ClassVar[Resources] = Resources(cpus=0.5, gpus=0.25)  # GPUs only when present
    batch_size: ClassVar[int] = 16
    uses_model: ClassVar[bool] = True
    reads_frames: ClassVar[bool] = True
    head_what: ClassVar[str] = "head"

    def __init__(self, clip: ClipSpec, head_path: Path, batch_size: int):
        self.store_embedding = False  # the index's ``embedding`` column (dedup.embedding)
        self.clip = clip
        self.head_path = head_path
        self.batch_size = batch_size  # type: ignore[misc]  # per-config batch size
        self.embedder = ClipEmbedder(clip)
        self.head: Any = None
        mb = memory_estimate_mb(clip.weights)  # the head is small next to the CLIP model
        self.resources = replace(type(self).resources, memory_mb=mb)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["head"] = None  # loaded in setup() on the worker
        return state

    def head_how(self) -> str:
        raise NotImplementedError

    def load_head(self) -> Any:
        raise NotImplementedError

    def score(self, batch: FrameBatch, i: int) -> dict[str, Any]:
        """The score columns of live row ``i`` (SampleError: this row only fails)."""
        raise NotImplementedError

    def required_files(self) -> list[LocalWeights]:
        head = LocalWeights(self.head_path, self.head_what, self.head_how())
        return [*self.clip.required_files(), head]

    def setup(self) -> None:
        self.embedder.device = self.device
        if self.head is None:
            self.head = self.load_head()

    def process_row(self, row: Row) -> Row:
        return self.process_batch([row])[0]

    def process_batch(self, rows: list[Row]) -> list[Row]:
        if self.head is None:
            self.setup()
        batch = FrameBatch(rows, self.name)
        batch.reuse(self.embedder.key)
        batch.embed(self.embedder)
        batch.share(self.embedder.key)
        if self.store_embedding:
            batch.store()
        for i, row in enumerate(batch.rows):
            if row.get("status") == "error":
                continue
            try:
                columns = self.score(batch, i)
            except SampleError as e:
                batch.fail(i, e.reason, e.detail)
                continue
            batch.rows[i] = {**batch.rows[i], **columns}
        return batch.rows
