"""Sink: writes one finished block (its samples, its index rows, its thumbnails). Only writes.

Layout under the output folder while a run is under way (``curation.journal`` commits a block
by writing its record after these files; ``curation.pack`` later turns segments into shards)::

    _work/shards/BUCKET/BLOCK-NNNNNN.tar   accepted samples of the block, per bucket (segments)
    _work/index/BLOCK.parquet              every row of the block (sample contract)
    _thumbs/KEY.jpg                        thumbnail of every rejected / error sample (report)
    _thumbs/KEY.target.jpg                 ... and of its target, for an edit pair
    _thumbs/accepted/KIND~BUCKET/KEY.jpg   thumbnails of a bounded sample of accepted samples
                                           (+ KEY.target.jpg), per kind and bucket

Accepted thumbnails are a gallery, not a record: a million-sample run must not write a million
of them. Per kind and bucket the folder keeps the ``ACCEPTED_THUMBS_PER_GROUP`` accepted samples
with the smallest keys (keys are hashes of the input: a fixed sample, whatever the order of the
inputs and of the blocks). Blocks are written in parallel and share no state but the folder:
each block writes only what can still make the cut against what the folder holds, then lists
the folder again and deletes what can no longer make it. A file is only deleted when the
folder holds that many smaller keys, so the smallest keys are never deleted; the last listing
sees every file, so the folder ends with exactly the smallest keys, whatever the timing.

Every file is written under a temporary name and renamed, so a reader never sees half a file;
names are fixed by the block id, so a retried block overwrites its own files. Accepted rows
arrive with their tar members in the working column ``media`` (``stages/encode.py``) and their
``bucket``; the sink sets ``shard``. Write failures (disk full, read-only output) raise
``OutputError`` naming the path and the errno: they stop the run, they are not sample errors.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa

from catalog.index import write_index_part
from catalog.schema import rows_to_table
from catalog.shards import ShardInfo, ShardWriter, sample_json
from core.storage import put_atomic
from curation.stages.base import Row

WORK = "_work"
SEGMENTS = f"{WORK}/shards"
BLOCK_INDEX = f"{WORK}/index"
THUMBS = "_thumbs"
ACCEPTED_THUMBS = f"{THUMBS}/accepted"
TARGET_SUFFIX = ".target"  # KEY.target.jpg: the target side of an edit pair
ACCEPTED_THUMBS_PER_GROUP = 8  # accepted thumbnails kept per (kind, bucket)

# Working columns: they travel between stages and never reach the index.
WORKING_ONLY = (
    "frames",
    "frame_times",
    "target_frames",
    "thumb",
    "target_thumb",
    "input_id",
    "clip_embedding",
    "frames_decoder",
    "media",
)
# Extra (non-contract) index columns with a fixed type, so every block part types them alike.
EXTRA_TYPES = {"edit_change": pa.float64(), "edit_aspect_diff": pa.float64()}


class OutputError(OSError):
    """Writing the output failed (disk full, read-only, permissions): the run cannot go on."""

    def __init__(self, path: str, error: OSError):
        code = error.errno
        name = errno_codes.errorcode.get(code, "?") if code is not None else "?"
        text = error.strerror or str(error)
        super().__init__(code, text)
        self.path = path
        self.message = f"cannot write {path}: [{name}] {text}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # crosses Ray's process boundary intact
        return _rebuild_output_error, (self.path, self.errno, self.strerror)


def _rebuild_output_error(path: str, code: int | None, text: str | None) -> OutputError:
    return OutputError(path, OSError(code, text))


@contextmanager
def writing(where: str) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing under ``where`` into ``OutputError``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(str(getattr(e, "filename", None) or where), e) from None


def write_atomic(fs, path: str, data: bytes) -> None:
    """``data`` to ``path`` whole or not at all (``core.storage.put_atomic``: one put on an
    object store; a temporary name, fsync and rename on a local disk)."""
    with writing(path):
        put_atomic(fs, path, data, path + f".tmp-{os.getpid()}")


@dataclass(frozen=True)
class BlockWritten:
    """What a block left on disk: its index part, its segments and its row counts."""

    index_part: str  # relative to the output root
    segments: list[ShardInfo] = field(default_factory=list)  # ShardInfo.path: relative to root
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index_part": self.index_part,
            "segments": [s.to_dict() for s in self.segments],
            "counts": dict(self.counts),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockWritten:
        return cls(d["index_part"], [ShardInfo(**s) for s in d["segments"]], dict(d["counts"]))


class BlockSink:
    """Writes one block's rows (see the module docstring). Picklable; no state between calls."""

    def __init__(
        self,
        output: str,
        run_id: str | None,
        max_samples: int,
        max_bytes: int,
        accepted_thumbs: int = ACCEPTED_THUMBS_PER_GROUP,
    ):
        self.output = output.rstrip("/")
        self.run_id = run_id
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.accepted_thumbs = accepted_thumbs

    def write(self, block: str, rows: list[Row]) -> BlockWritten:
        rows = sorted(rows, key=lambda r: r["key"])
        fs, root = fsspec.core.url_to_fs(self.output)
        where = f"{self.output}/{SEGMENTS}"
        try:
            self._thumbs(fs, root, rows)
            writer = ShardWriter(
                f"{self.output}/{WORK}",
                prefix=block,
                max_samples=self.max_samples,
                max_bytes=self.max_bytes,
            )
            out = []
            try:
                for row in rows:
                    media = row.get("media")
                    row = {k: v for k, v in row.items() if k not in WORKING_ONLY}
                    row["run_id"] = self.run_id
                    if row.get("status") == "accepted":
                        text = row.get("recaption") or row.get("instruction") or row.get("caption")
                        members = {"json": sample_json(row), "txt": (text or "").encode("utf-8")}
                        members.update(media or {})
                        row["shard"] = f"{WORK}/" + writer.write(row["bucket"], row["key"], members)
                    out.append(row)
                segments = writer.close()
            except BaseException:
                writer.abort()
                raise
            where = f"{self.output}/{BLOCK_INDEX}/{block}.parquet"
            write_index_part(index_table(out), f"{self.output}/{BLOCK_INDEX}", block)
        except OSError as e:
            raise OutputError(getattr(e, "filename", None) or where, e) from e
        counts: dict[str, int] = {}
        for row in out:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        segments = [
            ShardInfo(s.uri, f"{WORK}/{s.path}", s.bucket, s.num_samples, s.num_bytes, s.sha256)
            for s in segments
        ]
        return BlockWritten(f"{BLOCK_INDEX}/{block}.parquet", segments, counts)

    def _thumbs(self, fs, root: str, rows: list[Row]) -> None:
        """Thumbnails the report shows: every rejected / error row's, and a bounded sample of
        the accepted rows' (module docstring)."""
        groups: dict[str, list[Row]] = {}
        others = []
        for r in rows:
            if not r.get("thumb"):
                continue
            if r["status"] == "accepted":
                groups.setdefault(thumb_group(r.get("kind"), r.get("bucket")), []).append(r)
            else:
                others.append(r)
        if others:
            fs.makedirs(f"{root}/{THUMBS}", exist_ok=True)
        for r in others:
            _write_thumbs(fs, f"{root}/{THUMBS}", r)
        for group, members in groups.items():
            self._accepted_thumbs(fs, f"{root}/{ACCEPTED_THUMBS}/{group}", members)

    def _accepted_thumbs(self, fs, folder: str, rows: list[Row]) -> None:
        """Keep the ``accepted_thumbs`` smallest keys of this group in ``folder``."""
        limit = self.accepted_thumbs
        if limit <= 0:
            return
        held = _thumb_keys(fs, folder)
        cut = sorted(held | {r["key"] for r in rows})[:limit]
        wanted = [r for r in rows if r["key"] in set(cut) and r["key"] not in held]
        if not wanted:
            return
        fs.makedirs(folder, exist_ok=True)
        for r in wanted:
            _write_thumbs(fs, folder, r)
        _prune(fs, folder, limit)


