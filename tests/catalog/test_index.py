"""catalog/index.py: the Parquet sample index of a version (write, open, query, check)."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from helpers import sample_rows

from catalog.index import (
    check_index_schema,
    open_index,
    query_index,
    read_index,
    write_index_part,
)
from catalog.schema import SAMPLE_SCHEMA, SchemaError, rows_to_table


def keys(table: pa.Table) -> list[str]:
    return sorted(table.column("key").to_pylist())


def test_index_query_pushes_filter_and_columns(committed_version):
    v, rows = committed_version("demo", n=30)
    out = query_index(v.index_uri, "status == 'error'", columns=["key", "reasons"])
    assert out.column_names == ["key", "reasons"]
    assert sorted(out.column("key").to_pylist()) == sorted(
        r["key"] for r in rows if r["status"] == "error"
    )
    assert all(r == ["decode_error"] for r in out.column("reasons").to_pylist())


def test_query_takes_a_pyarrow_expression_too(tmp_path):
    rows = sample_rows(12)
    write_index_part(rows_to_table(rows), tmp_path / "index", "part-0")
    out = query_index(tmp_path / "index", ds.field("kind") == "video")
    assert keys(out) == sorted(r["key"] for r in rows if r["kind"] == "video")
    assert keys(query_index(tmp_path / "index")) == sorted(r["key"] for r in rows)
    with pytest.raises(ValueError, match="unknown column 'knid'"):
        query_index(tmp_path / "index", "knid == 'video'")


def test_a_part_is_validated_conformed_and_written_whole(tmp_path):
    rows = sample_rows(8)
    loose = pa.table(  # int64 / float64 where the contract has int32 / float32
        {
            "key": [r["key"] for r in rows],
            "kind": [r["kind"] for r in rows],
            "source_uri": [r["source_uri"] for r in rows],
            "width": pa.array([r["width"] for r in rows], pa.int64()),
            "aesthetic": pa.array([r["aesthetic"] for r in rows], pa.float64()),
            "status": [r["status"] for r in rows],
            "reasons": [r["reasons"] for r in rows],
        }
    )
    path = write_index_part(loose, tmp_path / "index", "part-0")
    assert path == f"{tmp_path}/index/part-0.parquet"
    assert [p.name for p in (tmp_path / "index").iterdir()] == ["part-0.parquet"]  # no temp
    written = pq.read_table(path)
    assert written.schema.equals(SAMPLE_SCHEMA, check_metadata=False)
    assert keys(written) == sorted(r["key"] for r in rows)
    assert written.column("width").to_pylist() == [r["width"] for r in rows]

    broken = rows_to_table(rows[:2] + [{**rows[2], "status": "accepted", "reasons": ["x"]}])
    with pytest.raises(SchemaError, match="accepted rows with reasons"):
        write_index_part(broken, tmp_path / "index", "part-1")
    with pytest.raises(SchemaError, match="required column 'status' is missing"):
        write_index_part(loose.drop_columns(["status"]), tmp_path / "index", "part-1")
    assert [p.name for p in (tmp_path / "index").iterdir()] == ["part-0.parquet"]  # nothing new


def test_an_index_is_a_directory_of_parts_or_one_file(tmp_path):
    rows = sample_rows(10)
    index = tmp_path / "index"
    write_index_part(rows_to_table(rows[:6]), index, "part-0")
    write_index_part(rows_to_table(rows[6:]), index, "part-1")
    (index / "_SUCCESS").write_bytes(b"")  # markers and temp files are not parts
    (index / ".part-2.parquet.tmp-123").write_bytes(b"half a parquet file")
    assert keys(read_index(index)) == sorted(r["key"] for r in rows)
    assert keys(read_index(index / "part-1.parquet")) == sorted(r["key"] for r in rows[6:])
    with pytest.raises(FileNotFoundError, match="sample index not found: .*nowhere"):
        open_index(tmp_path / "nowhere")


def test_parts_typing_an_extra_column_differently_are_unified(tmp_path):
    """A partition where an extra column is all null types it ``null``; reading the index
    unifies it with the other parts' type instead of failing on the first part's schema."""
    rows = sample_rows(6)
    index = tmp_path / "index"
    write_index_part(rows_to_table([{**r, "note": None} for r in rows[:3]]), index, "part-0")
    write_index_part(rows_to_table([{**r, "note": "n"} for r in rows[3:]]), index, "part-1")
    assert pq.read_schema(index / "part-0.parquet").field("note").type == pa.null()

    table = read_index(index)
    assert table.schema.field("note").type == pa.string()
    notes = {r["key"]: r["note"] for r in table.to_pylist()}
    assert notes == {r["key"]: (None if i < 3 else "n") for i, r in enumerate(rows)}
    assert keys(query_index(index, "note == 'n'")) == sorted(r["key"] for r in rows[3:])


def test_check_index_schema_reports_contract_problems_without_reading_rows(tmp_path):
    rows = sample_rows(5)
    write_index_part(rows_to_table(rows), tmp_path / "good", "part-0")
    assert check_index_schema(tmp_path / "good") == []

    (tmp_path / "bad").mkdir()  # written around write_index_part: no kind, width as text
    table = rows_to_table(rows).drop_columns(["kind"])
    i = table.column_names.index("width")
    table = table.set_column(i, "width", table.column("width").cast(pa.string()))
    pq.write_table(table, tmp_path / "bad" / "part-0.parquet")
    assert check_index_schema(tmp_path / "bad") == [
        "required column 'kind' is missing",
        "column 'width' has type string, expected int32",
    ]


def test_a_write_that_fails_midway_leaves_no_part(tmp_path, monkeypatch):
    """Parts are written under a hidden temporary name and renamed: a reader never sees half
    a part, even when the writer dies in the middle."""
    import catalog.index

    rows = sample_rows(6)
    index = tmp_path / "index"
    write_index_part(rows_to_table(rows[:3]), index, "part-0")

    def dies_midway(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(catalog.index.pq, "write_table", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        write_index_part(rows_to_table(rows[3:]), index, "part-1")
    assert not (index / "part-1.parquet").exists()
    assert keys(read_index(index)) == sorted(r["key"] for r in rows[:3])
