"""The sink writes one block: segments of accepted samples, the index part, thumbnails."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.schema import SAMPLE_SCHEMA, validate_table
from catalog.shards import iter_shard
from curation.sink import (
    TARGET_SUFFIX,
    THUMBS,
    WORKING_ONLY,
    BlockSink,
    OutputError,
    index_table,
    read_thumbnails,
    thumb_group,
)


def row(key: str, status: str, **extra) -> dict:
    r = {"key": key, "kind": "image", "source_uri": f"/d/{key}.png", "status": status}
    r["reasons"] = [] if status == "accepted" else ["low_aesthetic: 3 < 5"]
    r.update(width=64, height=64, num_frames=1)
    r.update(extra)
    return r


def test_index_columns_come_out_in_one_order_whatever_the_rows_hold():
    # dict order differs between blocks (a retry re-batches rows, kinds mix differently):
    # the old first-appearance order made Ray's concat fail ("Schema at index 1 was different")
    a = [{"zeta": 1.0, "edit_change": 0.5, **row("a", "accepted")}, row("b", "rejected")]
    b = [{**row("c", "accepted"), "edit_change": None, "zeta": 2.0}]
    ta, tb = index_table(a), index_table(b)
    assert ta.schema == tb.schema
    contract = [n for n in ta.column_names if n in SAMPLE_SCHEMA.names]
    assert contract == SAMPLE_SCHEMA.names and ta.column_names[-2:] == ["edit_change", "zeta"]
    assert pa.concat_tables([ta, tb]).num_rows == 3  # no promotion needed


def test_a_block_is_written_as_segments_an_index_part_and_thumbnails(tmp_path):
    rows = [
        {
            **row("k2", "accepted"),
            "bucket": "a256_r1x1_f1",
            "media": {"png": b"P2"},
            "caption": "c",
        },
        {**row("k1", "accepted"), "bucket": "a256_r1x1_f1", "media": {"png": b"P1"}},
        {**row("k3", "rejected"), "thumb": b"JPEG", "frames": ["not written"]},
    ]
    written = BlockSink(str(tmp_path), "run-7", 100, 2**20).write("b00", rows)
    assert written.counts == {"accepted": 2, "rejected": 1}
    (seg,) = written.segments
    assert seg.path == "_work/shards/a256_r1x1_f1/b00-000000.tar" and seg.num_samples == 2
    members = dict(iter_shard(str(tmp_path / seg.path)))
    assert sorted(members) == ["k1", "k2"] and members["k2"]["png"] == b"P2"
    assert members["k2"]["txt"] == b"c"
    index = pq.read_table(tmp_path / written.index_part)
    assert validate_table(index) == []
    assert not set(WORKING_ONLY) & set(index.column_names)
    by_key = {r["key"]: r for r in index.to_pylist()}
    assert by_key["k1"]["shard"] == seg.path and by_key["k3"]["shard"] is None
    assert {r["run_id"] for r in by_key.values()} == {"run-7"}
    assert (tmp_path / "_thumbs" / "k3.jpg").read_bytes() == b"JPEG"


def test_a_write_error_names_the_path_and_errno_and_crosses_processes():
    err = OutputError("/out/_work/shards/x.tar", OSError(28, "No space left on device"))
    assert str(err) == "cannot write /out/_work/shards/x.tar: [ENOSPC] No space left on device"
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, OutputError) and str(back) == str(err) and back.errno == 28


# ------------------------------------------------------------------------------- thumbnails


def _accepted(key: str, kind: str = "image", bucket: str = "a256_r1x1_f1", **extra) -> dict:
    r = {**row(key, "accepted"), "kind": kind, "bucket": bucket, "media": {"png": b"P"}}
    r["thumb"] = f"T{key}".encode()
    r.update(extra)
    return r


def _files(root) -> dict[str, bytes]:
    base = root / THUMBS
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def _blocks(n_blocks: int = 6, per_block: int = 5) -> list[list[dict]]:
    """Accepted image rows in two buckets and accepted edit pairs (with a target thumbnail),
    spread over blocks in no key order, plus one rejected edit pair per block."""
    keys = [f"{(i * 7919) % 1000:03d}{i:03d}" for i in range(n_blocks * per_block)]
    blocks = []
    for b in range(n_blocks):
        rows = []
        for k in keys[b * per_block : (b + 1) * per_block]:
            if int(k) % 3 == 0:
                edit = {"target_uri": f"/d/{k}_t.png", "target_thumb": f"U{k}".encode()}
                rows.append(_accepted(k, "image_edit", "a512_r4x3_f1", **edit))
            else:
                rows.append(_accepted(k, bucket="a256_r1x1_f1" if int(k) % 2 else "a512_r1x1_f1"))
        rows.append(
            {
                **row(f"r{b}", "rejected", kind="image_edit", target_uri=f"/d/r{b}_t.png"),
                "thumb": b"S",
                "target_thumb": b"U",
            }
        )
        blocks.append(rows)
    return blocks


def _expected(blocks: list[list[dict]], limit: int) -> set[str]:
    groups: dict[str, list[dict]] = {}
    for r in (r for block in blocks for r in block if r["status"] == "accepted"):
        groups.setdefault(thumb_group(r["kind"], r["bucket"]), []).append(r)
    out = set()
    for group, rows in groups.items():
        for r in sorted(rows, key=lambda r: r["key"])[:limit]:
            out.add(f"accepted/{group}/{r['key']}.jpg")
            if r.get("target_thumb"):
                out.add(f"accepted/{group}/{r['key']}{TARGET_SUFFIX}.jpg")
    return out


def test_accepted_thumbnails_are_the_smallest_keys_per_kind_and_bucket_whatever_the_order(
    tmp_path,
):
    blocks, limit = _blocks(), 3
    expected = _expected(blocks, limit)
    rejected = {f"r{b}.jpg" for b in range(len(blocks))}
    rejected |= {f"r{b}{TARGET_SUFFIX}.jpg" for b in range(len(blocks))}
    results = []
    for order in (blocks, blocks[::-1], blocks[2:] + blocks[:2]):
        out = tmp_path / f"out{len(results)}"
        sink = BlockSink(str(out), "run", 100, 2**20, accepted_thumbs=limit)
        for i, block in enumerate(order):
            sink.write(f"b{i:02d}", block)
        files = _files(out)
        results.append(files)
        # every rejected / error row keeps its thumbnails (edit pairs: both sides), flat
        assert {n for n in files if not n.startswith("accepted/")} == rejected
        assert {n for n in files if n.startswith("accepted/")} == expected
        assert all(not n.split("/")[-1].count(".tmp") for n in files)  # no temporary files
    assert results[0] == results[1] == results[2]
    # three groups (two image buckets, one edit bucket), at most `limit` keys each
    groups = {n.split("/")[1] for n in expected}
    assert groups == {"image~a256_r1x1_f1", "image~a512_r1x1_f1", "image_edit~a512_r4x3_f1"}
    thumbs = read_thumbnails(tmp_path / "out0")
    edit_key = min(
        r["key"]
        for block in blocks
        for r in block
        if r["kind"] == "image_edit" and r["status"] == "accepted"
    )
    assert thumbs[edit_key] == f"T{edit_key}".encode()
    assert thumbs[f"{edit_key}{TARGET_SUFFIX}"] == f"U{edit_key}".encode()
    assert thumbs["r0"] == b"S" and thumbs[f"r0{TARGET_SUFFIX}"] == b"U"


def test_blocks_written_in_parallel_keep_exactly_the_smallest_keys(tmp_path):
    # every block lists the folder after its own writes, so the last listing sees every file
    # and the folder ends with exactly the smallest keys, however the blocks interleave
    blocks, limit = _blocks(n_blocks=12, per_block=6), 2
    sink = BlockSink(str(tmp_path), "run", 100, 2**20, accepted_thumbs=limit)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda ib: sink.write(f"b{ib[0]:02d}", ib[1]), enumerate(blocks)))
    files = _files(tmp_path)
    assert {n for n in files if n.startswith("accepted/")} == _expected(blocks, limit)


def test_no_accepted_thumbnails_when_the_bound_is_zero(tmp_path):
    BlockSink(str(tmp_path), "run", 100, 2**20, accepted_thumbs=0).write("b", _blocks(1)[0])
    assert not [n for n in _files(tmp_path) if n.startswith("accepted/")]
