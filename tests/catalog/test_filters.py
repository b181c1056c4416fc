import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from catalog.filters import MAX_FILTER_TERMS, FilterError, parse_filter

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


# -- limits: hostile or generated filters end in one FilterError line, never a crash ----------

CRASHERS = {  # each crashed the process before the limits: segfault, RecursionError, MemoryError
    "and_chain_9000": " and ".join(["aesthetic > 1"] * 9000),
    "not_5000": "not " * 5000 + "aesthetic > 1",
    "not_30000": "not " * 30000 + "aesthetic > 1",
}

APPLY = """
import sys
import pyarrow as pa, pyarrow.dataset as ds
from catalog.filters import FilterError, parse_filter
text = sys.stdin.read()
try:
    expr = parse_filter(text, ["aesthetic"])
except FilterError as e:
    print("FilterError:", e)
else:
    ds.dataset(pa.table({"aesthetic": [1.0, 2.0]})).to_table(filter=expr)
    print("applied")
"""


@pytest.mark.parametrize("name", sorted(CRASHERS))
def test_crashing_filters_give_one_line_filter_error(name):
    # a subprocess: on unlimited parsing the and-chain segfaults inside pyarrow
    out = subprocess.run(
        [sys.executable, "-c", APPLY],
        input=CRASHERS[name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FilterError: filter "), out.stdout[:500]
    assert len(lines[0]) < 300


@pytest.mark.parametrize(
    "expr, message",
    [
        ("kind == 'x' or " * 2000 + "aesthetic > 1", "characters long; at most 20000"),
        ("not " * 1500 + "aesthetic > 1", "has 1500 operators and brackets; at most 1000"),
        ("not " * 100 + "aesthetic > 1", "nests deeper than 32 levels"),
        ("aesthetic > " + "-" * 100 + "1", "nests deeper than 32 levels"),
        (" or ".join(["aesthetic > 1"] * 257), "has 257 terms; at most 256"),
        (" and ".join(["aesthetic"] * 300), "has 300 terms; at most 256"),
        ("0 < " + " < ".join(["aesthetic"] * 300), "has 300 terms; at most 256"),
        ('f"{' + "not " * 4000 + 'x}" == kind', "nests too deeply to parse"),
    ],
)
def test_filter_limits(expr, message):
    with pytest.raises(FilterError, match=message) as err:
        parse_filter(expr, TABLE.column_names)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_filters_within_the_limits_work():
    # 50 terms, as a generated filter might have: same rows as the short form
    long = " and ".join(f"aesthetic > {i / 10}" for i in range(50)) + " and kind == 'video'"
    assert keep(long) == keep("aesthetic > 4.9 and kind == 'video'") == [1, 2]
    # exactly at the term limit, and a dozen levels of nesting
    assert keep(" or ".join(["aesthetic > 5"] * MAX_FILTER_TERMS)) == [1, 2]
    assert keep("not (" * 6 + "aesthetic > 5" + ")" * 6) == [1, 2]
