"""Curation run summary (numbers, console tables), the self-contained HTML page, MLflow params
(the MLflow run itself: tests/curation/test_tracking.py)."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import sample_rows
from PIL import Image
from rich.console import Console

from catalog.records import ShardRecord
from catalog.schema import conform, make_key, rows_to_table
from catalog.shards import bucket_name
from core.tracking import MLFLOW_KEY_LIMIT, MLFLOW_PARAM_LIMIT, mlflow_params
from curation.config import SelectConfig
from curation.report import readable_reason, write_report
from curation.sink import ACCEPTED_THUMBS_PER_GROUP, thumb_group
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


class _Tiles(HTMLParser):
    """Every tile (``div.tile``) with its section, key, images, reasons and text; the table
    rows under each ``h2`` with an id; the ids on the page."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.tiles: list[dict] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._section: str | None = None
        self._heading: str | None = None
        self._tile: dict | None = None
        self._depth = 0
        self._li: dict | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "section":
            self._section = a["id"]
        if tag == "h2":
            self._heading = a.get("id")
        if tag == "tr" and self._heading:
            self.tables.setdefault(self._heading, []).append([])
        if tag == "td" and self._heading:
            self._cell = self.tables[self._heading][-1]
            self._cell.append("")
        if tag == "div" and self._tile is not None:
            self._depth += 1
        if tag == "div" and a.get("class") == "tile":
            self._tile = {
                "section": self._section,
                "key": a.get("data-key"),
                "imgs": [],
                "pair": False,
                "reasons": [],
                "text": "",
            }
            self._depth = 1
            self.tiles.append(self._tile)
        elif self._tile is not None:
            if tag == "div" and a.get("class") == "pair":
                self._tile["pair"] = True
            if tag == "img":
                self._tile["imgs"].append(a)
            if tag == "li":
                self._li = {"title": a.get("title"), "text": ""}
                self._tile["reasons"].append(self._li)

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        if tag == "li":
            self._li = None
        if tag == "td":
            self._cell = None
        if tag == "div" and self._tile is not None:
            self._depth -= 1
            if self._depth == 0:
                self._tile = None

    def handle_data(self, data):
        if self._li is not None:
            self._li["text"] += data
        if self._tile is not None:
            self._tile["text"] += data
        if self._cell is not None:
            self._cell[-1] += data

    def in_sections(self, prefix: str) -> list[dict]:
        return [t for t in self.tiles if (t["section"] or "").startswith(prefix)]


def _tiles(path: Path) -> _Tiles:
    page = _Tiles()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _bucketed(rows: list[dict]) -> list[dict]:
    for r in rows:
        if r["status"] == "accepted":
            r["bucket"] = bucket_name(r["width"], r["height"], r["num_frames"])
    return rows


def test_accepted_gallery_shows_the_smallest_keys_per_kind_and_bucket(tmp_path):
    rows = _bucketed(sample_rows(80))
    accepted = sorted((r for r in rows if r["status"] == "accepted"), key=lambda r: r["key"])
    accepted[0]["caption"] = "a red <kite> over the sea"  # the smallest key: shown
    no_thumb = accepted[1]["key"]
    thumbs = {r["key"]: _jpeg() for r in accepted if r["key"] != no_thumb}
    out = write_report(
        rows_to_table(rows), thumbs, SelectConfig(), {}, tmp_path, accepted_per_group=3
    )
    page = _tiles(out)
    groups: dict[tuple, list[str]] = {}
    for r in accepted:
        groups.setdefault((r["kind"], r["bucket"]), []).append(r["key"])
    assert len(groups) > 1 and max(len(v) for v in groups.values()) > 3
    gallery = page.in_sections("accepted-")
    shown_by_section: dict[str, list[str]] = {}
    for t in gallery:
        shown_by_section.setdefault(t["section"], []).append(t["key"])
        assert len(t["imgs"]) == 1 and t["imgs"][0]["src"].startswith("data:image/jpeg")
    # one section per group; its tiles: the 3 smallest keys that have a thumbnail, in order
    expected = sorted(sorted(k for k in keys if k != no_thumb)[:3] for keys in groups.values())
    assert sorted(shown_by_section.values()) == expected
    assert no_thumb not in {t["key"] for t in gallery}
    # the table of groups counts every accepted sample, shown or not
    table = page.tables["accepted"][1:]
    assert sorted(int(r[1]) for r in table) == sorted(len(v) for v in groups.values())
    assert sum(int(r[2]) for r in table) == len(gallery)
    (kite,) = [t for t in page.tiles if "kite" in t["text"]]
    assert kite["section"].startswith("accepted-") and "caption" in kite["text"]
    assert "&lt;kite&gt;" in out.read_text()


