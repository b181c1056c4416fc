"""Pack: the committed blocks' segments become the final shards and the final index.

Blocks write small per-bucket segments as they finish (``curation.sink``); once every input is
committed, ``plan_packs`` groups each bucket's segments (sorted by name, so the plan depends only
on what was committed) into shards of at most ``max_samples`` samples and ``max_bytes`` bytes,
``pack_one`` writes one shard (a lone segment is renamed, several are concatenated member by
member), and ``write_final_index`` rewrites the blocks' index parts into a few large Parquet
files whose ``shard`` column names the final shards. Final layout::

    shards/BUCKET/NNNNNN.tar     WebDataset shards (at most max_samples / max_bytes each)
    index/part-NNNNN.parquet     every row (sample contract), at most ``rows_per_part`` rows each
    index/_shards.json           the shards (uri, bucket, samples, bytes, sha256)

Every step can be redone after a crash: a shard counts once its record
``_work/packs/BUCKET/NNNNNN.json`` exists (written after the shard), its segments are removed
only after that, and the index is rewritten whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog.index import write_index_part
from catalog.schema import SAMPLE_SCHEMA
from catalog.shards import ShardInfo, _HashingWriter
from core.storage import is_local_fs, put_atomic, read_many
from curation.journal import BlockRecord
from curation.sink import WORK

PACKS = f"{WORK}/packs"
INDEX_ROWS_PER_PART = 1_000_000
# block parts gathered for a final part are merged every this many: 15,625 block tables of 64
# rows (1M rows, 44 columns) held 1.9 GB; merged every 256, 0.9 GB, and the part is the same
COMPACT_EVERY = 256
# segments fetched from an object store at once (concurrent GETs), by their summed size; a
# larger segment is read as a stream on its own
FETCH_BYTES = 64 << 20


@dataclass(frozen=True)
class PackPlan:
    path: str  # final shard, relative to the output root
    bucket: str
    segments: tuple[ShardInfo, ...]

    @property
    def record(self) -> str:
        return f"{PACKS}/{self.path.removeprefix('shards/').removesuffix('.tar')}.json"


def plan_packs(records: Iterable[BlockRecord], max_samples: int, max_bytes: int) -> list[PackPlan]:
    by_bucket: dict[str, list[ShardInfo]] = {}
    for r in records:
        for s in r.written.segments:
            by_bucket.setdefault(s.bucket, []).append(s)
    plans = []
    for bucket in sorted(by_bucket):
        groups: list[list[ShardInfo]] = [[]]
        samples = size = 0
        for seg in sorted(by_bucket[bucket], key=lambda s: s.path):
            full = samples + seg.num_samples > max_samples or size + seg.num_bytes > max_bytes
            if groups[-1] and full:
                groups.append([])
                samples = size = 0
            groups[-1].append(seg)
            samples += seg.num_samples
            size += seg.num_bytes
        for n, group in enumerate(groups):
            plans.append(PackPlan(f"shards/{bucket}/{n:06d}.tar", bucket, tuple(group)))
    return plans


def pack_one(output: str, plan: PackPlan) -> ShardInfo:
    """Write the shard of ``plan`` (idempotent; see the module docstring)."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    record = f"{root}/{plan.record}"
    if fs.exists(record):
        with fs.open(record, "rb") as f:
            return ShardInfo(**json.loads(f.read()))
    final = f"{root}/{plan.path}"
    fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
    uri = final if is_local_fs(fs) else fs.unstrip_protocol(final)
    segs = plan.segments
    if len(segs) == 1 and is_local_fs(fs):
        seg = segs[0]
        if fs.exists(f"{root}/{seg.path}"):
            fs.mv(f"{root}/{seg.path}", final)
        info = ShardInfo(uri, plan.path, plan.bucket, seg.num_samples, seg.num_bytes, seg.sha256)
    else:
        info = _concatenate(fs, root, plan, uri)
    put_atomic(fs, record, json.dumps(info.to_dict()).encode(), record + ".tmp")
    done = [f"{root}/{seg.path}" for seg in segs]
    if is_local_fs(fs):
        for path in done:
            if fs.exists(path):
                fs.rm(path)
    else:  # one request per 1000 objects (a key already removed is no error)
        fs.rm(done)
    return info


