import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from catalog.filters import FilterError, parse_filter

TABLE = pa.table(
    {
        "kind": ["image", "video", "video", "image_edit"],
        "aesthetic": [4.0, 6.0, 5.5, None],
        "motion": [None, 0.002, 0.05, None],
        "recaption": [None, "a bird", None, None],
    }
)


def keep(expr: str) -> list[int]:
    table = TABLE.append_column("i", pa.array(range(4)))
    expression = parse_filter(expr, TABLE.column_names)
    return ds.dataset(table).to_table(filter=expression).column("i").to_pylist()


@pytest.mark.parametrize(
    "expr, rows",
    [
        ("aesthetic > 5", [1, 2]),
        ("5 < aesthetic", [1, 2]),
        ("aesthetic >= 5 and kind == 'video'", [1, 2]),
        ("kind in ('image', 'image_edit')", [0, 3]),
        ("kind not in ['video']", [0, 3]),
        ("not (aesthetic > 5)", [0]),
        ("recaption is not None", [1]),
        ("motion is None", [0, 3]),
        ("0.001 < motion <= 0.01", [1]),
        ("aesthetic < 4.5 or motion > 0.01", [0, 2]),
    ],
)
def test_expressions_select_expected_rows(expr, rows):
    assert keep(expr) == rows


@pytest.mark.parametrize(
    "expr, message",
    [
        ("aesthetik > 5", "unknown column 'aesthetik'; columns: aesthetic, kind"),
        ("aesthetic >", "not a valid expression"),
        ("__import__('os').system('true')", "unsupported syntax"),
        ("aesthetic > motion + 1", "expected a literal value"),
        ("kind in 'video'", "'in' needs a list or tuple"),
        ("aesthetic is 5", "'is' only compares with None"),
    ],
)
def test_bad_expressions_name_the_problem(expr, message):
    with pytest.raises(FilterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_filter(expr, TABLE.column_names)