def test_accepted_gallery_without_thumbnails_says_so(tmp_path):
    rows = _bucketed(sample_rows(12))
    out = write_report(rows_to_table(rows), {}, SelectConfig(), {}, tmp_path)
    page = _tiles(out)
    assert "accepted" in page.ids and not page.in_sections("accepted-")
    assert "no accepted sample has a thumbnail" in out.read_text()


def test_edit_pairs_show_source_and_target_side_by_side(tmp_path):
    def edit(i: int, status: str, reasons: list[str]) -> dict:
        src, tgt = f"/data/edits/{i}_src.png", f"/data/edits/{i}_tgt.png"
        return {
            "key": make_key(src, target_uri=tgt),
            "kind": "image_edit",
            "source_uri": src,
            "target_uri": tgt,
            "instruction": f"make the sky purple ({i})",
            "width": 512,
            "height": 384,
            "target_width": 512,
            "target_height": 384,
            "num_frames": 1,
            "edit_change": 0.001 if status == "rejected" else 0.12,
            "status": status,
            "reasons": reasons,
        }

    rows = _bucketed(
        [
            edit(0, "accepted", []),
            edit(1, "rejected", ["identical_pair: 0.001 < 0.002"]),
            edit(2, "rejected", ["identical_pair: 0.001 < 0.002"]),
        ]
    )
    src, tgt = _jpeg((0, 0, 255)), _jpeg((0, 255, 0))
    thumbs = {r["key"]: src for r in rows}
    thumbs |= {f"{r['key']}.target": tgt for r in rows[:2]}  # row 2: its target has none
    out = write_report(rows_to_table(rows), thumbs, SelectConfig(), {}, tmp_path)
    page = _tiles(out)
    by_key = {t["key"]: t for t in page.tiles}
    for r in rows[:2]:
        t = by_key[r["key"]]
        assert t["pair"] and [i["alt"].split()[0] for i in t["imgs"]] == ["source", "target"]
        assert [_b64(i["src"]) for i in t["imgs"]] == [src, tgt]
        assert "make the sky purple" in t["text"] and "edit_change" in t["text"]
    assert by_key[rows[0]["key"]]["section"].startswith("accepted-image_edit")
    assert by_key[rows[1]["key"]]["section"].startswith("rejected-identical_pair")
    missing = by_key[rows[2]["key"]]
    assert missing["pair"] and len(missing["imgs"]) == 1 and "no thumbnail" in missing["text"]


def _threshold_rows(page: _Tiles) -> dict[str, str]:
    return {r[0]: r[1] for r in page.tables["thresholds"] if len(r) == 2}


def test_thresholds_are_listed_only_for_stages_that_ran(tmp_path):
    rows = sample_rows(10)
    for r in rows:
        r.update(aesthetic=None, ocr_area=None)
    summary = summarize(
        rows_to_table(rows),
        stages_run=["probe", "split", "frames", "pairs", "motion", "select", "encode"],
        stages_skipped={
            "aesthetic": "weights not found: /m/aesthetic.pth",
            "watermark": "watermark.enabled is false",
            "ocr": "ocr.enabled is false",
        },
        elapsed_s=1.0,
        shards=[],
        num_inputs=10,
    )
    out = write_report(rows_to_table(rows), {}, SelectConfig(), summary, tmp_path)
    page = _tiles(out)
    assert set(_threshold_rows(page)) == {
        "min_short_side",
        "min_aspect",
        "max_aspect",
        "min_motion",
        "max_motion",
    }
    text = out.read_text()
    for name, why in (
        ("max_ocr_area", "ocr skipped: ocr.enabled is false"),
        ("min_aesthetic", "aesthetic skipped: weights not found"),
        ("max_watermark, max_watermark_static", "watermark skipped: watermark.enabled is false"),
    ):
        assert re.search(f"<li>{re.escape(name)} <span>\\({re.escape(why)}", text), name

    # curate select: the models did not run now, but the scores in the index were measured
    rows[3]["aesthetic"] = 6.0
    summary.update(stages_run=["select", "encode"], stages_skipped={"models": "from the index"})
    page = _tiles(write_report(rows_to_table(rows), {}, SelectConfig(), summary, tmp_path))
    shown = _threshold_rows(page)
    assert {"min_aesthetic", "min_short_side", "min_motion"} <= set(shown)
    assert "max_ocr_area" not in shown and "max_watermark" not in shown


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (
            "decode_error: video file does not open: [Errno 1094995529] Invalid data found "
            "when processing input: '/tmp/corpus/corrupt/header_only.mp4'",
            "decode_error: video file does not open: Invalid data found when processing "
            "input: header_only.mp4",
        ),
        (
            "frames_failed: FileNotFoundError: [Errno 2] No such file or directory: "
            "'/abs/path/to/x.png'",
            "frames_failed: FileNotFoundError: No such file or directory: x.png",
        ),
        ("empty_file: /data/raw/ab/empty.jpg has 0 bytes", "empty_file: empty.jpg has 0 bytes"),
        ("not_found: target: /srv/data/t.png", "not_found: target: t.png"),
        ("low_aesthetic: 3.1 < 5", "low_aesthetic: 3.1 < 5"),
        ("too_small: 100/2 < 256", "too_small: 100/2 < 256"),
        ("read_error: s3://bucket/a/b.mp4 failed", "read_error: s3://bucket/a/b.mp4 failed"),
    ],
)
def test_readable_reason(raw, shown):
    assert readable_reason(raw) == shown


