"""Pack: block segments become shards of a bounded size, and the final index names them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from catalog.index import read_index
from catalog.schema import rows_to_table
from catalog.shards import ShardWriter, iter_shard, sha256_file
from curation.journal import BlockRecord
from curation.pack import pack_one, plan_packs, write_final_index
from curation.sink import BlockWritten


def block(root, name: str, keys: list[str], bucket: str = "a256_r1x1_f1") -> BlockRecord:
    writer = ShardWriter(str(root / "_work"), prefix=name)
    rows = []
    for k in keys:
        rel = "_work/" + writer.write(bucket, k, {"png": k.encode() * 100, "txt": b"t"})
        rows.append(
            {
                "key": k,
                "kind": "image",
                "source_uri": k,
                "status": "accepted",
                "reasons": [],
                "shard": rel,
                "bucket": bucket,
            }
        )
    rows.append(
        {
            "key": f"{name}-x",
            "kind": "image",
            "source_uri": "x",
            "status": "error",
            "reasons": ["decode_error"],
        }
    )
    segs = [replace(s, path=f"_work/{s.path}") for s in writer.close()]
    part = f"_work/index/{name}.parquet"
    (root / "_work/index").mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows), root / part)
    return BlockRecord(name, keys, BlockWritten(part, segs, {}))


def test_segments_are_grouped_per_bucket_up_to_the_limits(tmp_path):
    recs = [block(tmp_path, f"b{i}", [f"k{i}{j}" for j in range(3)]) for i in range(4)]
    recs.append(block(tmp_path, "c0", ["z0"], bucket="a512_r1x1_f1"))
    plans = plan_packs(recs, max_samples=7, max_bytes=2**30)
    assert [(p.path, len(p.segments)) for p in plans] == [
        ("shards/a256_r1x1_f1/000000.tar", 2),  # 3 + 3 samples; a third segment would be 9
        ("shards/a256_r1x1_f1/000001.tar", 2),
        ("shards/a512_r1x1_f1/000000.tar", 1),
    ]
    assert plan_packs(list(reversed(recs)), 7, 2**30) == plans  # depends on what, not when
    by_bytes = plan_packs(recs, max_samples=1000, max_bytes=recs[0].written.segments[0].num_bytes)
    assert len(by_bytes) == 5


def test_packing_concatenates_renames_and_can_be_redone(tmp_path):
    recs = [block(tmp_path, f"b{i}", [f"k{i}{j}" for j in range(2)]) for i in range(2)]
    recs.append(block(tmp_path, "c0", ["z0"], bucket="a512_r1x1_f1"))
    plans = plan_packs(recs, 100, 2**30)
    shards = [pack_one(str(tmp_path), p) for p in plans]
    first, lone = shards
    assert first.num_samples == 4 and sha256_file(first.uri) == first.sha256
    assert Path(first.uri).stat().st_size == first.num_bytes  # counted as written
    assert [k for k, _ in iter_shard(first.uri)] == ["k00", "k01", "k10", "k11"]
    assert lone.sha256 == recs[2].written.segments[0].sha256  # a lone segment is only renamed
    assert not list((tmp_path / "_work/shards").rglob("*.tar"))  # segments gone once packed
    assert [pack_one(str(tmp_path), p) for p in plans] == shards  # redone: the same answer

    mapping = {s.path: p.path for p in plans for s in p.segments}
    assert write_final_index(str(tmp_path), recs, mapping, rows_per_part=4) == 8
    assert sorted(p.name for p in (tmp_path / "index").glob("part-*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    index = {r["key"]: r for r in read_index(str(tmp_path / "index")).to_pylist()}
    assert index["k10"]["shard"] == "shards/a256_r1x1_f1/000000.tar"
    assert index["z0"]["shard"] == "shards/a512_r1x1_f1/000000.tar"
    assert index["b0-x"]["shard"] is None and len(index) == 8


def test_merging_block_parts_on_the_way_writes_the_same_index(tmp_path, monkeypatch):
    """Block parts are merged every ``COMPACT_EVERY`` as they are gathered (memory): the
    final index is the same, extra columns that only some blocks have included."""
    import curation.pack

    recs = [block(tmp_path, f"b{i}", [f"k{i}{j}" for j in range(2)]) for i in range(5)]
    extra = tmp_path / recs[3].written.index_part
    table = pq.read_table(extra)
    pq.write_table(table.append_column("note", [[f"n{i}" for i in range(table.num_rows)]]), extra)

    mapping = {s.path: f"shards/{r.block}.tar" for r in recs for s in r.written.segments}

    def final_index(rows_per_part: int) -> list:
        write_final_index(str(tmp_path), recs, mapping, rows_per_part=rows_per_part)
        parts = sorted((tmp_path / "index").glob("part-*.parquet"))
        return [pq.read_table(p) for p in parts]

    whole = final_index(rows_per_part=100)
    monkeypatch.setattr(curation.pack, "COMPACT_EVERY", 2)
    merged = final_index(rows_per_part=100)
    assert len(whole) == len(merged) == 1 and merged[0].equals(whole[0])
    assert merged[0].column("note").null_count == 15 - 3  # 5 blocks of 3 rows, one with notes
    assert [len(t) for t in final_index(rows_per_part=7)] == [9, 6]  # parts: as before


def test_packing_on_an_object_store_writes_what_a_local_folder_gets(
    s3_bucket, tmp_path, monkeypatch
):
    """On an object store segments are fetched several at once (up to ``FETCH_BYTES``), or
    streamed one by one when larger: the shards, the final index and the removal of the
    segments are those of a local folder either way."""
    import fsspec

    import curation.pack
    from core.storage import copy_tree

    recs = [block(tmp_path, f"b{i}", [f"k{i}{j}" for j in range(1 + i % 3)]) for i in range(5)]
    plans = plan_packs(recs, 100, 2**30)
    assert len(plans) == 1 and len(plans[0].segments) == 5
    mapping = {s.path: p.path for p in plans for s in p.segments}
    remote = {}
    for name, fetch in (("grouped", 2), ("streamed", 0.5)):  # segments per fetch
        root = f"{s3_bucket}/{name}"
        copy_tree(str(tmp_path / "_work"), f"{root}/_work")
        size = recs[0].written.segments[0].num_bytes
        monkeypatch.setattr(curation.pack, "FETCH_BYTES", int(fetch * size))
        remote[name] = pack_one(root, plans[0])
        assert fsspec.filesystem("s3").find(f"{root}/_work/shards") == []  # segments removed
        assert write_final_index(root, recs, mapping) == len(recs) + 9
    local = pack_one(str(tmp_path), plans[0])
    write_final_index(str(tmp_path), recs, mapping)
    for name, shard in remote.items():
        assert (shard.path, shard.num_samples, shard.num_bytes, shard.sha256) == (
            local.path,
            local.num_samples,
            local.num_bytes,
            local.sha256,
        )
        assert sha256_file(shard.uri) == shard.sha256
        index = read_index(f"{s3_bucket}/{name}/index")
        assert index.equals(read_index(str(tmp_path / "index")))
