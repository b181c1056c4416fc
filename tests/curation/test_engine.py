"""The streaming engine on real Ray actors: commits per block, worker deaths, poisonous inputs,
write failures and set-up errors. Stages are the small real ones of ``tests/engine_stages.py``."""

from __future__ import annotations

import engine_stages
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from engine_stages import (
    AcceptStage,
    NoWeightsStage,
    PoisonStage,
    ScoreStage,
    TagStage,
    input_rows,
)

from catalog.shards import iter_shard
from curation.engine import CurationAborted, TableRows, make_blocks, run_blocks, uncommitted
from curation.journal import Journal
from curation.sink import BlockSink
from curation.stages.base import MissingWeights


@pytest.fixture(scope="module", autouse=True)
def _stages_by_value(ray_session):
    ray_session.cloudpickle.register_pickle_by_value(engine_stages)
    yield
    ray_session.cloudpickle.unregister_pickle_by_value(engine_stages)


def run(tmp_path, rows, stages, **kw):
    sink = BlockSink(str(tmp_path), "run-1", max_samples=100, max_bytes=2**20)
    journal = Journal(str(tmp_path))
    stats = run_blocks(rows, stages, sink, journal, **kw)
    return stats, journal


def committed_rows(tmp_path, journal) -> dict[str, dict]:
    rows = {}
    for rec in journal.records():
        for row in pq.read_table(tmp_path / rec.written.index_part).to_pylist():
            assert row["key"] not in rows, "a row was written twice"
            rows[row["key"]] = row
    return rows


def test_make_blocks_names_blocks_by_their_inputs():
    rows = input_rows(5)
    blocks = list(make_blocks(rows, 2))
    assert [len(b.rows) for b in blocks] == [2, 2, 1]
    again = list(make_blocks(list(reversed(rows[:2])), 2))
    assert again[0].id == blocks[0].id  # same inputs, same id, whatever their order


def test_table_rows_are_the_tables_rows_as_dicts():
    rows = [{**r, "score": float(i)} for i, r in enumerate(input_rows(5))]
    table = TableRows(pa.Table.from_pylist(rows))
    assert len(table) == 5
    assert table[1:3] == rows[1:3] and table[3:] == rows[3:] and table[-1] == rows[-1]
    assert list(table) == rows
    with pytest.raises(IndexError):
        table[5]
    blocks = list(make_blocks(table, 2))
    assert [b.rows for b in blocks] == [b.rows for b in make_blocks(rows, 2)]
    done = {rows[0]["input_id"], rows[3]["input_id"]}
    left = uncommitted(table, done)
    assert isinstance(left, TableRows) and list(left) == [rows[1], rows[2], rows[4]]
    assert uncommitted(rows, done) == [rows[1], rows[2], rows[4]]


def test_every_block_is_written_and_committed_with_its_inputs(tmp_path):
    rows = input_rows(7)
    stats, journal = run(tmp_path, rows, [TagStage(), ScoreStage(), AcceptStage()], block_size=3)
    records = journal.records()
    assert len(records) == stats.blocks == 3
    assert sorted(Journal.committed_inputs(records)) == [r["input_id"] for r in rows]
    written = committed_rows(tmp_path, journal)
    assert set(written) == {r["key"] for r in rows}
    assert all(r["status"] == "accepted" and r["caption"] == "tag;" for r in written.values())
    assert [written[f"k{i:03d}"]["aesthetic"] for i in range(3)] == [0.0, 1.0, 2.0]
    keys = [
        k
        for rec in records
        for s in rec.written.segments
        for k, _ in iter_shard(str(tmp_path / s.path))
    ]
    assert sorted(keys) == sorted(written)
    assert stats.stages["tag"][:2] == [7, 7] and stats.stages["score"][:2] == [7, 7]


def test_a_model_actor_killed_mid_call_is_restarted_and_nothing_is_lost(tmp_path):
    rows = input_rows(6)
    marks = tmp_path / "marks"
    marks.mkdir()
    stage = ScoreStage(die_once_dir=str(marks), die_on="in-004")
    stats, journal = run(tmp_path / "out", rows, [stage, AcceptStage()], block_size=2)
    assert [p.name for p in marks.iterdir()] == ["died-k004"]  # the actor really died
    assert set(committed_rows(tmp_path / "out", journal)) == {r["key"] for r in rows}


def test_an_input_that_kills_every_worker_becomes_an_error_row(tmp_path):
    rows = input_rows(4, poison={2})
    stats, journal = run(
        tmp_path,
        rows,
        [PoisonStage(), AcceptStage()],
        block_size=2,
        max_attempts=1,
        actor_retries=0,
    )
    written = committed_rows(tmp_path, journal)
    assert set(written) == {r["key"] for r in rows}  # every input is accounted for
    bad = written["k002"]
    assert bad["status"] == "error" and bad["reasons"][0].startswith("worker_failed: ")
    assert all(written[k]["status"] == "accepted" for k in ("k000", "k001", "k003"))
    assert stats.failed_inputs == 1 and stats.retries >= 2


def test_a_write_failure_stops_the_run_with_the_path_and_errno(tmp_path):
    (tmp_path / "_work").write_text("a file where the sink needs a folder")
    with pytest.raises(CurationAborted) as e:
        run(tmp_path, input_rows(3), [AcceptStage()], block_size=3)
    message = str(e.value)
    assert message.startswith("cannot write ") and str(tmp_path / "_work") in message
    assert "[EEXIST]" in message or "[ENOTDIR]" in message
    assert "\n" not in message and Journal(str(tmp_path)).records() == []


def test_a_stage_that_cannot_set_up_stops_the_run_before_any_block(tmp_path):
    with pytest.raises(MissingWeights, match="model not found at /nowhere/model.bin"):
        run(tmp_path, input_rows(3), [TagStage(), NoWeightsStage(), AcceptStage()])
    assert Journal(str(tmp_path)).records() == []


def test_an_exception_in_stage_code_splits_the_block_at_once(tmp_path):
    """Stage code fails the same way every time: no whole-block retries, straight to halves."""
    from engine_stages import BatchBugStage

    rows = input_rows(4, poison={1})
    stats, journal = run(tmp_path, rows, [BatchBugStage(), AcceptStage()], block_size=4)
    written = committed_rows(tmp_path, journal)
    assert set(written) == {r["key"] for r in rows}
    bad = written["k001"]
    assert bad["status"] == "error" and bad["kind"] == "image"  # kind from the file name
    assert bad["reasons"] == ["worker_failed: RuntimeError: batched decode failed"]
    # 4 -> 2 + 2 -> the half with the poison -> 1 + 1: three failures, none retried whole
    assert stats.retries == 3 and stats.failed_inputs == 1
