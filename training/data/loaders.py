"""Task loaders: one task's batches, bucket by bucket, for one rank, with exact resume.

Streams. A ``TaskLoader`` groups its shards by training bucket (``buckets.py``: the shard
bucket's aspect class, the stage's frame area and the task's frame count). Each training bucket
has one deterministic stream per rank:

* the bucket's shards are sorted by uri (shards with no usable sample for the task dropped);
* **shard split** when the bucket has at least ``world_size`` such shards: shard ``i`` of the
  sorted list belongs to rank ``i % world_size``, and each rank reads only its shards;
* **sample striding** otherwise: every rank reads all shards of the bucket in the same order
  and keeps usable sample ``j`` (counted from the start of the epoch) when
  ``j % world_size == rank`` (only the small ``KEY.json`` member of other ranks' samples is
  read);
* a bucket with fewer usable samples than ``world_size`` is **excluded**: it is not in
  ``bucket_weights()`` (so rank 0 never draws it) and ``next_batch`` refuses it. Every
  bucket in ``bucket_weights()`` therefore has data on every rank;
* streams repeat forever in epochs; each epoch visits the rank's shards in an order shuffled
  by a generator seeded with (seed, epoch, task, bucket) (the same on every rank); samples
  inside a shard keep their written order.

Usable = the sample's kind is the task's (``training.tasks``; the kind comes from ``KEY.json``, or
from the member names when that is unreadable) and, when ``keys`` is given (a catalog filter),
its key is allowed. Shard buckets of the other modality (frame class ``f1`` for video tasks,
``f>1`` for image tasks) are dropped by name, unread. Usable counts per shard come from
``counts`` (``build_task_loaders`` takes them from the catalog index; no shard is opened) or
from a scan of the shards' tar headers and JSON members at construction. They are computed
from the full shard list, so ``bucket_weights()`` is identical on every rank.

Decoding. Images via PIL (EXIF orientation applied, alpha composited on white), videos via
PyAV from memory; frames are taken from the start of the clip every
``stride = max(1, round(src_fps / task_fps))`` source frames (stride 1 when the task has no
fps), looping the clip (frame ``k * stride mod n``) when it is too short. Each frame is resized
to cover the bucket and centre-cropped, RGB, float32 in [-1, 1], layout (B, T, C, H, W). Edit
samples give ``source_pixels`` (``src.*``) and ``pixels`` (``tgt.*``). Text is the ``txt``
member (understanding tasks: the answer; generation: the condition), tokenised by the callable
given. A sample that fails to decode is skipped, counted in ``skipped`` and reported with a
``SampleDecodeWarning`` naming key and shard; the batch is filled from the next samples.

State (``state_dict``): per bucket stream ``{"epoch", "shard" (position in the epoch's shard
order), "offset" (samples of that shard already consumed), "j" (usable samples seen in the
epoch), "taken" (samples this rank took in the epoch), "data" (fingerprint of the stream's
shards)}`` plus task, rank, world size, seed and the skip count. Loading it into a loader built
on the same data, rank and world size continues with exactly the batches an uninterrupted
loader would have produced.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import json
import math
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

from catalog.schema import EDIT_KINDS
from catalog.shards import ShardReader, ShardReadError, relative_to_root
from training.data.batch import TaskBatch
from training.data.buckets import (
    BucketShape,
    batch_size_for,
    frames_for,
    shape_for_shard_bucket,
)
from training.tasks import TASKS, task_spec

__all__ = [
    "DataSource",
    "SampleDecodeWarning",
    "TaskLoader",
    "build_task_loaders",
    "resolve_data",
    "scan_shard",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov")
STATE_FORMAT = 1

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


class SampleDecodeWarning(RuntimeWarning):
    """A sample could not be decoded and was skipped."""


# -- reading shards ---------------------------------------------------------------------------


def _warn_unreadable(error: ShardReadError) -> None:
    warnings.warn(str(error), SampleDecodeWarning, stacklevel=2)


def _open_shard(uri: str) -> ShardReader:
    """A reader whose unreadable shard does not raise: a ``SampleDecodeWarning`` names it and
    the shard ends there (a partly read sample is dropped)."""
    return ShardReader(uri, handler=_warn_unreadable)


def _kind_from_members(exts: Iterable[str]) -> str | None:
    exts = set(exts)
    src = [e for e in exts if e.startswith("src.")]
    if src and any(e.startswith("tgt.") for e in exts):
        return "video_edit" if src[0][4:] in VIDEO_EXTS else "image_edit"
    if exts & set(VIDEO_EXTS):
        return "video"
    if exts & set(IMAGE_EXTS):
        return "image"
    return None


def _meta_and_kind(reader: ShardReader, members: Mapping[str, tarfile.TarInfo]) -> tuple:
    """(index row or {}, kind or None) from the JSON member, falling back to member names."""
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(reader.read(members["json"]))
            if not isinstance(meta, dict):
                meta = {}
        except (ValueError, UnicodeDecodeError, OSError, tarfile.TarError):
            meta = {}
    kind = meta.get("kind") or _kind_from_members(members)
    return meta, kind


def scan_shard(uri: str, keys: Iterable[str] | None = None) -> Counter:
    """Samples per kind in one shard (tar headers + JSON members; media is not read).

    With ``keys``, only samples whose key is in ``keys`` count.
    """
    allowed = None if keys is None else (keys if isinstance(keys, (set, frozenset)) else set(keys))
    counts: Counter = Counter()
    reader = _open_shard(uri)
    try:
        while (group := reader.next()) is not None:
            key, members = group
            if allowed is not None and key not in allowed:
                continue
            _, kind = _meta_and_kind(reader, members)
            counts[kind] += 1
    finally:
        reader.close()
    return counts


# -- decoding ---------------------------------------------------------------------------------


def _to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """List of (H, W, 3) uint8 -> (T, 3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    return arr.to(torch.float32).div_(127.5).sub_(1.0)


def _cover_size(w: int, h: int, shape: BucketShape) -> tuple[int, int]:
    scale = max(shape.width / w, shape.height / h)
    return max(shape.width, math.ceil(w * scale - 1e-6)), max(
        shape.height, math.ceil(h * scale - 1e-6)
    )


def _center_crop(arr: np.ndarray, shape: BucketShape) -> np.ndarray:
    top = (arr.shape[0] - shape.height) // 2
    left = (arr.shape[1] - shape.width) // 2
    return arr[top : top + shape.height, left : left + shape.width]


def decode_image(data: bytes, shape: BucketShape) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8: EXIF-oriented, RGB, resized to cover, centre-cropped."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":  # decode at a reduced scale when much larger than needed
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
            cw, ch = _cover_size(w, h, shape)
            im.draft("RGB", (ch, cw) if (w, h) != im.size else (cw, ch))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
        elif im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grayscale PNG
            gray = np.asarray(im, dtype=np.float32) / 257.0
            im = Image.fromarray(np.clip(gray + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
        elif im.mode != "RGB":
            im = im.convert("RGB")
        size = _cover_size(im.width, im.height, shape)
        if size != im.size:
            im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return _center_crop(np.asarray(im, dtype=np.uint8), shape)


def _collect_frames(container: Any, wanted: set[int], shape: BucketShape) -> tuple[dict, int, bool]:
    """Decode from the start; frames with index in ``wanted`` -> ({index: (H, W, 3) uint8},
    frames decoded, whether the clip ended before the last wanted frame)."""
    out: dict[int, np.ndarray] = {}
    last = max(wanted)
    n = 0
    size = None
    for frame in container.decode(container.streams.video[0]):
        if n in wanted:
            if size is None:
                size = _cover_size(frame.width, frame.height, shape)
            rgb = frame.to_ndarray(
                width=size[0], height=size[1], format="rgb24", interpolation="BICUBIC"
            )
            out[n] = np.ascontiguousarray(_center_crop(rgb, shape))
        n += 1
        if n > last:
            return out, n, False
    return out, n, True


def decode_video(
    data: bytes, shape: BucketShape, fps: float | None, meta_fps: float | None = None
) -> np.ndarray:
    """Video bytes -> (T, H, W, 3) uint8 sampled at ``fps`` from the start, looped if short.

    ``stride = max(1, round(src_fps / fps))`` source frames (1 without ``fps``); frame ``k`` of
    the result is source frame ``k * stride``, or ``k * stride mod n`` for a clip of ``n < (T -
    1) * stride + 1`` frames. ``src_fps`` is the stream's average rate (else ``meta_fps``).
    """
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        src_fps = float(rate) if rate else float(meta_fps or 0.0)
        stride = max(1, round(src_fps / fps)) if fps and src_fps > 0 else 1
        indices = [k * stride for k in range(shape.frames)]
        frames, n, ended = _collect_frames(container, set(indices), shape)
    if n == 0:
        raise ValueError("video has no decodable frames")
    if ended and n <= indices[-1]:  # too short: loop the clip
        indices = [i % n for i in indices]
        missing = set(indices) - set(frames)
        if missing:
            with av.open(io.BytesIO(data)) as container:
                more, _, _ = _collect_frames(container, missing, shape)
            frames.update(more)
    return np.stack([frames[i] for i in indices])


# -- streams ----------------------------------------------------------------------------------


@dataclass
class _Shard:
    uri: str
    bucket: str
    usable: int


@dataclass
class _Raw:
    key: str
    shard: str
    meta: dict[str, Any]
    members: dict[str, bytes]
    error: str | None = None  # reading the members failed


@dataclass
class _Stream:
    """One training bucket's sample stream for this rank, with an explicit cursor."""

    shape: BucketShape
    shards: list[_Shard]  # the bucket's usable shards, sorted by uri (all ranks)
    mode: str  # "split" | "stride"
    mine: list[int]  # indices into ``shards`` this rank reads
    per_epoch: int  # samples this rank takes per epoch
    fingerprint: str
    epoch: int = 0
    shard: int = 0  # position in the epoch's order
    offset: int = 0  # sample groups of that shard consumed
    j: int = 0  # usable samples seen in this epoch (stride assignment)
    taken: int = 0  # samples this rank took in this epoch
    _order: tuple[int, list[int]] | None = field(default=None, repr=False)
    _reader: ShardReader | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return sum(s.usable for s in self.shards)

    def position(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "offset": self.offset,
            "j": self.j,
            "taken": self.taken,
            "data": self.fingerprint,
        }

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _shard_entry(item: Any) -> tuple[str, str, int | None]:
    """(uri, shard bucket, num_samples or None) from a record, tuple or plain uri."""
    if isinstance(item, str):
        return item, _parent_name(item), None
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return str(item[0]), str(item[1]), None
        if len(item) == 3:
            return str(item[0]), str(item[1]), int(item[2])
        raise ValueError(f"shard tuple must be (uri, bucket[, num_samples]), got {item!r}")
    uri = getattr(item, "uri", None)
    if uri is None:
        raise TypeError(f"shard entry {item!r} has no uri")
    bucket = getattr(item, "bucket", None) or _parent_name(uri)
    n = getattr(item, "num_samples", None)
    return str(uri), str(bucket), None if n is None else int(n)


_FRAME_CLASS = re.compile(r"(?:^|_)f(\d+)(?:_|$)")


def _parent_name(uri: str) -> str:
    parts = uri.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else ""


class TaskLoader:
    """Batches of one task for one rank of ``world_size`` (see the module docstring).

    ``shards``: ShardRecord-like objects (``uri``, ``bucket``, ``num_samples``), ``(uri,
    bucket)`` / ``(uri, bucket, num_samples)`` tuples, or plain uris (bucket = parent folder).
    ``counts``: usable samples per shard uri for this task (kind and key filters applied);
    ``None`` scans the shards, ``"records"`` trusts the records' ``num_samples`` (only right
    when every sample of every shard fits the task and no key filter applies).
    ``keys``: allowed sample keys (a catalog filter's result), or ``None`` for all.
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
        num_frames: int | None = None,
        fps: float | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        keys: Iterable[str] | None = None,
        counts: Mapping[str, int] | str | None = None,
        decode_threads: int = 2,
    ):
        spec = task_spec(task)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.task = task
        self.kind = spec.kind
        self.media = spec.num_media
        self.tokenize = tokenize
        self.spatial_factor = int(geometry.spatial_factor)
        self.temporal_factor = int(geometry.temporal_factor)
        self.frame_area = int(frame_area)
        self.token_budget = int(token_budget)
        self.is_video = spec.group == "video"
        self.num_frames = frames_for(num_frames if self.is_video else 1, self.temporal_factor)
        self.fps = fps
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.keys = None if keys is None else frozenset(keys)
        self.decode_threads = max(1, int(decode_threads))
        self.skipped = 0
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[BucketShape, _Stream] = {}
        self.excluded: dict[BucketShape, int] = {}  # buckets with < world_size samples

        # Shard buckets of the other modality (frame class f1 vs f>1) are never read.
        entries = [e for e in sorted({_shard_entry(s) for s in shards}) if self._fits(e[1])]
        if counts is None:
            usable = {uri: self._scan(uri) for uri, _, _ in entries}
        elif counts == "records":
            missing = [uri for uri, _, n in entries if n is None]
            if missing:
                raise ValueError(f"counts='records' but shards have no num_samples: {missing[:3]}")
            usable = {uri: n for uri, _, n in entries}
        else:
            usable = {uri: int(counts.get(uri, 0)) for uri, _, _ in entries}

        grouped: dict[BucketShape, list[_Shard]] = {}
        for uri, bucket, _ in entries:
            if usable[uri] <= 0:
                continue
            shape = shape_for_shard_bucket(
                bucket, self.num_frames, self.frame_area, self.spatial_factor, self.temporal_factor
            )
            grouped.setdefault(shape, []).append(_Shard(uri, bucket, usable[uri]))
        for shape, group in sorted(grouped.items()):
            group.sort(key=lambda s: s.uri)
            self._add_stream(shape, group)

    def _fits(self, bucket: str) -> bool:
        m = _FRAME_CLASS.search(bucket)
        return m is None or (int(m.group(1)) > 1) == self.is_video

    def _scan(self, uri: str) -> int:
        found = scan_shard(uri, self.keys)
        return found.get(self.kind, 0)

    def _add_stream(self, shape: BucketShape, shards: list[_Shard]) -> None:
        ws, r = self.world_size, self.rank
        total = sum(s.usable for s in shards)
        if len(shards) >= ws:
            mode, mine = "split", [i for i in range(len(shards)) if i % ws == r]
            per_epoch = sum(shards[i].usable for i in mine)
        elif total >= ws:
            mode, mine = "stride", list(range(len(shards)))
            per_epoch = len(range(r, total, ws))
        else:
            self.excluded[shape] = total
            return
        h = hashlib.sha1(f"{mode}|{ws}".encode())
        for s in shards:
            h.update(f"|{s.uri}:{s.usable}".encode())
        self._streams[shape] = _Stream(shape, shards, mode, mine, per_epoch, h.hexdigest()[:16])

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
            shape, self.token_budget, self.spatial_factor, self.temporal_factor, self.media
        )

    def next_batch(self, shape: BucketShape, size: int | None = None) -> TaskBatch:
        """The next ``size`` (default: ``batch_size(shape)``) decodable samples of the bucket."""
        stream = self._stream(shape)
        n = int(size) if size is not None else self.batch_size(shape)
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        done: list[tuple[_Raw, tuple]] = []
        failures = 0
        while len(done) < n:
            raws = [self._next_raw(stream) for _ in range(n - len(done))]
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
        source = torch.stack([r[1] for _, r in done]) if self.media == 2 else None
        texts = [r[2] for _, r in done]
        input_ids, attention_mask = self.tokenize(texts)
        return TaskBatch(
            task=self.task,
            keys=[raw.key for raw, _ in done],
            pixels=pixels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            source_pixels=source,
            texts=texts,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "task": self.task,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "skipped": self.skipped,
            "streams": {str(shape): s.position() for shape, s in sorted(self._streams.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every stream's position; refuses state from other data, rank or world."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r} != {STATE_FORMAT}")
        for name in ("task", "rank", "world_size", "seed"):
            if state.get(name) != getattr(self, name):
                raise ValueError(
                    f"loader state is for {name}={state.get(name)!r}, this loader has "
                    f"{name}={getattr(self, name)!r}; positions would not match"
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
            pos = positions.get(shape, {})
            stream.close()
            stream._order = None
            stream.epoch = int(pos.get("epoch", 0))
            stream.shard = int(pos.get("shard", 0))
            stream.offset = int(pos.get("offset", 0))
            stream.j = int(pos.get("j", 0))
            stream.taken = int(pos.get("taken", 0))
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

    def _stream(self, shape: BucketShape) -> _Stream:
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

    def _epoch_order(self, stream: _Stream) -> list[int]:
        if stream._order is None or stream._order[0] != stream.epoch:
            s = stream.shape
            task_id = TASKS.index(self.task)
            seed = [self.seed % 2**63, stream.epoch, task_id, s.frames, s.height, s.width]
            perm = np.random.default_rng(seed).permutation(len(stream.mine))
            stream._order = (stream.epoch, [stream.mine[i] for i in perm])
        return stream._order[1]

    def _usable(self, key: str, kind: str | None) -> bool:
        return kind == self.kind and (self.keys is None or key in self.keys)

    def _next_raw(self, stream: _Stream) -> _Raw:
        """Advance the cursor to the next sample this rank takes; read its members."""
        while True:
            order = self._epoch_order(stream)
            if stream.shard >= len(order):
                if stream.taken == 0:
                    raise RuntimeError(
                        f"{self.task}: bucket {stream.shape} gave rank {self.rank} no sample in "
                        "a whole epoch (shard contents disagree with the counts)"
                    )
                stream.close()
                stream.epoch += 1
                stream.shard = stream.offset = stream.j = stream.taken = 0
                continue
            shard = stream.shards[order[stream.shard]]
            reader = stream._reader
            if reader is None or reader.uri != shard.uri or reader.ordinal != stream.offset:
                stream.close()
                reader = stream._reader = _open_shard(shard.uri)
                reader.skip(stream.offset)
            group = reader.next()
            if group is None:
                stream.close()
                stream.shard += 1
                stream.offset = 0
                continue
            stream.offset += 1
            key, members = group
            if self.keys is not None and key not in self.keys:
                continue
            meta, kind = _meta_and_kind(reader, members)
            if not self._usable(key, kind):
                continue
            j = stream.j
            stream.j += 1
            if stream.mode == "stride" and j % self.world_size != self.rank:
                continue
            stream.taken += 1
            try:
                data = {ext: reader.read(info) for ext, info in members.items() if ext != "json"}
            except (OSError, EOFError, tarfile.TarError) as e:
                return _Raw(key, shard.uri, meta, {}, error=f"{type(e).__name__}: {e}")
            return _Raw(key, shard.uri, meta, data)

    def _decode_all(self, raws: list[_Raw], shape: BucketShape) -> list[Any]:
        def run(raw: _Raw) -> Any:
            try:
                return self._decode(raw, shape)
            except Exception as e:  # noqa: BLE001 - any decode failure skips the sample
                return e

        if self.decode_threads <= 1 or len(raws) <= 1:
            return [run(r) for r in raws]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return list(self._pool.map(run, raws))

    def _decode(self, raw: _Raw, shape: BucketShape) -> tuple:
        if raw.error is not None:
            raise OSError(raw.error)
        members = raw.members
        kind = raw.meta.get("kind") or _kind_from_members(members)
        if kind in EDIT_KINDS:
            src = self._medium(members, "src.", raw, shape)
            tgt = self._medium(members, "tgt.", raw, shape)
        else:
            tgt, src = self._medium(members, "", raw, shape), None
        return tgt, src, self._text(raw)

    def _medium(self, members: dict[str, bytes], prefix: str, raw: _Raw, shape: BucketShape):
        for ext in VIDEO_EXTS:
            if prefix + ext in members:
                if not self.is_video:
                    raise ValueError(f"member {prefix + ext} is a video, task {self.task} is not")
                meta_fps = raw.meta.get("fps")
                return _to_tensor(
                    list(decode_video(members[prefix + ext], shape, self.fps, meta_fps))
                )
        for ext in IMAGE_EXTS:
            if prefix + ext in members:
                frame = decode_image(members[prefix + ext], shape)
                return _to_tensor([frame] * shape.frames)
        raise ValueError(f"no {prefix or 'medium '}member among {sorted(members)}")

    @staticmethod
    def _text(raw: _Raw) -> str:
        if "txt" in raw.members:
            return raw.members["txt"].decode("utf-8", errors="replace").strip()
        meta = raw.meta
        return str(meta.get("recaption") or meta.get("instruction") or meta.get("caption") or "")


# -- building a stage's loaders ---------------------------------------------------------------


@dataclass
class DataSource:
    """Shards of one recipe data entry, with usable counts per shard and kind."""

    uri: str  # as resolved: catalog://NAME@N (concrete version) or the path / glob
    shards: list[tuple[str, str]]  # (uri, shard bucket), sorted
    kind_counts: dict[str, Counter]  # shard uri -> {kind: samples}
    keys: frozenset[str] | None = None  # allowed keys (catalog filter), None = all

    def counts_for(self, task: str) -> dict[str, int]:
        kind = task_spec(task).kind
        return {u: c.get(kind, 0) for u, c in self.kind_counts.items()}


def _glob_shards(uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(uri)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if _glob.has_magic(path):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(".tar")]
    else:
        found = [path]
    found = [p for p in found if p.endswith(".tar") and not p.rsplit("/", 1)[-1].startswith(".")]
    if not found:
        raise FileNotFoundError(f"no shards (*.tar) match {uri!r}")
    return sorted(p if local else fs.unstrip_protocol(p) for p in found)


def resolve_data(data: Any, catalog: Any = None) -> DataSource:
    """A recipe ``DataConfig`` -> its shards and per-shard kind counts.

    ``catalog://NAME@VERSION`` (+ filter) goes through ``Catalog.resolve`` and the version's
    index (no shard is opened); paths / globs / directories are globbed with fsspec (a
    directory means every ``*.tar`` below it; the shard bucket is the parent folder name) and
    scanned.
    """
    from catalog.names import is_catalog_uri

    uri, filt = data.uri, getattr(data, "filter", None)
    if not is_catalog_uri(uri):
        uris = _glob_shards(uri)
        return DataSource(
            uri, [(u, _parent_name(u)) for u in uris], {u: scan_shard(u) for u in uris}
        )

    import pyarrow as pa
    import pyarrow.compute as pc

    from catalog.index import open_index
    from catalog.store import Catalog

    cat = catalog if catalog is not None else Catalog()
    try:
        res = cat.resolve(uri, filt)
    finally:
        if catalog is None:
            cat.close()
    table = open_index(res.version.index_uri).to_table(
        columns=["key", "kind", "shard"], filter=pc.field("status") == "accepted"
    )
    keys = frozenset(res.keys) if filt else None
    if keys is not None:
        allowed = pa.array(sorted(keys), type=table.column("key").type)
        table = table.filter(pc.is_in(table.column("key"), value_set=allowed))
    by_rel: dict[str, Counter] = {}
    for rel, kind in zip(
        table.column("shard").to_pylist(), table.column("kind").to_pylist(), strict=True
    ):
        if rel is not None:
            by_rel.setdefault(rel, Counter())[kind] += 1
    root = res.version.root_uri
    kind_counts = {
        sh.uri: by_rel.get(relative_to_root(root, sh.uri), Counter()) for sh in res.shards
    }
    shards = sorted((sh.uri, sh.bucket) for sh in res.shards)
    return DataSource(res.version.ref, shards, kind_counts, keys)


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
) -> dict[str, TaskLoader]:
    """One ``TaskLoader`` per task of ``stage`` (a ``StageConfig``), data resolved once per
    data entry (``data``: the recipe's data section).

    Every rank must see the same data: either resolve on the driver with ``resolve_data`` and
    pass the results as ``sources`` (data name -> DataSource; no rank touches the catalog or
    scans shards), or pin ``@latest`` to a version before the workers start.
    """
    sources = dict(sources or {})
    loaders: dict[str, TaskLoader] = {}
    for task, tc in stage.tasks.items():
        if tc.data not in sources:
            if tc.data not in data:
                raise ValueError(f"task {task} uses data {tc.data!r}, not in {sorted(data)}")
            sources[tc.data] = resolve_data(data[tc.data], catalog_or_none)
        src = sources[tc.data]
        loaders[task] = TaskLoader(
            task,
            src.shards,
            tokenize=tokenize,
            geometry=geometry,
            frame_area=stage.frame_area,
            token_budget=stage.token_budget,
            num_frames=tc.num_frames,
            fps=tc.fps,
            rank=rank,
            world_size=world_size,
            seed=seed,
            keys=src.keys,
            counts=src.counts_for(task),
            decode_threads=decode_threads,
        )
    return loaders
