"""Task loaders: one task's batches, bucket by bucket, for one rank, with exact resume.

A ``TaskLoader`` takes a task's shards (``sources.py`` resolves a recipe's data entries to
them), groups them by training bucket (``buckets.py``: the shard bucket's aspect class, the
stage's frame area and the task's frame count) and reads each bucket through one deterministic
stream per rank (``streams.py``: shard split or sample striding among ranks, epochs in a seeded
shard order). Shard buckets of the other modality (frame class ``f1`` for video tasks, ``f>1``
for image tasks) are dropped by name, unread. Usable counts per shard (samples of the task's
kind, see ``training.tasks``, and allowed key) come from ``counts`` (``build_task_loaders``
takes them from the catalog index; no shard is opened) or from a scan of the shards' tar
headers and JSON members at construction. They are computed from the full shard list, so
``bucket_weights()`` is identical on every rank; a bucket with fewer usable samples than
``world_size`` is excluded from it and ``next_batch`` refuses it.

The held-out split (``holdout.py``): a loader of ``part="train"`` skips the held-out samples of
its kind (``holdout``: the kind's rule), one of ``part="eval"`` reads only them; counts are
the part's. ``build_task_loaders`` takes both from the data entry's split.

A video task with ``vlm_fps`` (VINO) also names the frames its VLM reads
(``TaskBatch.vlm_frames``, ``batch.vlm_frame_indices``): a subset of the decoded frames, fixed
per task, so the stream positions and the resume state are unchanged.

Samples are decoded (``decode.py``) in a small thread pool and text tokenised by the callable
given. Understanding tasks learn a sample's conversation when it has one (LLaVA-style QA data):
a batch holding one is tokenised by ``tokenize.chat`` (captions and conversations together),
which sets ``TaskBatch.loss_mask`` to the assistant's tokens (``training.data.conversation``);
captions remain the text of samples without one.

A sample that fails to decode is skipped, counted in ``skipped`` and reported with a
``SampleDecodeWarning`` naming key and shard; the batch is filled from the next samples.

State (``state_dict``): per bucket stream ``{"epoch", "shard" (position in the epoch's shard
order), "offset" (samples of that shard already consumed), "j" (usable samples seen in the
epoch), "taken" (samples this rank took in the epoch), "data" (fingerprint of the stream's
shards)}`` plus task, rank, world size, seed, part and held-out rule, and the skip count.
Loading it into a loader built on the same data, rank and world size continues with exactly
the batches an uninterrupted loader would have produced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from training.data.batch import TaskBatch, vlm_frame_indices
from training.data.buckets import (
    BucketShape,
    batch_size_for,
    frame_class_of_shard_bucket,
    frames_for,
    shape_for_shard_bucket,
)
from training.data.conversation import render_chat, sample_conversation
from training.data.decode import decode_sample
from training.data.holdout import KindCut
from training.data.samples import RawSample, SampleDecodeWarning, scan_keys
from training.data.sources import DataSource, resolve_data, shard_entry
from training.data.streams import Selection, Stream, StreamShard, plan_stream
from training.tasks import task_spec

__all__ = ["TaskLoader", "build_task_loaders"]

STATE_FORMAT = 1

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


class TaskLoader:
    """Batches of one task for one rank of ``world_size`` (see the module docstring).

    ``shards``: ShardRecord-like objects (``uri``, ``bucket``, ``num_samples``), ``(uri,
    bucket)`` / ``(uri, bucket, num_samples)`` tuples, or plain uris (bucket = parent folder).
    ``counts``: usable samples per shard uri for this task (kind and key filters applied);
    ``None`` scans the shards, ``"records"`` trusts the records' ``num_samples`` (only right
    when every sample of every shard fits the task and no key filter applies).
    ``keys``: allowed sample keys (a catalog filter's result), or ``None`` for all.
    ``holdout``: the task kind's held-out rule (None: no split); ``part``: ``"train"`` skips
    held-out samples, ``"eval"`` reads only them.
    """

    def __init__(
        self,
        task: str,
        shards: Iterable[Any],
        *,
        tokenize: Tokenize,
        geometry: Any,
        frame_area: int,
        token_budget: int,
        max_batch: int | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        vlm_fps: float | None = None,
        vlm_max_frames: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        keys: Iterable[str] | None = None,
        counts: Mapping[str, int] | str | None = None,
        decode_threads: int = 2,
        holdout: KindCut | None = None,
        part: str = "train",
    ):
        spec = task_spec(task)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.task = task
        self.spec = spec
        self.kind = spec.kind
        self.tokenize = tokenize
        self.spatial_factor = int(geometry.spatial_factor)
        self.temporal_factor = int(geometry.temporal_factor)
        self.frame_area = int(frame_area)
        self.token_budget = int(token_budget)
        self.max_batch = max_batch  # the stage's batch_size: a cap on what the budget packs
        self.is_video = spec.group == "video"
        self.num_frames = frames_for(num_frames if self.is_video else 1, self.temporal_factor)
        self.fps = fps
        # the frames a VLM reads of this task's videos (same for every batch; no loader state)
        self.vlm_frames = None
        if vlm_fps is not None and self.is_video:
            if fps is None:
                raise ValueError(f"{task}: vlm_fps needs the task's fps (the rate of its frames)")
            self.vlm_frames = vlm_frame_indices(self.num_frames, fps, vlm_fps, vlm_max_frames)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.keys = None if keys is None else frozenset(keys)
        if part not in ("train", "eval"):
            raise ValueError(f"part {part!r}; allowed: train, eval")
        self.part, self.holdout = part, holdout
        self.selection = Selection(
            task, self.kind, self.keys, self.rank, self.world_size, self.seed, holdout, part
        )
        self.decode_threads = max(1, int(decode_threads))
        self.skipped = 0
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[BucketShape, Stream] = {}
        self.excluded: dict[BucketShape, int] = {}  # buckets with < world_size samples

        # Shard buckets of the other modality (frame class f1 vs f>1) are never read.
        entries = [e for e in sorted({shard_entry(s) for s in shards}) if self._fits(e[1])]
        if counts is None:
            usable = {uri: self._scan(uri) for uri, _, _ in entries}
        elif counts == "records":
            missing = [uri for uri, _, n in entries if n is None]
            if missing:
                raise ValueError(f"counts='records' but shards have no num_samples: {missing[:3]}")
            usable = {uri: n for uri, _, n in entries}
        else:
            usable = {uri: int(counts.get(uri, 0)) for uri, _, _ in entries}

        grouped: dict[BucketShape, list[StreamShard]] = {}
        for uri, bucket, _ in entries:
            if usable[uri] <= 0:
                continue
            shape = shape_for_shard_bucket(
                bucket, self.num_frames, self.frame_area, self.spatial_factor, self.temporal_factor
            )
            grouped.setdefault(shape, []).append(StreamShard(uri, bucket, usable[uri]))
        for shape, group in sorted(grouped.items()):
            group.sort(key=lambda s: s.uri)
            self._add_stream(shape, group)

    def _fits(self, bucket: str) -> bool:
        frames = frame_class_of_shard_bucket(bucket)
        return frames is None or (frames > 1) == self.is_video

    def _scan(self, uri: str) -> int:
        return sum(self.selection.usable(key, kind) for key, kind in scan_keys(uri))

    def _add_stream(self, shape: BucketShape, shards: list[StreamShard]) -> None:
        stream = plan_stream(shape, shards, self.selection)
        if stream is None:
            self.excluded[shape] = sum(s.usable for s in shards)
        else:
            self._streams[shape] = stream

    # -- public API ---------------------------------------------------------------------------

    @property
    def shapes(self) -> list[BucketShape]:
        return sorted(self._streams)

    def bucket_weights(self) -> dict[BucketShape, int]:
        """Usable samples per drawable training bucket (the same on every rank), sorted."""
        return {shape: self._streams[shape].total for shape in self.shapes}

    def num_samples(self) -> int:
        return sum(self.bucket_weights().values())

    def samples_per_epoch(self, shape: BucketShape) -> int:
        """Samples this rank takes from ``shape``'s stream in one epoch."""
        return self._stream(shape).per_epoch

    def stream_mode(self, shape: BucketShape) -> str:
        """``"split"`` (shards divided among ranks) or ``"stride"`` (samples divided)."""
        return self._stream(shape).mode

    def batch_size(self, shape: BucketShape) -> int:
        return batch_size_for(
            shape,
            self.token_budget,
            self.spatial_factor,
            self.temporal_factor,
            self.spec.num_media,
            self.max_batch,
        )

    def next_batch(self, shape: BucketShape, size: int | None = None) -> TaskBatch:
        """The next ``size`` (default: ``batch_size(shape)``) decodable samples of the bucket."""
        stream = self._stream(shape)
        n = int(size) if size is not None else self.batch_size(shape)
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        done: list[tuple[RawSample, tuple]] = []
        failures = 0
        while len(done) < n:
            raws = [stream.next_sample() for _ in range(n - len(done))]
            for raw, result in zip(raws, self._decode_all(raws, shape), strict=True):
                if isinstance(result, BaseException):
                    self.skipped += 1
                    failures += 1
                    warnings.warn(
                        f"{self.task}: skipping sample {raw.key} of shard {raw.shard}: "
                        f"{type(result).__name__}: {result}",
                        SampleDecodeWarning,
                        stacklevel=2,
                    )
                else:
                    done.append((raw, result))
            if failures > stream.per_epoch + n:
                raise RuntimeError(
                    f"{self.task}: bucket {shape} on rank {self.rank}: {failures} samples in a "
                    "row failed to decode (a whole epoch); the data is unusable"
                )
        pixels = torch.stack([r[0] for _, r in done])
        source = torch.stack([r[1] for _, r in done]) if self.spec.edit else None
        texts = [r[2] for _, r in done]
        input_ids, attention_mask, loss_mask, texts = self._tokenize(
            [raw for raw, _ in done], texts
        )
        return TaskBatch(
            task=self.task,
            keys=[raw.key for raw, _ in done],
            pixels=pixels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            source_pixels=source,
            texts=texts,
            vlm_frames=self.vlm_frames,
            loss_mask=loss_mask,
        )

    def _tokenize(self, raws: list[RawSample], texts: list[str]) -> tuple:
        """(ids, mask, loss mask or None, texts): conversations for understanding tasks."""
        chats = [None if self.spec.generation else sample_conversation(r.meta) for r in raws]
        if all(c is None for c in chats):
            return (*self.tokenize(texts), None, texts)
        chat = getattr(self.tokenize, "chat", None)
        if chat is None:
            raise TypeError(
                f"{self.task}: samples with a conversation need a tokenizer with "
                "chat(items) -> (ids, mask, loss_mask) (training.models.text)"
            )
        items = [t if c is None else c for c, t in zip(chats, texts, strict=True)]
        rendered = [t if c is None else render_chat(c) for c, t in zip(chats, texts, strict=True)]
        return (*chat(items), rendered)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "task": self.task,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "part": self.part,
            "holdout": self._holdout_ident,
            "skipped": self.skipped,
            "streams": {str(shape): s.position() for shape, s in sorted(self._streams.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every stream's position; refuses state from other data, rank or world."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r} != {STATE_FORMAT}")
        for name in ("task", "rank", "world_size", "seed", "part", "holdout"):
            mine = self._holdout_ident if name == "holdout" else getattr(self, name)
            if state.get(name, "train" if name == "part" else None) != mine:
                raise ValueError(
                    f"loader state is for {name}={state.get(name)!r}, this loader has "
                    f"{name}={mine!r}; positions would not match"
                )
        streams = state.get("streams", {})
        positions = {}
        for text, pos in streams.items():
            shape = BucketShape.parse(text)
            stream = self._streams.get(shape)
            if stream is None or pos.get("data") != stream.fingerprint:
                raise ValueError(
                    f"{self.task}: loader state for bucket {text} does not match this loader's "
                    "data (shards or counts changed)"
                )
            positions[shape] = pos
        for shape, stream in self._streams.items():
            stream.restore(positions.get(shape, {}))
        self.skipped = int(state.get("skipped", 0))

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> TaskLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    @property
    def _holdout_ident(self) -> str | None:
        return None if self.holdout is None else self.holdout.ident

    def _stream(self, shape: BucketShape) -> Stream:
        stream = self._streams.get(shape)
        if stream is None:
            why = (
                f"it has {self.excluded[shape]} sample(s), fewer than world size {self.world_size}"
                if shape in self.excluded
                else "no data of this task maps to it"
            )
            raise ValueError(
                f"{self.task}: bucket {shape} cannot be drawn ({why}); buckets: "
                f"{', '.join(map(str, self.shapes)) or 'none'}"
            )
        return stream

    def _decode_all(self, raws: list[RawSample], shape: BucketShape) -> list[Any]:
        def run(raw: RawSample) -> Any:
            try:
                return decode_sample(raw, shape, self.is_video, self.fps)
            except Exception as e:  # noqa: BLE001 - any decode failure skips the sample
                return e

        if self.decode_threads <= 1 or len(raws) <= 1:
            return [run(r) for r in raws]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return list(self._pool.map(run, raws))


# -- building a stage's loaders ---------------------------------------------------------------


def build_task_loaders(
    stage: Any,
    data: Mapping[str, Any],
    catalog_or_none: Any,
    rank: int,
    world_size: int,
    seed: int,
    geometry: Any,
    tokenize: Tokenize,
    decode_threads: int = 2,
    sources: Mapping[str, DataSource] | None = None,
    part: str = "train",
) -> dict[str, TaskLoader]:
    """One ``TaskLoader`` per task of ``stage`` (a ``StageConfig``), data resolved once per
    data entry (``data``: the recipe's data section).

    Every rank must see the same data: either resolve on the driver with ``resolve_data`` and
    pass the results as ``sources`` (data name -> DataSource; no rank touches the catalog or
    scans shards), or pin ``@latest`` to a version before the workers start.

    ``part``: ``"train"`` loaders skip each entry's held-out samples, ``"eval"`` loaders read
    only them (an entry without a split: every sample, for both).
    """
    sources = dict(sources or {})
    loaders: dict[str, TaskLoader] = {}
    for task, tc in stage.tasks.items():
        if tc.data not in sources:
            if tc.data not in data:
                raise ValueError(f"task {task} uses data {tc.data!r}, not in {sorted(data)}")
            sources[tc.data] = resolve_data(data[tc.data], catalog_or_none)
        src = sources[tc.data]
        split = src.split
        loaders[task] = TaskLoader(
            task,
            src.shards,
            tokenize=tokenize,
            geometry=geometry,
            frame_area=stage.frame_area,
            token_budget=stage.token_budget,
            max_batch=stage.batch_size,
            num_frames=tc.num_frames,
            fps=tc.fps,
            vlm_fps=tc.vlm_fps,
            vlm_max_frames=tc.vlm_max_frames,
            rank=rank,
            world_size=world_size,
            seed=seed,
            keys=src.keys,
            counts=src.counts_for(task, part),
            decode_threads=decode_threads,
            holdout=None if split is None else split.cut(task_spec(task).kind),
            part=part,
        )
    return loaders
