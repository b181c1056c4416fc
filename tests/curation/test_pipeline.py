"""End to end: the generated corpus through real Ray Data, real stages, shards, index, catalog."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import small_corpus

from catalog.index import read_index
from catalog.records import Node
from catalog.schema import make_key, validate_table
from catalog.shards import iter_shard, sha256_file
from catalog.store import Catalog
from core.config import load_config
from curation.config import CurationConfig
from curation.pipeline import dedup, reselect, run_curation

DATA = Path(__file__).resolve().parents[1] / "data"

# Small synthetic media: lower the size floor so the other checks are what decides.
TEST_SETTINGS = [
    "select.min_short_side=64",
    "block_size=4",
    "name=corpus",
]


@pytest.fixture(scope="module")
def curated(corpus, tmp_path_factory, ray_session):
    root, labels = corpus
    work = tmp_path_factory.mktemp("curated")
    cat = Catalog(f"sqlite:///{work / 'catalog.db'}")
    cfg = load_config(CurationConfig, None, TEST_SETTINGS)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    result = run_curation(str(root), work / "out", cfg, catalog=cat, tracking_uri=tracking)
    index = read_index(str(work / "out" / "index"))
    return result, index, cat, work


def by_key(index) -> dict[str, dict]:
    return {r["key"]: r for r in index.to_pylist()}


def label_key(root: Path, label: dict) -> str:
    if label["kind"] in ("image_edit", "video_edit"):
        return make_key(str(root / label["source"]), target_uri=str(root / label["target"]))
    return make_key(str(root / label["path"]))


def rows_of(rows: dict[str, dict], key: str) -> list[dict]:
    """The row of an input, or its clip rows (videos are split)."""
    return [r for r in rows.values() if r["key"] == key or r.get("parent_key") == key]


def test_every_input_is_accounted_for(corpus, curated):
    root, labels = corpus
    result, index, cat, _ = curated
    assert validate_table(index) == []
    rows = by_key(index)
    inputs = {r.get("parent_key") or r["key"] for r in rows.values()}
    assert inputs == {label_key(root, lab) for lab in labels}
    counts = result.version.counts
    assert counts["accepted"] + counts["rejected"] + counts["error"] == index.num_rows
    assert result.summary["inputs"] == len(labels)
    assert result.version.status == "committed"
    assert cat.get_version("corpus", "latest") == result.version


def test_bad_files_become_error_rows_and_mislabelled_files_are_detected(corpus, curated):
    root, labels = corpus
    rows = by_key(curated[1])
    for lab in labels:
        if lab["kind"] in ("image_edit", "video_edit"):
            continue
        found = rows_of(rows, label_key(root, lab))
        assert found, lab["path"]
        if lab["expect"] == "error":
            assert [r["status"] for r in found] == ["error"], lab["path"]
            assert found[0]["reasons"], lab["path"]
        else:
            assert all(r["status"] != "error" for r in found), (lab["path"], found[0]["reasons"])
            assert {r["kind"] for r in found} == {lab["true_kind"] or lab["kind"]}, lab["path"]


def test_edit_pairs_pass_and_fail_as_labelled(corpus, curated):
    root, labels = corpus
    rows = by_key(curated[1])
    tag_for = {
        "identical": "identical_pair",
        "aspect_mismatch": "pair_aspect_mismatch",
        "no_instruction": "no_instruction",
        "kind_mismatch": "kind_mismatch",
    }
    edits = [lab for lab in labels if lab["kind"] in ("image_edit", "video_edit")]
    assert edits
    for lab in edits:
        (row,) = rows_of(rows, label_key(root, lab))
        tags = {r.split(":")[0] for r in row["reasons"]}
        expected = {tag_for[f] for f in lab["expect_pair_failures"] or []}
        pair_tags = tags & set(tag_for.values())
        assert pair_tags == expected, (lab["id"], row["reasons"])
        if lab["expect_pair_ok"]:
            assert row["target_width"] and row["target_height"]


def test_scores_separate_the_labelled_properties(corpus, curated):
    root, labels = corpus
    rows = by_key(curated[1])
    for lab in labels:
        if lab["expect"] != "valid" or lab["kind"] not in ("image", "video"):
            continue
        found = rows_of(rows, label_key(root, lab))
        tags = {r.split(":")[0] for row in found for r in row["reasons"]}
        if lab["kind"] == "image" and lab["true_kind"] == "image":
            text = max((row["ocr_area"] or 0) for row in found)
            assert (text > 0.02) == bool(lab["has_text"] or lab["has_watermark"]), lab["id"]
        if "too_small" in lab["expect_filtered"]:
            assert "too_small" in tags
        if "aspect_ratio" in lab["expect_filtered"]:
            assert "aspect_ratio" in tags
        if "too_short" in lab["expect_filtered"]:
            assert "too_short" in tags
    motion = {lab["motion"]: [] for lab in labels if lab.get("motion")}
    for lab in labels:
        if lab.get("motion") and lab["expect"] == "valid" and not lab["has_text"]:
            motion[lab["motion"]] += [r["motion"] for r in rows_of(rows, label_key(root, lab))]
    assert max(motion["static"]) < min(motion["slow"]) < max(motion["slow"]) < min(motion["fast"])


def test_the_labelled_near_duplicate_hashes_next_to_its_original(corpus, curated):
    """Every sample with frames carries one pHash per sampled frame; the corpus's re-encoded,
    downscaled copy is a few bits from its original and far from every other image."""
    from curation.stages.phash import hamming

    root, labels = corpus
    rows = by_key(curated[1])
    for row in rows.values():
        if row["status"] == "accepted":
            frames = 1 if row["kind"] in ("image", "image_edit") else 8
            assert row["phash"] and 1 <= len(row["phash"]) <= frames, row["key"]
            assert (row["target_phash"] is not None) == (
                row["kind"] in ("image_edit", "video_edit")
            )
    (dup,) = [lab for lab in labels if lab.get("duplicate_of")]
    [copy] = rows_of(rows, label_key(root, dup))
    [original] = rows_of(rows, make_key(str(root / dup["duplicate_of"])))
    assert hamming(copy["phash"][0], original["phash"][0]) <= 4
    others = [r for r in rows.values() if r["kind"] == "image" and r["phash"]]
    others = [r for r in others if r["key"] not in (copy["key"], original["key"])]
    assert others and min(hamming(copy["phash"][0], r["phash"][0]) for r in others) >= 12


def test_cut_video_is_split_at_the_labelled_cuts(corpus, curated):
    root, labels = corpus
    rows = by_key(curated[1])
    (lab,) = [lab for lab in labels if lab.get("cuts_s")]
    clips = sorted(rows_of(rows, label_key(root, lab)), key=lambda r: r["span"]["start"])
    starts = [c["span"]["start"] for c in clips]
    bounds = [0.0, *lab["cuts_s"]]
    assert len(starts) == len(bounds)
    for got, want in zip(starts, bounds, strict=True):
        assert abs(got - want) <= 2 / lab["fps"]
    # the index says how each end was found
    ends = [(c["boundaries"]["start"], c["boundaries"]["end"]) for c in clips]
    assert ends == [("video", "cut"), *[("cut", "cut")] * (len(clips) - 2), ("cut", "video")]


def test_shards_hold_exactly_the_accepted_samples(curated):
    result, index, cat, _ = curated
    accepted = {r["key"]: r for r in index.to_pylist() if r["status"] == "accepted"}
    seen = {}
    for shard in cat.shards(result.version.id):
        assert sha256_file(shard.uri) == shard.sha256
        for key, members in iter_shard(shard.uri):
            assert key not in seen
            seen[key] = members
            meta = json.loads(members["json"])
            assert meta["key"] == key and meta["bucket"] == shard.bucket
            assert "txt" in members
    assert set(seen) == set(accepted)
    for key, row in accepted.items():
        media = {k for k in seen[key] if k not in ("json", "txt")}
        if row["kind"] == "video":
            assert media == {"mp4"}
        elif row["kind"].endswith("_edit"):
            assert {m.split(".")[0] for m in media} == {"src", "tgt"}
        else:
            assert len(media) == 1


def test_report_is_written(curated):
    result = curated[0]
    html = result.report.read_text()
    assert "<html" in html and "text_overlay" in html


def test_the_mlflow_run_spans_the_work_and_logs_the_version(curated):
    from mlflow.tracking import MlflowClient

    result, _, cat, work = curated
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.end_time - run.info.start_time >= result.summary["elapsed_s"] * 1000
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == result.version.ref == run.data.tags["omniforge.catalog"]
    assert json.loads(dataset.dataset.source) == {"uri": result.version.index_uri}
    assert dataset.tags[0].value == "output"
    assert run.data.metrics["samples/accepted"] == result.summary["accepted"]
    assert run.data.metrics["inputs/total"] == result.summary["inputs"]
    assert cat.get_run(result.version.run_id).mlflow_run_id == result.mlflow_run_id


def test_select_changes_statuses_without_recomputing_scores(curated, tmp_path):
    result, index, cat, work = curated
    cfg = load_config(CurationConfig, work / "out" / "config.yaml", ["select.max_ocr_area=1.0"])
    new = reselect(work / "out", tmp_path / "v2", cfg, catalog=cat, parent=result.version)
    assert new.summary["stages_run"] == ["select", "encode"]
    assert new.version.version == 2 and new.version.parent_id == result.version.id
    old_rows, new_rows = by_key(index), by_key(read_index(str(tmp_path / "v2" / "index")))
    assert set(old_rows) == set(new_rows)
    flipped = 0
    for key, old in old_rows.items():
        row = new_rows[key]
        for score in ("ocr_area", "ocr_boxes", "motion", "edit_change"):
            assert row.get(score) == old.get(score)  # read back, not recomputed
        old_tags = {r.split(":")[0] for r in old["reasons"]}
        if old["status"] == "rejected" and old_tags == {"text_overlay"}:
            assert row["status"] == "accepted"
            flipped += 1
        elif old["status"] != "error":
            assert row["status"] == old["status"]
    assert flipped >= 2
    assert new.version.counts["accepted"] == result.version.counts["accepted"] + flipped
    up, _ = cat.lineage(Node("version", new.version.id))
    assert any(e.parent_label.startswith("catalog://corpus@1") for e in up)


def test_dedup_rejects_the_labelled_near_duplicate_and_nothing_else(corpus, curated, tmp_path):
    root, labels = corpus
    result, index, cat, work = curated
    cfg = load_config(CurationConfig, work / "out" / "config.yaml", [])
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    new = dedup(work / "out", tmp_path / "deduped", cfg, catalog=cat, parent=result.version,
                tracking_uri=tracking)  # fmt: skip
    assert new.summary["stages_run"] == ["select", "encode"]
    assert new.version.parent_id == result.version.id
    before, after = by_key(index), by_key(read_index(str(tmp_path / "deduped" / "index")))
    (dup,) = [lab for lab in labels if lab.get("duplicate_of")]
    [copy] = rows_of(after, label_key(root, dup))
    original = make_key(str(root / dup["duplicate_of"]))
    assert before[copy["key"]]["status"] == before[original]["status"] == "accepted"
    assert copy["status"] == "rejected" and copy["duplicate_of"] == original
    assert copy["reasons"] == [f"duplicate_of: {original}"]  # the larger original is kept
    changed = {k for k in after if after[k]["status"] != before[k]["status"]}
    assert changed == {copy["key"]}, [after[k]["reasons"] for k in changed]
    assert new.version.counts["accepted"] == result.version.counts["accepted"] - 1
    assert new.version.counts["rejected"] == result.version.counts["rejected"] + 1
    assert copy["duplicate_signal"].startswith("phash ")
    # the report pictures the group side by side: the kept original first
    page = new.report.read_text()
    group = page[page.index('id="duplicates"') :].split("</section>")[0]
    tiles = group.split('<div class="tile')[1:]
    assert [t.split('data-key="')[1][:40] for t in tiles] == [original, copy["key"]]
    assert tiles[0].startswith(' kept"') and group.count("<img") == 2
    # ... and the MLflow run holds it as one picture
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    (montage,) = client.list_artifacts(new.mlflow_run_id, "duplicates")
    assert montage.path == f"duplicates/01-{original[:16]}.jpg" and montage.file_size > 1000


def test_dedup_against_an_earlier_version_rejects_what_was_ingested_again(
    corpus, curated, tmp_path
):
    """A second corpus holding a re-encoded, downscaled copy of an accepted image of the first
    and a real photo the first does not have: deduplicated against the first version, the
    copy names the first version's sample and the new photo stays."""
    import cv2

    root, labels = corpus
    result, index, cat, work = curated
    before = by_key(index)
    photo = next(
        lab for lab in labels
        if lab["kind"] == "image" and not lab.get("duplicate_of")
        and before.get(label_key(root, lab), {}).get("status") == "accepted"
    )  # fmt: skip
    second = tmp_path / "second"
    second.mkdir()
    image = cv2.imread(str(root / photo["path"]))
    h, w = image.shape[:2]
    small = cv2.resize(image, (w * 3 // 4, h * 3 // 4), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(second / "reingested.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 50])
    (second / "astronaut.png").write_bytes((DATA / "astronaut.png").read_bytes())
    cfg = load_config(CurationConfig, None, [*TEST_SETTINGS[:-1], "name=second"])
    first_run = run_curation(str(second), tmp_path / "second-v1", cfg, catalog=cat)
    assert first_run.version.counts["accepted"] == 2
    deduped = dedup(tmp_path / "second-v1", tmp_path / "second-v2", cfg, catalog=cat,
                    parent=first_run.version, against=[result.version])  # fmt: skip
    rows = {
        Path(r["source_uri"]).name: r
        for r in read_index(str(tmp_path / "second-v2" / "index")).to_pylist()
    }
    kept = label_key(root, photo)
    assert rows["reingested.jpg"]["reasons"] == [f"duplicate_of: {kept}"]
    assert rows["astronaut.png"]["status"] == "accepted"
    assert deduped.version.counts == {**first_run.version.counts, "accepted": 1, "rejected": 1}
    up, _ = cat.lineage(Node("version", deduped.version.id))
    relations = {(e.parent_label.split(" ")[0], e.relation) for e in up}
    assert ("catalog://second@1", "input") in relations
    assert ("catalog://corpus@1", "against") in relations


def test_clip_scorers_run_in_actor_pools_with_local_weights(tmp_path, monkeypatch, ray_session):
    """profile full: aesthetic and watermark load tiny models from a local Hugging Face cache
    in their own Ray actors; the watermark actor reuses the aesthetic actor's embeddings."""
    import torch
    from tiny_models import CONFIGS, TINY_VIT, build_clip, laion_head_state, save_clip

    from curation.heads import AESTHETIC_HEAD, WatermarkHead, watermark_head_relative

    cache, models = tmp_path / "hub", tmp_path / "models"
    snap = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    save_clip(build_clip(TINY_VIT), snap / "open_clip_model.safetensors")
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIGS[TINY_VIT]}))
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    (models / AESTHETIC_HEAD).parent.mkdir(parents=True)
    torch.save(laion_head_state(CONFIGS[TINY_VIT]["embed_dim"]), models / AESTHETIC_HEAD)
    WatermarkHead(CONFIGS[TINY_VIT]["embed_dim"], TINY_VIT).save(
        models / watermark_head_relative(TINY_VIT)
    )
    raw = small_corpus(tmp_path / "raw")
    import cv2

    coffee = cv2.imread(str(raw / "coffee.png"))  # a downscaled JPEG copy: a semantic repeat
    cv2.imwrite(str(raw / "coffee-copy.jpg"), cv2.resize(coffee, (450, 300)))
    cfg = load_config(
        CurationConfig,
        None,
        [
            "profile=full",
            f"models_dir={models}",
            f"aesthetic.clip_model={TINY_VIT}",
            "aesthetic.clip_weights=hf-hub:org/tiny",
            "select.min_aesthetic=null",
            "select.max_watermark=null",
            "ocr.enabled=false",
            "select.max_ocr_area=null",
        ],
    )
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    result = run_curation(str(raw), tmp_path / "out", cfg, catalog=cat)
    rows = read_index(str(tmp_path / "out" / "index")).to_pylist()
    assert rows and all(0 <= r["aesthetic"] <= 10 and 0 <= r["watermark"] <= 1 for r in rows)
    assert {"aesthetic", "watermark"} <= set(result.summary["run"]["stages"])
    assert "clip_embedding" not in rows[0]  # a working column, never in the index
    # the semantic duplicate signal: each sample's mean CLIP embedding, unit length
    dim = CONFIGS[TINY_VIT]["embed_dim"]
    for r in rows:
        assert len(r["embedding"]) == dim
        assert abs(np.linalg.norm(np.asarray(r["embedding"], np.float32)) - 1) < 0.01
    # curate dedup on the embeddings alone (hash signal off) finds the copy and only the copy.
    # The tiny model's weights are random: it puts every picture at cosine 0.89-0.99 of every
    # other, so the threshold here is 0.995 (the copy: 1.0); tests/curation/test_dedup.py
    # checks the search itself
    only = {"max_bits": None, "cosine": 0.995}
    semantic = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update=only)})
    new = dedup(tmp_path / "out", tmp_path / "deduped", semantic, catalog=cat,
                parent=result.version)  # fmt: skip
    index = read_index(str(tmp_path / "deduped" / "index")).to_pylist()
    after = {Path(r["source_uri"]).name: r for r in index}
    copy, original = after["coffee-copy.jpg"], after["coffee.png"]
    pair = (copy["duplicate_of"], original["duplicate_of"])
    assert pair in {(original["key"], None), (None, copy["key"])}  # one kept, one named
    assert sum(r["duplicate_of"] is not None for r in index) == 1
    assert (copy["duplicate_signal"] or original["duplicate_signal"]).startswith("clip cosine")
    # the report shows the group, both pictured (from their sources: the first version kept
    # thumbnails of only some accepted samples)
    page = new.report.read_text()
    group = page[page.index('id="duplicates"') :].split("</section>")[0]
    assert group.count('class="tile') == 2 and group.count("<img") == 2
