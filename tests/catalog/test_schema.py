import pyarrow as pa
import pytest
from helpers import sample_rows

from catalog.schema import (
    COLUMNS,
    SAMPLE_SCHEMA,
    SchemaError,
    assert_valid,
    conform,
    count_by_status,
    make_key,
    rows_to_table,
    validate_table,
)


def test_contract_has_the_design_fields():
    for name in [
        "key",
        "kind",
        "source_uri",
        "span",
        "width",
        "height",
        "fps",
        "num_frames",
        "duration",
        "caption",
        "recaption",
        "instruction",
        "aesthetic",
        "watermark",
        "motion",
        "ocr_area",
        "ocr_boxes",
        "status",
        "reasons",
        "bucket",
        "shard",
        "run_id",
        "target_uri",
    ]:
        assert name in COLUMNS
    assert SAMPLE_SCHEMA.field("reasons").type == pa.list_(pa.string())
    assert all(SAMPLE_SCHEMA.field(c).metadata[b"doc"] for c in COLUMNS)


def test_valid_rows_pass_and_count():
    table = rows_to_table(sample_rows(20))
    assert validate_table(table) == []
    assert count_by_status(table) == {"accepted": 12, "rejected": 4, "error": 4}
    assert sum(count_by_status(table).values()) == table.num_rows


def test_key_is_stable_and_span_sensitive():
    assert make_key("s3://b/x.mp4", (0.0, 2.0)) == make_key("s3://b/x.mp4", (0.0, 2.0000001))
    assert make_key("s3://b/x.mp4", (0.0, 2.0)) != make_key("s3://b/x.mp4", (2.0, 4.0))
    assert make_key("a.png") != make_key("a.png", target_uri="b.png")
    assert len(make_key("a.png")) == 40


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"kind": "gif"}, "column 'kind' has values ['gif']"),
        ({"status": "maybe"}, "column 'status' has values ['maybe']"),
        ({"status": "rejected", "reasons": []}, "rejected/error rows without a reason"),
        ({"status": "accepted", "reasons": ["x"]}, "accepted rows with reasons"),
        ({"ocr_area": 1.5}, "column 'ocr_area' out of range [0, 1]"),
        ({"aesthetic": float("nan")}, "column 'aesthetic' out of range"),
        ({"width": 0}, "column 'width' out of range"),
        ({"rotation": 45}, "column 'rotation' must be one of"),
        ({"span": {"start": 5.0, "end": 2.0}}, "span must satisfy 0 <= start < end"),
        ({"kind": "image_edit"}, "edit rows without target_uri"),
        ({"target_uri": "t.png"}, "non-edit rows with a target_uri"),
    ],
)
def test_each_violation_is_reported(change, expected):
    rows = sample_rows(6)
    rows[1].update(change)
    problems = validate_table(rows_to_table(rows))
    assert any(expected in p for p in problems), problems
    with pytest.raises(SchemaError, match="sample contract"):
        assert_valid(rows_to_table(rows))


def test_duplicate_keys_and_missing_columns():
    rows = sample_rows(4)
    rows[2]["key"] = rows[1]["key"]
    assert any("duplicate keys" in p for p in validate_table(rows_to_table(rows)))
    table = rows_to_table(sample_rows(4)).drop_columns(["status"])
    assert validate_table(table) == ["required column 'status' is missing"]


def test_wrong_type_is_named_and_conform_casts_safely():
    table = rows_to_table(sample_rows(4))
    wide = table.set_column(
        table.schema.get_field_index("width"), "width", table.column("width").cast(pa.int64())
    )
    assert validate_table(wide) == ["column 'width' has type int64, expected int32"]
    assert validate_table(conform(wide)) == []
    as_text = table.set_column(table.schema.get_field_index("fps"), "fps", pa.array(["fast"] * 4))
    with pytest.raises(SchemaError, match="'fps'"):
        conform(as_text)


def test_conform_adds_missing_nullable_columns_and_keeps_extras():
    minimal = pa.table(
        {
            "key": ["k1"],
            "kind": ["image"],
            "source_uri": ["a.png"],
            "status": ["accepted"],
            "reasons": [[]],
            "my_score": [0.3],
        }
    )
    out = conform(minimal)
    assert out.column_names[: len(COLUMNS)] == list(COLUMNS)
    assert out.column_names[-1] == "my_score"
    assert validate_table(out) == []
    assert validate_table(out, allow_extra=False) == ["unknown column 'my_score'"]


def test_rows_to_table_rejects_unconvertible_values():
    rows = sample_rows(2)
    rows[0]["num_frames"] = "many"
    with pytest.raises(SchemaError, match="num_frames"):
        rows_to_table(rows)