def thumb_group(kind: str | None, bucket: str | None) -> str:
    """The folder name of an accepted (kind, bucket) under ``_thumbs/accepted``."""
    name = f"{kind or 'unknown'}~{bucket or 'none'}"
    return re.sub(r"[^A-Za-z0-9_.~-]", "_", name)


def _write_thumbs(fs, folder: str, row: Row) -> None:
    write_atomic(fs, f"{folder}/{row['key']}.jpg", row["thumb"])
    if row.get("target_thumb"):
        write_atomic(fs, f"{folder}/{row['key']}{TARGET_SUFFIX}.jpg", row["target_thumb"])


def _thumb_files(fs, folder: str) -> list[tuple[str, str]]:
    """(key, path) of every finished thumbnail in ``folder`` (temporary files left out)."""
    try:
        paths = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for path in paths:
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".jpg"):
            out.append((name.removesuffix(".jpg").removesuffix(TARGET_SUFFIX), str(path)))
    return out


def _thumb_keys(fs, folder: str) -> set[str]:
    return {key for key, _ in _thumb_files(fs, folder)}


def _prune(fs, folder: str, limit: int) -> None:
    """Delete the thumbnails whose key is not among the ``limit`` smallest in ``folder`` (a
    parallel block may have deleted one already)."""
    files = _thumb_files(fs, folder)
    keep = set(sorted({key for key, _ in files})[:limit])
    for key, path in files:
        if key not in keep:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)


class Thumbnails(Mapping[str, bytes]):
    """The thumbnails a run left under ``OUTPUT/_thumbs`` (for the report): ``KEY`` -> the
    sample's (source) thumbnail, ``KEY.target`` -> an edit pair's target thumbnail. Listed
    once, read when asked for: a large run leaves a thumbnail per reject, and the report shows
    a few per reason, so they are never all in memory. Empty files are not listed."""

    def __init__(self, output: str | os.PathLike):
        self.fs, root = fsspec.core.url_to_fs(f"{str(output).rstrip('/')}/{THUMBS}")
        found = self.fs.find(root, detail=True) if self.fs.isdir(root) else {}
        self.paths = {
            PurePosixPath(p).stem: p
            for p, info in sorted(found.items())
            if p.endswith(".jpg") and info.get("type") == "file" and info.get("size")
        }

    def __getitem__(self, key: str) -> bytes:
        return self.fs.cat_file(self.paths[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def read_thumbnails(output: str | os.PathLike) -> Thumbnails:
    """``Thumbnails`` of the run at ``output`` (read lazily)."""
    return Thumbnails(output)


def index_table(rows: list[Row]) -> pa.Table:
    """Index rows as an Arrow table: the contract columns in schema order, then the extra
    columns sorted by name (one column order whatever mix of kinds a block holds), with the
    known extras typed alike in every block."""
    rows = [{k: v for k, v in r.items() if k not in WORKING_ONLY} for r in rows]
    table = rows_to_table(rows)
    for name, typ in EXTRA_TYPES.items():
        if name in table.column_names and table.schema.field(name).type != typ:
            i = table.column_names.index(name)
            table = table.set_column(i, pa.field(name, typ), table.column(name).cast(typ))
    return table
