"""The shard format: WebDataset tars grouped by bucket. Curation writes (``ShardWriter``),
training and the tools read (``ShardReader``, ``iter_shard``).

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
import re
import tarfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from core import storage  # noqa: F401 - its object-store settings apply to every fsspec client
from core.storage import is_local_fs

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
    """One WebDataset tar being written: under a temporary name on a local disk, renamed when
    whole; on an object store under its own name (the object appears whole when the upload
    completes: a rename there is a copy, and a tar only counts once a record names it)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, rel: str):
        self.fs, self.root, self.rel = fs, root, rel
        self.final = f"{root}/{rel}"
        parent, base = self.final.rsplit("/", 1)
        self.tmp = self.final
        if is_local_fs(fs):
            fs.makedirs(parent, exist_ok=True)
            self.tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
        self.stream = fs.open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        # The stdlib writer (webdataset's TarWriter wraps the same, but importing webdataset
        # imports torch in every curation worker). Members as webdataset writes them, sorted
        # by extension, with fixed metadata so identical input gives byte-identical shards.
        self.writer = stream = _HashingWriter(self.stream, self.hash)
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
        size = self.writer.written
        if self.tmp != self.final:
            self.fs.mv(self.tmp, self.final)
        uri = self.final if is_local_fs(self.fs) else self.fs.unstrip_protocol(self.final)
        return ShardInfo(uri, self.rel, bucket, self.num_samples, size, self.hash.hexdigest())

    def abort(self) -> None:
        try:
            self.tar.close()
            self.stream.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


class _HashingWriter(io.RawIOBase):
    """Passes writes through to ``stream`` while hashing and counting them (sha256 and size
    without a re-read)."""

    def __init__(self, stream: Any, hasher: Any):
        self.stream, self.hasher = stream, hasher
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.hasher.update(b)
        self.stream.write(b)
        n = memoryview(b).nbytes
        self.written += n
        return n


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


# -- reading ---------------------------------------------------------------------------------

# WebDataset's rule: the key is the member path up to the first dot of its base name, the rest
# (lowercased) the extension; ``__name__`` members are tar-level metadata, not samples.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
_READ_ERRORS = (OSError, EOFError, tarfile.TarError)


class ShardReadError(OSError):
    """A shard that cannot be read: missing, not a tar, truncated, corrupt. Names the shard."""

    def __init__(self, message: str, uri: str):
        super().__init__(message)
        self.uri = uri

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.uri)


class ShardReader:
    """The samples of one shard in write order, as ``(key, {ext: TarInfo})``; member data is
    read only on request (``read``), so a caller that needs ``KEY.json`` skips the media.

    A sample is a run of consecutive members with one key (WebDataset's grouping); a key that
    repeats an extension within its run is corruption. The tar must be uncompressed and
    seekable (``read`` seeks back to a member). A shard that cannot be read to its end (not
    there, not a tar, cut short, no end-of-archive block) raises ``ShardReadError`` naming it
    and the samples read before; with ``handler`` (webdataset's ``handler=`` policy) the error
    is passed to it instead and the shard ends there. A partly read sample is never returned.
    """

    def __init__(self, uri: str, handler: Callable[[ShardReadError], None] | None = None):
        self.uri = uri
        self.handler = handler
        self.ordinal = 0  # samples returned so far
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None
        self._pending: tarfile.TarInfo | None = None
        self._ended = False
        try:
            self._file = fsspec.open(uri, "rb").open()
            self._tar = tarfile.open(fileobj=self._file, mode="r:")  # noqa: SIM115 - kept open
        except _READ_ERRORS as e:
            self._fail(f"{type(e).__name__}: {e}", e)

    def next(self) -> tuple[str, dict[str, tarfile.TarInfo]] | None:
        """The next sample's key and members, or None at the end of the shard."""
        if self._tar is None or self._ended:
            return None
        key: str | None = None
        members: dict[str, tarfile.TarInfo] = {}
        try:
            while True:
                info = self._pending if self._pending is not None else self._tar.next()
                self._pending = None
                if info is None:
                    self._check_end()
                    self._ended = True
                    break
                m = _KEY_EXT.match(info.name)
                if not info.isfile() or not m or _META.match(info.name):
                    continue
                k, ext = m.group(1), m.group(2).lower()
                if key is None:
                    key = k
                elif k != key:
                    self._pending = info
                    break
                if ext in members:
                    raise tarfile.ReadError(f"member {info.name} repeats extension {ext!r}")
                members[ext] = info
        except _READ_ERRORS as e:
            self._fail(f"{type(e).__name__}: {e}", e)
            return None
        # The tar keeps every header it has seen; a shard is read once, to its end.
        self._tar.members.clear()
        if key is None:
            return None
        self.ordinal += 1
        return key, members

    def __iter__(self) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
        while (sample := self.next()) is not None:
            yield sample

    def skip(self, n: int) -> None:
        for _ in range(n):
            if self.next() is None:
                return

    def read(self, info: tarfile.TarInfo) -> bytes:
        """One member's bytes (of the sample just returned, or an earlier one)."""
        if self._tar is None:
            raise ShardReadError(f"shard {self.uri} is closed", self.uri)
        try:
            f = self._tar.extractfile(info)
            data = b"" if f is None else f.read()
        except _READ_ERRORS as e:
            raise ShardReadError(
                f"shard {self.uri}: member {info.name}: {type(e).__name__}: {e}", self.uri
            ) from e
        if len(data) != info.size:
            raise ShardReadError(
                f"shard {self.uri}: member {info.name}: {len(data)} of {info.size} bytes "
                "(truncated)",
                self.uri,
            )
        return data

    def close(self) -> None:
        tar, file = self._tar, self._file
        self._tar = self._file = None
        try:
            if tar is not None:
                tar.close()
        finally:
            if file is not None:
                file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_end(self) -> None:
        # tarfile ends quietly at a cut header or a cut between members; a whole tar ends with
        # a zero block where the next header would be.
        assert self._tar is not None
        self._file.seek(self._tar.offset)
        block = self._file.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE or any(block):
            raise tarfile.ReadError(
                f"no end-of-archive block at byte {self._tar.offset} (cut short or corrupt)"
            )

    def _fail(self, reason: str, cause: BaseException) -> None:
        error = ShardReadError(
            f"shard {self.uri} is unreadable after {self.ordinal} samples: {reason}", self.uri
        )
        self.close()
        if self.handler is None:
            raise error from cause
        self.handler(error)


def iter_shard(uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a shard, in write order (see ``ShardReader``);
    raises ``ShardReadError`` where the shard cannot be read to its end."""
    with ShardReader(uri) as reader:
        for key, members in reader:
            yield key, {ext: reader.read(info) for ext, info in members.items()}


def sample_json(row: Mapping[str, Any]) -> bytes:
    """The ``KEY.json`` member: the index row, JSON-encoded (stable key order)."""
    return json.dumps(dict(row), sort_keys=True, default=str).encode("utf-8")
