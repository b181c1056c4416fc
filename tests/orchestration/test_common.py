"""Tables that fit the terminal: ids whole on one line, optional columns dropped first."""

import io

from rich.console import Console

from orchestration.common import Column, catalog_url, fitted_table

JOB = "omniforge-curate-20261205-113131-abc123"
ROWS = [
    (JOB, "SUCCEEDED", "curate", "a name that is long enough to wrap", "12-05 11:31", "x " * 40),
]
COLUMNS = (
    Column("id", copy=True),
    Column("status", copy=True),
    Column("kind", drop=2),
    Column("name"),
    Column("started (UTC)", drop=3),
    Column("entrypoint", drop=4),
)


def render(width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(fitted_table("jobs", COLUMNS, ROWS, width=width))
    return console.export_text()


def test_ids_stay_whole_and_optional_columns_go_first():
    for width in (80, 100, 160):
        text = render(width)
        assert JOB in text and "SUCCEEDED" in text, text
        assert max(len(line) for line in text.splitlines()) <= width
    narrow = render(80)
    assert "entrypoint" not in narrow.split("\n")[2] and "not shown in 80 columns" in narrow
    assert "started" in render(160) and "entrypoint" in render(160)


def test_a_catalog_path_is_a_sqlite_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert catalog_url("demo_out/catalog.db") == f"sqlite:///{tmp_path / 'demo_out/catalog.db'}"
    assert catalog_url("sqlite:///x.db") == "sqlite:///x.db"
    assert catalog_url(None) is None


def test_plan_status_keeps_its_ids_whole_at_80_columns():
    from orchestration.plan_cmd import STATUS_COLUMNS

    row = ["curate", "curation", "done", "62 accepted / 30 rejected / 8 error", "4 (succeeded)",
           "sample-curated@1", "0a1b2c3d4e5f60718293a4b5c6d7e8f9"]  # fmt: skip
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(fitted_table("plan", [c for _, c in STATUS_COLUMNS], [row], width=80))
    text = console.export_text()
    assert "4 (succeeded)" in text and "sample-curated@1" in text
    assert "not shown in 80 columns: MLflow run" in text
    assert max(len(line) for line in text.splitlines()) <= 80