def test_error_reasons_are_shown_readable_with_the_raw_text_as_tooltip(tmp_path):
    rows = sample_rows(6)
    raw = "decode_error: [Errno 2] No such file or directory: '/abs/dir/0000.jpg'"
    rows[0]["reasons"] = [raw]
    out = write_report(rows_to_table(rows), {}, SelectConfig(), {}, tmp_path)
    (tile,) = [t for t in _tiles(out).tiles if t["key"] == rows[0]["key"]]
    assert tile["reasons"] == [
        {"title": raw, "text": "decode_error: No such file or directory: 0000.jpg"}
    ]


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


# ------------------------------------------------------------------------------- a real run

# Settings of the real run: the small media pass the size floor; the model stages are off, so
# their thresholds must not be listed (the values are nulled so config validation stays quiet).
RUN_SETTINGS = [
    "name=report-test",
    "block_size=4",
    "select.min_short_side=64",
    "aesthetic.enabled=false",
    "select.min_aesthetic=null",
    "watermark.enabled=false",
    "select.max_watermark=null",
    "select.max_watermark_static=null",
    "ocr.enabled=false",
    "select.max_ocr_area=null",
]
CROPS = ACCEPTED_THUMBS_PER_GROUP + 3  # one (kind, bucket) with more samples than the gallery


@pytest.fixture(scope="module")
def curated(tmp_path_factory, ray_session):
    """A real curation run over a manifest: CROPS same-size photos (one group larger than the
    gallery bound), another photo, an edit pair that passes and an identical one that does
    not, a header-only mp4 (FFmpeg's errno text) and a missing file."""
    from catalog.index import read_index
    from catalog.store import Catalog
    from core.config import load_config
    from curation.config import CurationConfig
    from curation.pipeline import run_curation

    work = tmp_path_factory.mktemp("real")
    media = work / "media"
    media.mkdir()
    data = Path(__file__).resolve().parent.parent / "data"
    lines = []
    astronaut = Image.open(data / "astronaut.png").convert("RGB")
    for i in range(CROPS):
        astronaut.crop((i * 10, 0, i * 10 + 384, 384)).resize((256, 256)).save(
            media / f"astro_{i:02d}.jpg", quality=90
        )
        lines.append({"uri": f"astro_{i:02d}.jpg", "caption": f"astronaut crop {i}"})
    Image.open(data / "chelsea.png").convert("RGB").save(media / "chelsea.jpg", quality=90)
    lines.append({"uri": "chelsea.jpg"})
    coffee = Image.open(data / "coffee.png").convert("RGB").resize((300, 200))
    coffee.save(media / "edit_src.png")
    edited = coffee.copy()
    edited.paste((220, 20, 20), (40, 40, 140, 140))
    edited.save(media / "edit_tgt.png")
    coffee.save(media / "same_tgt.png")
    lines.append(
        {"source": "edit_src.png", "target": "edit_tgt.png", "instruction": "add a red square"}
    )
    lines.append(
        {"source": "edit_src.png", "target": "same_tgt.png", "instruction": "leave it unchanged"}
    )
    mp4 = (data / "counter.mp4").read_bytes()
    assert mp4[4:8] == b"ftyp"
    (media / "broken.mp4").write_bytes(mp4[: int.from_bytes(mp4[:4], "big")])  # ftyp box only
    lines += [{"uri": "broken.mp4"}, {"uri": "gone.jpg"}]
    manifest = media / "inputs.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))

    cat = Catalog(f"sqlite:///{work / 'catalog.db'}")
    cfg = load_config(CurationConfig, None, RUN_SETTINGS)
    result = run_curation(str(manifest), work / "out", cfg, catalog=cat)
    rows = read_index(str(work / "out" / "index")).to_pylist()
    return {"result": result, "rows": rows, "out": work / "out", "page": _tiles(result.report)}


