"""A LLaVA-style conversation corpus through the real pipeline: records -> rows -> shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalog.index import read_index
from catalog.schema import count_by_status, validate_table
from catalog.shards import iter_shard
from catalog.store import Catalog
from core.config import load_config
from curation.config import CurationConfig
from curation.pipeline import reselect, run_curation
from curation.sources import list_inputs

DATA = Path(__file__).resolve().parents[1] / "data"
SETTINGS = [
    "select.min_short_side=64",
    "block_size=4",
    "name=qa",
    "ocr.enabled=false",
    "select.max_ocr_area=null",
]


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def qa(q: str, a: str) -> list[dict]:
    return [turn("human", q), turn("gpt", a)]


# record index -> (expected status, reason tag or None)
EXPECTED = {
    0: ("accepted", None),
    1: ("accepted", None),
    2: ("accepted", None),
    3: ("accepted", None),
    4: ("error", "not_found"),
    5: ("error", "conversation_error"),
    6: ("rejected", "text_only"),
    7: ("error", "conversation_error"),
    8: ("error", "kind_mismatch"),
    9: ("rejected", "too_small"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    for name in ("astronaut.png", "chelsea.png"):
        shutil.copy(DATA / name, root / "images" / name)
    shutil.copy(DATA / "cockatoo_9s.mp4", root / "bird.mp4")
    shutil.copy(DATA / "coffee.png", root / "images" / "unreferenced.png")
    tiny = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(tiny).save(root / "images" / "tiny.png")
    records = [
        {
            "id": "a",
            "image": "images/astronaut.png",
            "conversations": qa("<image>\nWho?", "An astronaut."),
        },
        {
            "id": "b",
            "image": "images/chelsea.png",
            "conversations": qa("What animal is this?\n<image>", "A cat.")
            + qa("What colour is it?", "Orange and black."),
        },
        {"id": "c", "image": "images/astronaut.png", "conversations": qa("Suit colour?", "White.")},
        {"id": "d", "video": "bird.mp4", "conversations": qa("<video>\nWhat bird?", "A cockatoo.")},
        {"id": "e", "image": "images/nope.png", "conversations": qa("<image>\nWhat?", "Nothing.")},
        {"id": "f", "image": "images/chelsea.png", "conversations": [turn("gpt", "A cat.")]},
        {"id": "g", "conversations": qa("Hello?", "Hi.")},
        {"id": "h", "image": "images/chelsea.png", "conversations": qa("What?", "<image> a cat")},
        {"id": "i", "video": "images/chelsea.png", "conversations": qa("<video>\nWhat?", "A cat.")},
        {"id": "j", "image": "images/tiny.png", "conversations": qa("<image>\nWhat?", "Noise.")},
    ]
    (root / "llava.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def curated(corpus, tmp_path_factory, ray_session):
    work = tmp_path_factory.mktemp("curated")
    cat = Catalog(f"sqlite:///{work / 'catalog.db'}")
    cfg = load_config(CurationConfig, None, SETTINGS)
    result = run_curation(str(corpus / "llava.json"), work / "out", cfg, catalog=cat)
    return result, read_index(str(work / "out" / "index")), cat


def by_record(index) -> dict[int, dict]:
    out = {}
    for row in index.to_pylist():
        where = row["record_uri"] or row["source_uri"]
        out[int(where.rsplit("#", 1)[1])] = row
    return out


def test_every_record_ends_accepted_rejected_or_error_with_its_reason(corpus, curated):
    result, index, _ = curated
    assert validate_table(index) == []
    rows = by_record(index)
    assert set(rows) == set(EXPECTED)  # one row per record; the unreferenced image is no input
    for i, (status, tag) in EXPECTED.items():
        row = rows[i]
        assert row["status"] == status, (i, row["reasons"])
        if tag is not None:
            assert any(r.startswith(tag) for r in row["reasons"]), (i, row["reasons"])
    assert count_by_status(index) == {"accepted": 4, "rejected": 2, "error": 4}
    assert result.version.counts == {"accepted": 4, "rejected": 2, "error": 4}
    # reasons name the file and the record
    assert f"{corpus / 'llava.json'} record 5 (id 'f')" in rows[5]["reasons"][0]
    assert "images/nope.png" in rows[4]["reasons"][0] and "record 4" in rows[4]["reasons"][0]


def test_the_conversation_is_kept_in_the_index_and_the_shard(corpus, curated):
    result, index, cat = curated
    rows = by_record(index)
    assert rows[1]["num_turns"] == 4 and [t["from"] for t in rows[1]["conversation"]] == [
        "human",
        "gpt",
        "human",
        "gpt",
    ]
    assert rows[0]["key"] != rows[2]["key"]  # two records about one image: two samples
    video = rows[3]
    assert video["kind"] == "video" and video["span"] is None  # never cut into scenes
    seen = {}
    for shard in cat.shards(result.version.id):
        for key, members in iter_shard(shard.uri):
            seen[key] = json.loads(members["json"])
    accepted = {r["key"]: r for r in rows.values() if r["status"] == "accepted"}
    assert set(seen) == set(accepted)
    for key, meta in seen.items():
        assert meta["conversation"] == accepted[key]["conversation"]


def test_a_folder_reads_the_conversation_file_and_kind_conversation_rejects_other_media(corpus):
    auto = list_inputs(str(corpus), "auto")
    records = [r for r in auto if r.get("record_uri") or "#" in r["source_uri"]]
    assert len(records) == len(EXPECTED)
    plain = {Path(r["source_uri"]).name for r in auto if r not in records}
    assert plain == {"unreferenced.png"}  # media the records name are not listed twice
    strict = list_inputs(str(corpus), "conversation")
    (extra,) = [r for r in strict if Path(r["source_uri"]).name == "unreferenced.png"]
    assert extra["status"] == "rejected" and extra["reasons"][0].startswith("not_referenced")


def test_broken_files_and_lines_are_error_rows(tmp_path):
    (tmp_path / "a.png").write_bytes((DATA / "camera.png").read_bytes())
    good = {"image": "a.png", "conversations": qa("<image> x", "y")}
    (tmp_path / "qa.jsonl").write_text(json.dumps(good) + "\n{broken\n[1]\n")
    rows = sorted(
        list_inputs(str(tmp_path / "qa.jsonl"), "conversation"), key=lambda r: r["source_uri"]
    )
    statuses = [(r["status"], (r["reasons"] or [""])[0].split(":")[0]) for r in rows]
    assert statuses.count(("error", "conversation_error")) == 2
    assert (None, "") in statuses
    (tmp_path / "bad.json").write_text("{not json")
    (row,) = list_inputs(str(tmp_path / "bad.json"), "conversation")
    assert row["status"] == "error" and str(tmp_path / "bad.json") in row["reasons"][0]


def test_select_keeps_conversations_from_the_index(curated, tmp_path):
    """Score once, select many: a new threshold re-selects from the index, and the new
    version's shards carry the conversations (the index is their record)."""
    result, index, cat = curated
    cfg = load_config(CurationConfig, None, [*SETTINGS, "select.min_short_side=16"])
    again = reselect(
        result.version.root_uri, tmp_path / "out", cfg, catalog=cat, parent=result.version
    )
    assert again.version.counts == {"accepted": 5, "rejected": 1, "error": 4}
    rows = by_record(read_index(str(tmp_path / "out" / "index")))
    tiny = rows[9]
    assert tiny["status"] == "accepted" and tiny["num_turns"] == 2
    found = {}
    for shard in cat.shards(again.version.id):
        for key, members in iter_shard(shard.uri):
            found[key] = json.loads(members["json"])["conversation"]
    assert found[tiny["key"]] == tiny["conversation"]
