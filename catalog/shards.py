"""The shard format: WebDataset tars grouped by bucket. Curation writes, training reads.

Each sample is a group of tar members sharing the sample key:
``KEY.json`` (the index row of the sample), the medium (``KEY.jpg|png|webp|mp4``), for edits
``KEY.src.EXT`` and ``KEY.tgt.EXT``, and ``KEY.txt`` (the caption used for training).

A shard is written under a temporary name and renamed when complete; its sha256, size and
sample count are returned for the catalog. Shards roll over at ``max_samples`` or
``max_bytes``. Bucket = pixel-area class x aspect class x frame count (see ``bucket_name``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

# Side lengths of square reference areas: a sample's area class is the nearest (in log area).
AREA_CLASSES = (256, 512, 768, 1024, 1536, 2048)
# Aspect classes w:h, nearest in log ratio.
ASPECT_CLASSES = (
    (1, 3),
    (9, 21),
    (9, 16),
    (2, 3),
    (3, 4),
    (1, 1),
    (4, 3),
    (3, 2),
    (16, 9),
    (21, 9),
    (3, 1),
)


def bucket_name(width: int, height: int, num_frames: int = 1) -> str:
    """``a512_r16x9_f33``: nearest area class, nearest aspect class, frame count class.

    Frame counts are grouped to the next power-of-two-plus-one (1, 9, 17, 33, 65, 129, ...)
    so clips of similar length share a bucket.
    """
    area = math.sqrt(width * height)
    a = min(AREA_CLASSES, key=lambda s: abs(math.log(area / s)))
    r = min(ASPECT_CLASSES, key=lambda wh: abs(math.log((width / height) / (wh[0] / wh[1]))))
    if num_frames <= 1:
        f = 1
    else:
        f = 9
        while f < num_frames:
            f = (f - 1) * 2 + 1
    return f"a{a}_r{r[0]}x{r[1]}_f{f}"


def relative_to_root(root: str | None, uri: str) -> str:
    """A shard uri as the index's ``shard`` column names it (relative to the version root)."""
    if root:
        prefix = root.rstrip("/") + "/"
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return uri


@dataclass(frozen=True)
class ShardInfo:
    uri: str  # full path or fsspec URI of the finished tar
    path: str  # relative to the version root (what the index's ``shard`` column holds)
    bucket: str
    num_samples: int
    num_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(uri: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _TarShard:
    """One WebDataset tar being written under a temporary name."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, rel: str):
        self.fs, self.root, self.rel = fs, root, rel
        self.final = f"{root}/{rel}"
        parent, base = self.final.rsplit("/", 1)
        fs.makedirs(parent, exist_ok=True)
        self.tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
        self.stream = fs.open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        # The stdlib writer (webdataset's TarWriter wraps the same, but importing webdataset
        # imports torch in every curation worker). Members as webdataset writes them, sorted
        # by extension, with fixed metadata so identical input gives byte-identical shards.
        stream = _HashingWriter(self.stream, self.hash)
        self.tar = tarfile.open(fileobj=stream, mode="w|")  # noqa: SIM115 - closed by close/abort
        self.num_samples = 0
        self.num_bytes = 0

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))
        self.num_bytes += sum(512 + (len(v) + 511) // 512 * 512 for v in members.values())
        self.num_samples += 1

    def close(self, bucket: str) -> ShardInfo:
        self.tar.close()
        self.stream.close()
        size = self.fs.size(self.tmp)
        self.fs.mv(self.tmp, self.final)
        uri = self.final if _is_local(self.fs) else self.fs.unstrip_protocol(self.final)
        return ShardInfo(uri, self.rel, bucket, self.num_samples, size, self.hash.hexdigest())

    def abort(self) -> None:
        try:
            self.tar.close()
            self.stream.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


class _HashingWriter(io.RawIOBase):
    """Passes writes through to ``stream`` while hashing them (sha256 without a re-read)."""

    def __init__(self, stream: Any, hasher: Any):
        self.stream, self.hasher = stream, hasher

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.hasher.update(b)
        self.stream.write(b)
        return len(b)


class ShardWriter:
    """Writes samples into ``ROOT/shards/BUCKET/PREFIX-NNNNNN.tar`` with bounded shard size.

    ``prefix`` makes names unique per writer (e.g. a partition id), so parallel writers and
    resumed runs never collide. ``close()`` returns every finished shard.
    """

    def __init__(
        self,
        root: str,
        prefix: str = "part",
        max_samples: int = 1000,
        max_bytes: int = 512 * 2**20,
    ):
        self.fs, path = fsspec.core.url_to_fs(str(root))
        self.root = path.rstrip("/")
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.open: dict[str, _TarShard] = {}
        self.counters: dict[str, int] = {}
        self.finished: list[ShardInfo] = []

    def write(self, bucket: str, key: str, members: Mapping[str, bytes]) -> str:
        """Add one sample; returns the relative path of the shard that holds it."""
        if "/" in key or key.startswith("."):
            raise ValueError(f"sample key {key!r} must not contain '/' or start with '.'")
        size = sum(512 + len(v) for v in members.values())
        shard = self.open.get(bucket)
        if (
            shard is not None
            and shard.num_samples
            and (shard.num_samples >= self.max_samples or shard.num_bytes + size > self.max_bytes)
        ):
            self.finished.append(shard.close(bucket))
            shard = None
        if shard is None:
            n = self.counters.get(bucket, 0)
            self.counters[bucket] = n + 1
            rel = f"shards/{bucket}/{self.prefix}-{n:06d}.tar"
            shard = self.open[bucket] = _TarShard(self.fs, self.root, rel)
        shard.add(key, members)
        return shard.rel

    def close(self) -> list[ShardInfo]:
        for bucket, shard in sorted(self.open.items()):
            self.finished.append(shard.close(bucket))
        self.open.clear()
        return list(self.finished)

    def abort(self) -> None:
        for shard in self.open.values():
            shard.abort()
        self.open.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard(uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a shard, in write order."""
    import webdataset as wds

    with fsspec.open(uri, "rb") as f:
        files = wds.tariterators.tar_file_expander([{"url": uri, "stream": f}])
        for sample in wds.tariterators.group_by_keys(files):
            key = sample.pop("__key__")
            sample.pop("__url__", None)
            yield key, sample


def sample_json(row: Mapping[str, Any]) -> bytes:
    """The ``KEY.json`` member: the index row, JSON-encoded (stable key order)."""
    return json.dumps(dict(row), sort_keys=True, default=str).encode("utf-8")