def test_a_real_run_writes_accepted_thumbnails_within_the_bound(curated):
    rows, out = curated["rows"], curated["out"]
    accepted: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] == "accepted":
            accepted.setdefault(thumb_group(r["kind"], r["bucket"]), []).append(r["key"])
    assert max(len(v) for v in accepted.values()) == CROPS  # the crops: one larger group
    folders = {p.name: p for p in (out / "_thumbs" / "accepted").iterdir()}
    assert set(folders) == set(accepted)
    for group, keys in accepted.items():
        names = {p.name for p in folders[group].iterdir()}
        kept = sorted(keys)[:ACCEPTED_THUMBS_PER_GROUP]
        expected = {f"{k}.jpg" for k in kept}
        if group.startswith("image_edit"):
            expected |= {f"{k}.target.jpg" for k in kept}
        assert names == expected, group


def test_a_real_run_report_has_the_accepted_gallery(curated):
    rows, page = curated["rows"], curated["page"]
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        if r["status"] == "accepted":
            groups.setdefault((r["kind"], r["bucket"]), []).append(r["key"])
    gallery = page.in_sections("accepted-")
    shown: dict[str, list[str]] = {}
    for t in gallery:
        shown.setdefault(t["section"], []).append(t["key"])
        assert t["imgs"] and all(i["src"].startswith("data:image/jpeg;base64,") for i in t["imgs"])
    # every group, its smallest keys up to the bound, in key order
    assert sorted(shown.values()) == sorted(
        sorted(keys)[:ACCEPTED_THUMBS_PER_GROUP] for keys in groups.values()
    )
    assert len(gallery) < sum(len(v) for v in groups.values())  # the bound did apply
    crops = [t for t in gallery if "astronaut crop" in t["text"]]
    assert len(crops) == ACCEPTED_THUMBS_PER_GROUP


def test_a_real_run_report_shows_both_sides_of_edit_pairs(curated):
    page = curated["page"]
    edits = [
        t
        for t in page.tiles
        if "add a red square" in t["text"] or "leave it unchanged" in t["text"]
    ]
    assert len(edits) == 2
    for t in edits:
        assert t["pair"] and [i["alt"].split()[0] for i in t["imgs"]] == ["source", "target"]
        assert t["imgs"][0]["src"] != t["imgs"][1]["src"] or "leave it unchanged" in t["text"]
    (good,) = [t for t in edits if "add a red square" in t["text"]]
    (same,) = [t for t in edits if "leave it unchanged" in t["text"]]
    assert good["section"].startswith("accepted-image_edit")
    assert same["section"].startswith("rejected-identical_pair")


def test_a_real_run_report_lists_thresholds_of_the_stages_that_ran(curated):
    summary, page = curated["result"].summary, curated["page"]
    assert {"aesthetic", "watermark", "ocr"} <= set(summary["stages_skipped"])
    assert "motion" in summary["stages_run"] and "probe" in summary["stages_run"]
    assert set(_threshold_rows(page)) == {
        "min_short_side",
        "min_aspect",
        "max_aspect",
        "min_motion",
        "max_motion",
    }
    text = curated["result"].report.read_text()
    assert "max_ocr_area <span>(ocr skipped: ocr.enabled is false)</span>" in text


def test_a_real_run_report_shows_error_reasons_without_errno(curated):
    page = curated["page"]
    errors = page.in_sections("error-")
    reasons = [li for t in errors for li in t["reasons"]]
    assert any("[Errno" in (li["title"] or "") for li in reasons)  # the raw text is kept
    assert reasons and not any("[Errno" in li["text"] for li in reasons)
    (broken,) = [t for t in errors if "broken.mp4" in t["text"]]
    assert "Invalid data found when processing input: broken.mp4" in broken["reasons"][0]["text"]
    (gone,) = [t for t in errors if "gone.jpg" in t["text"]]
    assert gone["reasons"][0]["text"] == "not_found: gone.jpg"
    assert gone["reasons"][0]["title"].endswith("/gone.jpg")


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