def _concatenate(fs, root: str, plan: PackPlan, uri: str) -> ShardInfo:
    final = f"{root}/{plan.path}"
    # written under _work (removed with it), renamed into shards/ when whole
    tmp = f"{root}/{plan.record.removesuffix('.json')}.tar.tmp"
    fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)
    digest = hashlib.sha256()
    with fs.open(tmp, "wb") as stream:
        writer = _HashingWriter(stream, digest)  # the shard's sha256 and size as written
        with tarfile.open(fileobj=writer, mode="w|") as out:
            for segment in _read_segments(fs, root, plan.segments):
                with segment as f, tarfile.open(fileobj=f, mode="r|") as src:
                    for member in src:
                        out.addfile(member, src.extractfile(member) if member.isfile() else None)
    fs.mv(tmp, final)
    samples = sum(s.num_samples for s in plan.segments)
    return ShardInfo(uri, plan.path, plan.bucket, samples, writer.written, digest.hexdigest())


def _read_segments(fs, root: str, segments: Sequence[ShardInfo]) -> Iterator[BinaryIO]:
    """Each segment as a file to read, in order: opened in turn on a local disk; from an object
    store fetched several at once (``FETCH_BYTES`` together), one larger than that streamed."""
    paths = [f"{root}/{seg.path}" for seg in segments]
    if is_local_fs(fs):
        yield from (fs.open(p, "rb") for p in paths)
        return
    group: list[str] = []
    size = 0
    for path, seg in zip(paths, segments, strict=True):
        if group and size + seg.num_bytes > FETCH_BYTES:  # always so before a larger one
            yield from (io.BytesIO(data) for data in read_many(fs, group))
            group, size = [], 0
        if seg.num_bytes > FETCH_BYTES:
            yield fs.open(path, "rb")
        else:
            group.append(path)
            size += seg.num_bytes
    yield from (io.BytesIO(data) for data in read_many(fs, group))


def write_final_index(
    output: str,
    records: Sequence[BlockRecord],
    shards: dict[str, str],
    rows_per_part: int = INDEX_ROWS_PER_PART,
) -> int:
    """Rewrite the blocks' index parts as ``index/part-NNNNN.parquet`` with ``shard`` mapped
    from segment to final shard (``shards``: segment path -> shard path); returns the rows."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    for old in fs.glob(f"{root}/index/part-*.parquet"):
        fs.rm(old)
    keys = pa.array(list(shards), pa.string())
    values = pa.array(list(shards.values()), pa.string())
    pending: list[pa.Table] = []
    num_rows = parts = held = 0

    def flush() -> None:
        nonlocal parts, pending
        if pending:
            write_index_part(_canonical(pending), f"{output}/index", f"part-{parts:05d}")
            parts += 1
            pending = []

    block_parts = read_many(fs, [f"{root}/{r.written.index_part}" for r in records])
    for r, data in zip(records, block_parts, strict=True):
        table = pq.read_table(pa.BufferReader(data))
        if "shard" in table.column_names:
            col = table.column("shard")
            mapped = pc.take(values, pc.index_in(col, value_set=keys))
            unmapped = pc.and_(col.is_valid(), mapped.is_null())
            if pc.any(unmapped).as_py():
                missing = pc.filter(col, unmapped)[0].as_py()
                raise RuntimeError(f"block {r.block} names a segment no pack holds: {missing}")
            table = table.set_column(table.column_names.index("shard"), "shard", mapped)
        pending.append(table)
        num_rows += table.num_rows
        held += table.num_rows
        if held >= rows_per_part:
            flush()
            held = 0
        elif len(pending) >= COMPACT_EVERY:  # one table, not thousands of tiny ones
            pending = [pa.concat_tables(pending, promote_options="permissive").combine_chunks()]
    flush()
    return num_rows


def _canonical(tables: list[pa.Table]) -> pa.Table:
    """One table from block parts: missing extra columns become null, the contract columns
    first in schema order, then the extras sorted by name."""
    table = pa.concat_tables(tables, promote_options="permissive")
    extras = sorted(n for n in table.column_names if n not in SAMPLE_SCHEMA.names)
    order = [n for n in SAMPLE_SCHEMA.names if n in table.column_names] + extras
    return table.select(order)


def write_shard_list(output: str, shards: Sequence[ShardInfo]) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root.rstrip('/')}/index/_shards.json"
    body = json.dumps([s.to_dict() for s in shards], indent=1).encode()
    put_atomic(fs, path, body, path + ".tmp")
