"""The sink writes one block: segments of accepted samples, the index part, thumbnails."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.schema import SAMPLE_SCHEMA, validate_table
from catalog.shards import iter_shard
from curation.sink import WORKING_ONLY, BlockSink, OutputError, index_table


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
