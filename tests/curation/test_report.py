"""Curation run summary (numbers, console tables), the self-contained HTML page, MLflow params
(the MLflow run itself: tests/curation/test_tracking.py)."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest
from helpers import sample_rows
from PIL import Image
from rich.console import Console

from catalog.records import ShardRecord
from catalog.schema import conform, make_key, rows_to_table
from core.tracking import MLFLOW_KEY_LIMIT, MLFLOW_PARAM_LIMIT, mlflow_params
from curation.config import SelectConfig
from curation.report import write_report
from curation.summary import print_summary, reason_tag, summarize

HOSTILE_URI = '/data/raw/<script>alert("x")</script> & "quotes" \ufffd\ufffd.mp4'
HOSTILE_REASON = "bad_file: <img src=x onerror=alert(1)>"


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 18), color).save(buf, "JPEG")
    return buf.getvalue()


def _rows() -> list[dict]:
    """sample_rows(60) (rejected: low_aesthetic, error: decode_error) plus multi-reason rows,
    watermark scores on some rows and one hostile source uri."""
    rows = sample_rows(60)
    rows[4]["reasons"] = ["low_aesthetic: 3.1 < 5", "too_small: 200 < 256", "low_aesthetic: x"]
    rows[8]["reasons"] = ["too_small: 100 < 256", "watermark: 0.93 > 0.5"]
    rows[10]["reasons"] = ["decode_error: moov atom not found", "probe_failed"]
    rows[12]["reasons"] = [HOSTILE_REASON]
    rows[24]["source_uri"] = HOSTILE_URI  # a rejected row
    rows[24]["key"] = make_key(HOSTILE_URI)
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["watermark"] = 0.1 * (i % 10)
    return rows


def _expected_tags(rows: list[dict], status: str) -> Counter:
    counts: Counter = Counter()
    for row in rows:
        if row["status"] == status:
            counts.update({reason_tag(r) for r in row["reasons"]})
    return counts


SHARDS = [
    ShardRecord("shards/a/p0-000000.tar", "a512_r1x1_f1", 4, 1000, "x"),
    ShardRecord("shards/a/p0-000001.tar", "a512_r1x1_f1", 3, 700, "y"),
    ShardRecord("shards/b/p0-000000.tar", "a256_r16x9_f96", 5, 5000, "z"),
]


def _summary(table: pa.Table, catalog_ref: str | None = None) -> dict:
    summary = summarize(
        table,
        stages_run=["probe", "split", "motion", "ocr", "select", "shard"],
        stages_skipped={
            "aesthetic": "weights not found in ~/.omniforge/models",
            "watermark": "off",
        },
        elapsed_s=42.5,
        shards=SHARDS,
        num_inputs=60,
    )
    if catalog_ref:
        summary["catalog"] = catalog_ref  # the pipeline adds the version it committed
    return summary


# ------------------------------------------------------------------------------- summary


def test_reason_tag():
    assert reason_tag("decode_error: moov atom: not found") == "decode_error"
    assert reason_tag("too_small") == "too_small"
    assert reason_tag("  ") == reason_tag(": detail only") == "unspecified"


def test_summary_counts_add_up_and_count_multi_reason_rows_under_each_reason():
    rows = _rows()
    s = _summary(rows_to_table(rows))

    # every row is accounted for exactly once by status
    assert s["samples"] == len(rows) == 60
    assert s["accepted"] + s["rejected"] + s["errors"] == s["samples"]
    assert s["accepted"] == sum(r["status"] == "accepted" for r in rows)
    assert s["rejected"] == sum(r["status"] == "rejected" for r in rows)
    assert s["errors"] == sum(r["status"] == "error" for r in rows)
    assert s["inputs"] == s["inputs_in_index"] == 60
    assert s["clips"] == sum(r["kind"] == "video" and r["span"] is not None for r in rows)
    assert sum(sum(k.values()) for k in s["by_kind"].values()) == 60

    # per reason tag: a row counts once under each distinct tag it has
    assert s["rejected_by_reason"] == dict(_expected_tags(rows, "rejected"))
    assert s["errors_by_reason"] == dict(_expected_tags(rows, "error"))
    assert s["rejected_by_reason"]["too_small"] == 2
    assert s["rejected_by_reason"]["watermark"] == 1
    assert s["rejected_by_reason"]["bad_file"] == 1
    # row 4 has low_aesthetic twice: counted once; rows 4 and 8 count under two tags
    assert s["rejected_by_reason"]["low_aesthetic"] == s["rejected"] - 2
    assert s["multi_reason_rejected"] == 2
    assert sum(s["rejected_by_reason"].values()) == s["rejected"] + 2
    assert s["errors_by_reason"] == {"decode_error": s["errors"], "probe_failed": 1}
    assert "several reasons" in s["reason_counting"]
    assert list(s["rejected_by_reason"].values()) == sorted(
        s["rejected_by_reason"].values(), reverse=True
    )

    assert s["shards"] == 3 and s["bytes"] == 6700 and s["shard_samples"] == 12
    assert s["shards_by_bucket"]["a512_r1x1_f1"] == {"shards": 2, "samples": 7, "bytes": 1700}
    took = s["elapsed_s"]
    assert took == 42.5
    assert s["samples_per_s"] == pytest.approx(60 / 42.5)
    assert s["stages_skipped"]["watermark"] == "off"
    assert json.loads(json.dumps(s)) == s  # plain JSON


def test_summary_of_an_empty_index():
    s = summarize(
        rows_to_table([]), stages_run=[], stages_skipped={}, elapsed_s=0.0, shards=[], num_inputs=0
    )
    assert (s["samples"], s["accepted"], s["rejected"], s["errors"]) == (0, 0, 0, 0)
    assert s["rejected_by_reason"] == {} and s["samples_per_s"] is None


def test_print_summary_shows_counts_reasons_and_skipped_stages():
    rows = _rows()
    rows[16]["reasons"] = ["[bold red]markup[/]: not interpreted"]
    s = _summary(rows_to_table(rows), "catalog://sample-corpus@2")
    console = Console(record=True, width=140, color_system=None)
    print_summary(s, console)
    text = console.export_text()
    for expected in (
        "inputs",
        "accepted",
        "rejected",
        "errors",
        "low_aesthetic",
        "decode_error",
        "too_small",
        "aesthetic",
        "weights not found",
        "a256_r16x9_f96",
        "6.5 KiB",
        "42.5 s",
        "[bold red]markup[/]",
        "count under each",
        "catalog://sample-corpus@2",
    ):
        assert expected in text, expected
    assert f"{s['accepted']}" in text


# ------------------------------------------------------------------------------- report


class _Page(HTMLParser):
    """Collects tags, img sources and the text of each <section> (by id)."""

    def __init__(self):
        super().__init__()
        self.tags: Counter = Counter()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.sections: dict[str, list[dict]] = {}
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = []
        if tag == "div" and attrs.get("class") in ("tile", "ph") and self._section:
            self.sections[self._section].append({"class": attrs["class"]})
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
            if self._section:
                self.sections[self._section].append({"class": "img", "src": attrs["src"]})
        if "href" in attrs:
            self.hrefs.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None


def _section(page: _Page, prefix: str) -> list[dict]:
    (name,) = [k for k in page.sections if k.startswith(prefix)]
    return page.sections[name]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    rows = _rows()
    # 30 more low_aesthetic rejections (more than the cap), 10 of them with a thumbnail
    extra = sample_rows(120, seed=1)
    extra = [r for r in extra if r["status"] == "rejected"][:30]
    rows += extra
    table = rows_to_table(rows)
    thumbs = {r["key"]: _jpeg() for r in extra[-10:]}
    thumbs[rows[5]["key"]] = _jpeg((0, 0, 255))  # an error row
    cfg = SelectConfig(
        min_aesthetic=4.25, max_ocr_area=0.015, max_watermark=0.35, min_motion=None, max_motion=0.1
    )
    summary = _summary(table, "catalog://sample-corpus@2")
    path = write_report(
        table, thumbs, cfg, summary, tmp_path_factory.mktemp("r") / "out" / "report.html"
    )
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return {
        "rows": rows,
        "table": table,
        "path": path,
        "text": text,
        "page": page,
        "summary": summary,
        "thumbs": thumbs,
    }


def test_report_is_one_self_contained_file(report):
    path, text, page = report["path"], report["text"], report["page"]
    assert path.name == "report.html" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no temp leftovers
    assert 'src="http' not in text and "url(http" not in text and "@import" not in text
    assert page.tags["link"] == 0 and page.tags["script"] == 0 and page.tags["iframe"] == 0
    assert page.srcs and all(s.startswith("data:image/") for s in page.srcs)
    assert all(h.startswith("#") for h in page.hrefs)
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text


def test_report_header_has_the_counts(report):
    s, text = report["summary"], report["text"]
    for label in ("inputs", "samples", "accepted", "rejected", "errors", "shards", "elapsed"):
        assert f"<span>{label}</span><b>" in text
    assert f"<b>{s['accepted']:,}</b>" in text and f"<b>{s['rejected']:,}</b>" in text
    assert "weights not found in ~/.omniforge/models" in text  # skipped stage and why
    assert "6.5 KiB" in text
    assert "catalog://sample-corpus@2" in text


def test_report_has_a_histogram_per_present_score_with_threshold_values(report):
    text, page = report["text"], report["page"]
    pngs = [s for s in page.srcs if s.startswith("data:image/png;base64,")]
    present = ["short_side", "aspect", "aesthetic", "watermark", "motion", "ocr_area"]
    absent = ["watermark_static", "motion_min", "motion_max", "ocr_boxes"]  # all null
    for name in present:
        assert f'alt="{name} histogram"' in text, name
    for name in absent:
        assert f'alt="{name} histogram"' not in text, name
    assert len(pngs) == len(present)
    for src in pngs:  # real PNGs
        assert Image.open(io.BytesIO(_b64(src))).format == "PNG"
    # thresholds drawn are listed under their histogram, disabled ones shown as off
    for label in (
        "min_aesthetic = 4.25",
        "max_ocr_area = 0.015",
        "max_watermark = 0.35",
        "min_short_side = 256",
        "max_aspect = 3",
        "max_motion = 0.1",
    ):
        assert label in text, label
    assert "min_motion = " not in text
    assert re.search(r"<td>min_motion</td><td[^>]*>off</td>", text)


def test_report_has_a_section_per_reason_with_capped_thumbnails(report):
    page, s = report["page"], report["summary"]
    reasons = {f"rejected-{t}" for t in s["rejected_by_reason"]}
    reasons |= {f"error-{t}" for t in s["errors_by_reason"]}
    for prefix in reasons:
        _section(page, prefix)  # exactly one section each
    assert len(page.sections) == len(reasons)  # no accepted section: none has a thumbnail

    low = _section(page, "rejected-low_aesthetic")
    tiles = [x for x in low if x["class"] == "tile"]
    imgs = [x for x in low if x["class"] == "img"]
    placeholders = [x for x in low if x["class"] == "ph"]
    assert s["rejected_by_reason"]["low_aesthetic"] > 24
    assert len(tiles) == 24  # capped
    assert len(imgs) == 10 and len(placeholders) == 14
    assert all(x["src"].startswith("data:image/jpeg;base64,") for x in imgs)
    # samples with a thumbnail come first
    classes = [x["class"] for x in low if x["class"] != "tile"]
    assert classes == ["img"] * 10 + ["ph"] * 14

    small = _section(page, "rejected-too_small")
    assert len([x for x in small if x["class"] == "tile"]) == 2
    errors = _section(page, "error-decode_error")
    assert len([x for x in errors if x["class"] == "tile"]) == min(24, s["errors"])
    assert len([x for x in errors if x["class"] == "img"]) == 1
    text = report["text"]
    assert "showing 24 of" in text
    assert "moov atom not found" in text  # full reason text on the tile
    assert ">0004.jpg<" in text  # source file name
    assert "0.00–4.00 s" in text  # span


def test_report_escapes_hostile_strings(report):
    text, page = report["text"], report["page"]
    assert "<script>" not in text and 'alert("x")' not in text
    assert "<img src=x" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert page.tags["script"] == 0
    assert "\ufffd\ufffd.mp4" in text  # replacement characters survive as text


def test_report_handles_no_config_no_thumbnails_and_no_scores(tmp_path):
    rows = sample_rows(6)
    for row in rows:
        row.update(aesthetic=None, motion=None, ocr_area=None, width=None, height=None)
    out = write_report(rows_to_table(rows), {}, None, {}, tmp_path)
    text = out.read_text()
    assert out == tmp_path / "report.html"
    assert "no score column has values" in text and "no select config given" in text
    assert "data:image/png" not in text


def test_report_shows_accepted_samples_that_have_thumbnails(tmp_path):
    rows = sample_rows(12)
    accepted = [r["key"] for r in rows if r["status"] == "accepted"]
    out = write_report(rows_to_table(rows), {accepted[2]: _jpeg()}, SelectConfig(), {}, tmp_path)
    page = _Page()
    page.feed(out.read_text())
    shown = page.sections["accepted"]
    assert len([x for x in shown if x["class"] == "tile"]) == len(accepted)
    assert [x["class"] for x in shown if x["class"] != "tile"][0] == "img"  # thumbnail first


def test_report_of_many_rows_caps_thumbnails(tmp_path):
    # speed is measured in bench/, not here
    n = 20_000
    rng = np.random.default_rng(0)
    status = np.where(
        np.arange(n) % 5 == 0, "error", np.where(np.arange(n) % 4 == 0, "rejected", "accepted")
    )
    reasons = [
        []
        if s == "accepted"
        else (["decode_error: x"] if s == "error" else ["low_aesthetic: y", f"r{i % 7}: z"])
        for i, s in enumerate(status)
    ]
    table = conform(
        pa.table(
            {
                "key": [f"k{i}" for i in range(n)],
                "kind": ["video"] * n,
                "source_uri": [f"/d/{i}.mp4" for i in range(n)],
                "width": rng.integers(100, 2000, n).astype(np.int32),
                "height": rng.integers(100, 2000, n).astype(np.int32),
                "aesthetic": rng.uniform(1, 10, n).astype(np.float32),
                "motion": rng.lognormal(-6, 1.5, n).astype(np.float32),
                "status": status,
                "reasons": pa.array(reasons, pa.list_(pa.string())),
            }
        )
    )
    thumbs = {f"k{i}": _jpeg() for i in range(0, n, 97)}
    summary = summarize(
        table, stages_run=[], stages_skipped={}, elapsed_s=1.0, shards=[], num_inputs=n
    )
    out = write_report(table, thumbs, SelectConfig(), summary, tmp_path / "report.html")
    assert summary["accepted"] + summary["rejected"] + summary["errors"] == n
    assert summary["rejected_by_reason"]["low_aesthetic"] == summary["rejected"]
    assert out.stat().st_size < 3_000_000  # thumbnails are capped per section


# ------------------------------------------------------------------------------- MLflow


def test_mlflow_params_are_flat_masked_and_limited():
    params = {
        "select": {"min_aesthetic": 4.5, "max_motion": None},
        "recaption": {
            "api_key_env": "OPENAI_API_KEY",
            "endpoint": "https://bob:hunter2@h/v1",
            "api_key": "sk-123",
        },
        "stages": [{"token_budget": 4096}],
        "db": {"Password": "pw"},
        "AUTH_TOKEN": "t0k",
        "client_secret": "s",
        "inputs": ["a", "b"],
        "long": "x" * 2000,
        "k" * 300: 1,
        "weird key/../:name": 2,
    }
    out = mlflow_params(params)
    assert out["select.min_aesthetic"] == "4.5" and out["select.max_motion"] == "None"
    for key in ("recaption.api_key", "db.Password", "AUTH_TOKEN", "client_secret"):
        assert out[key] == "***", key
    # the name of the variable holding a key, and a token budget, are not secrets
    assert out["recaption.api_key_env"] == "OPENAI_API_KEY"
    assert out["stages.0.token_budget"] == "4096"
    assert out["recaption.endpoint"] == "https://bob:***@h/v1"
    assert out["inputs"] == '["a", "b"]'
    assert len(out["long"]) == MLFLOW_PARAM_LIMIT and out["long"].endswith("...")
    assert all(len(k) <= MLFLOW_KEY_LIMIT for k in out)
    assert all(re.fullmatch(r"[\w.\- /]+", k) and ".." not in k.split("/") for k in out)
    assert len(out) == len(params) + 3  # nested sections flattened, nothing lost


def _b64(src: str) -> bytes:
    import base64

    return base64.b64decode(src.split(",", 1)[1])
