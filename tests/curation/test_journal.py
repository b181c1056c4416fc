"""The journal: committed blocks name their inputs; anything else under _work is garbage."""

from __future__ import annotations

from catalog.shards import ShardInfo
from curation.journal import BlockRecord, Journal, block_id
from curation.sink import BlockWritten


def record(root, block: str, inputs: list[str]) -> BlockRecord:
    seg = f"_work/shards/a256_r1x1_f1/{block}-000000.tar"
    part = f"_work/index/{block}.parquet"
    for rel in (seg, part):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    info = ShardInfo(str(root / seg), seg, "a256_r1x1_f1", len(inputs), 1, "0" * 64)
    return BlockRecord(block, inputs, BlockWritten(part, [info], {"accepted": len(inputs)}))


def test_committed_blocks_name_their_inputs(tmp_path):
    journal = Journal(str(tmp_path))
    assert journal.records() == []
    a, b = record(tmp_path, "b1", ["i1", "i2"]), record(tmp_path, "b2", ["i3"])
    journal.commit(b)
    journal.commit(a)
    records = journal.records()
    assert [r.block for r in records] == ["b1", "b2"] and records[0] == a
    assert Journal.committed_inputs(records) == {"i1", "i2", "i3"}
    assert block_id(["i2", "i1"]) == block_id(["i1", "i2"]) != block_id(["i1"])


def test_files_no_record_names_are_removed(tmp_path):
    journal = Journal(str(tmp_path))
    kept = record(tmp_path, "b1", ["i1"])
    journal.commit(kept)
    record(tmp_path, "b9", ["i9"])  # written, never committed: its driver died
    tmp_files = [
        tmp_path / "_work/shards/a256_r1x1_f1/.b5-000000.tar.tmp-1234",
        tmp_path / "_work/index/.b5.parquet.tmp-99",
        tmp_path / "_work/blocks/b5.json.tmp",
    ]
    for p in tmp_files:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    removed = {p.rsplit("/", 1)[-1] for p in journal.collect_garbage(journal.records())}
    assert removed == {"b9-000000.tar", "b9.parquet"} | {p.name for p in tmp_files}
    assert (tmp_path / kept.written.index_part).exists()
    assert (tmp_path / kept.written.segments[0].path).exists()
    assert [r.block for r in journal.records()] == ["b1"]


def test_a_record_that_does_not_read_back_is_not_committed(tmp_path):
    journal = Journal(str(tmp_path))
    good = record(tmp_path, "b1", ["i1"])
    journal.commit(good)
    damaged = record(tmp_path, "b2", ["i2"])
    (tmp_path / "_work/blocks/b2.json").write_text('{"block": "b2", "inp')  # power lost
    records = journal.records()
    assert [r.block for r in records] == ["b1"] and journal.unreadable
    removed = {p.rsplit("/", 1)[-1] for p in journal.collect_garbage(records)}
    assert {"b2.json", "b2.parquet", "b2-000000.tar"} <= removed  # its inputs are redone
    assert not (tmp_path / damaged.written.index_part).exists()
    assert Journal.committed_inputs(Journal(str(tmp_path)).records()) == {"i1"}
