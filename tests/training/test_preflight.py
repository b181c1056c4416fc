"""The data check before training: a real SQLite catalog and real shards with buckets smaller
than the world size and samples without captions; ``train plan`` / ``train run`` through the
installed console script."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli

from catalog.index import write_index_part
from catalog.schema import rows_to_table
from catalog.shards import ShardWriter, bucket_name, sample_json
from core.config import validate
from training.models.registry import build_model
from training.preflight import DataCheckError, check_data, run_check
from training.recipe import Recipe

WORLD = 2
# 768 latent tokens per rank; at 4096 px (sf 8): a 16:9 image is 6 x 11 = 66 tokens (batch
# 11), a square 8 x 8 = 64 (batch 12), a square edit 2 x 64 (batch 6), 9 frames 3 x 66 (3)
STAGE = {
    "trainable": ["adapter"],
    "optimizer": {"lr": 1e-4},
    "frame_area": 4096,
    "token_budget": 768,
    "steps": 4,
    "checkpoint_every": 2,
}
RECIPE = {
    "name": "check",
    "workers": WORLD,
    "model": {"family": "omni_video", "size": "tiny"},
    # no held-out split: the bucket counts below are every sample (the split's counts:
    # tests/training/test_heldout.py)
    "data": {
        "main": {"uri": "catalog://small@latest", "holdout": None},
        "gone": {"uri": "catalog://nope@latest"},
    },
    "stages": [
        {
            "name": "first",
            **STAGE,
            "tasks": {
                "t2i": {"weight": 1, "data": "main"},
                "t2v": {"weight": 1, "data": "main", "num_frames": 9},
                "i2i_edit": {"weight": 1, "data": "main"},
                "v2v_edit": {"weight": 1, "data": "main", "num_frames": 9},
            },
        },
        {"name": "second", **STAGE, "tasks": {"t2i": {"weight": 1, "data": "gone"}}},
    ],
}


NO_SPLIT = (
    "data 'main' has no held-out split (holdout: null or fraction 0): evaluation reads training "
    "samples"
)


def row(key: str, kind: str, w: int, h: int, frames: int = 1, **text) -> dict:
    return {
        "key": key,
        "kind": kind,
        "source_uri": f"/raw/{key}",
        "status": "accepted",
        "reasons": [],
        "width": w,
        "height": h,
        "num_frames": frames,
        "fps": 24.0 if frames > 1 else None,
        "bucket": bucket_name(w, h, frames),
        **({"target_uri": f"/raw/{key}-tgt"} if kind.endswith("_edit") else {}),
        **text,
    }


def small_rows() -> list[dict]:
    """t2i: 16:9 images (6, one without caption) and one square image; t2v: one 16:9 clip;
    i2i_edit: three square edits without instruction; no video edit."""
    rows = [row(f"wide{i}", "image", 160, 90, caption=f"wide {i}" if i else None) for i in range(6)]
    rows.append(row("square0", "image", 96, 96, caption="square"))
    rows.append(row("clip0", "video", 160, 90, frames=24, recaption="a clip"))
    rows += [row(f"edit{i}", "image_edit", 96, 96) for i in range(3)]
    return rows


def write_version(cat, root: Path, name: str, rows: list[dict]):
    """``rows`` as a committed catalog version: bucketed shards (a ``txt`` member as the curation
    sink writes it) and the index. Media members are placeholders: the check decodes nothing."""
    with ShardWriter(str(root), prefix="p0", max_samples=100) as writer:
        for r in rows:
            text = r.get("recaption") or r.get("instruction") or r.get("caption") or ""
            members = {"json": sample_json(r), "txt": text.encode(), "jpg": b"not decoded"}
            r["shard"] = writer.write(r["bucket"], r["key"], members)
    write_index_part(rows_to_table(rows), root / "index", "part-0")
    v = cat.begin_version(name, root_uri=str(root), config_hash="h")
    cat.add_shards(v.id, writer.finished)
    return cat.commit_version(v.id, str(root / "index"))


@pytest.fixture
def small(cat, tmp_path):
    return write_version(cat, tmp_path / "small", "small", small_rows())


def geometry():
    return build_model("omni_video", "tiny").geometry


def test_every_problem_is_named_with_its_stage_task_and_bucket(cat, small):
    recipe = validate(Recipe, RECIPE)
    check = check_data(recipe, world_size=WORLD, geometry=geometry(), catalog=cat)
    found = {(p.severity, p.stage, p.task, p.bucket, p.data): p.message for p in check.problems}
    assert sorted(p.code for p in check.problems) == sorted(
        ["unreadable", "no_bucket", "missing_text", "no_samples"]
        + ["partial_batch", "bucket_left_out", "missing_text", "partial_batch"]
    )
    assert len(found) == len(check.problems) == 8, check.problems

    (gone,) = [m for k, m in found.items() if k[4] == "gone"]
    assert gone == (
        "catalog://nope@latest cannot be read (dataset 'nope' is not in the catalog); "
        "read by stage 2 (second)"
    )
    # the one clip: no bucket has a sample per worker, which is what stopped training before
    t2v = found[("error", "1 (first)", "t2v", None, None)]
    assert t2v.startswith("no bucket can be drawn on 2 workers: a bucket needs at least one")
    assert "9x48x88 has 1" in t2v and "--workers" in t2v
    edits = found[("warning", "1 (first)", "i2i_edit", None, "main")]  # empty text trains
    assert edits.startswith("none of its 3 image_edit samples has an instruction")
    assert edits.endswith(
        "it trains on empty text; recaption the data or give instructions in a manifest"
    )
    assert (
        "has no accepted video_edit sample"
        in found[("error", "1 (first)", "v2v_edit", None, "main")]
    )
    wide = found[("warning", "1 (first)", "t2i", "1x48x88", None)]
    assert (
        wide
        == "6 sample(s), fewer than a full batch on every worker (2 x 11 = 22): its batches repeat samples"
    )
    assert found[("warning", "1 (first)", "t2i", "1x64x64", None)].startswith(
        "1 sample(s), fewer than the 2 workers (one each): no rank draws it"
    )
    wide_text = ("warning", "1 (first)", "t2i", None, "main")
    assert found[wide_text].startswith("1 of 7 image samples have no caption")
    assert found[("warning", "1 (first)", "i2i_edit", "1x64x64", None)].startswith(
        "3 sample(s), fewer than a full batch on every worker (2 x 6 = 12)"
    )
    counts = {(b.task, b.bucket): (b.samples, b.batch, b.drawable) for b in check.buckets}
    assert counts == {
        ("t2i", "1x48x88"): (6, 11, True),
        ("t2i", "1x64x64"): (1, 12, False),
        ("t2v", "9x48x88"): (1, 3, False),
        ("i2i_edit", "1x64x64"): (3, 6, True),
    }

    with pytest.raises(DataCheckError) as error:
        check.raise_for_errors()
    message = str(error.value)
    assert message.startswith(
        "the data of recipe 'check' cannot feed it on 2 worker(s): 3 error(s), 5 warning(s)"
    )
    lines = message.splitlines()[1:]
    assert lines == [f"  - {p}" for p in check.errors] + [
        "  - warning: stage 1 (first), task t2i, data 'main': " + found[wide_text],
        "  - warning: stage 1 (first), task i2i_edit, data 'main': " + edits,
        "  - warning: 1 bucket(s) left out (fewer samples than workers; 1 sample(s)); 2 bucket(s) "
        "smaller than a full batch (samples repeat)",
    ]

    # on one worker every bucket can be drawn: what is left is the data itself
    one = check_data(recipe, world_size=1, geometry=geometry(), catalog=cat)
    assert sorted(p.code for p in one.errors) == ["no_samples", "unreadable"]
    assert all(b.drawable for b in one.buckets)


def test_enough_data_passes_and_warnings_are_summed_up_for_train_run(cat, tmp_path):
    rows = [row(f"wide{i}", "image", 160, 90, caption=f"wide {i}") for i in range(22)]
    write_version(cat, tmp_path / "ok", "small", rows)
    data = copy.deepcopy(RECIPE)
    data["stages"] = data["stages"][:1]
    data["stages"][0]["tasks"] = {"t2i": {"weight": 1, "data": "main"}}
    recipe = validate(Recipe, data)
    check = check_data(recipe, world_size=WORLD, geometry=geometry(), catalog=cat)
    assert check.problems == [] and check.notes == [NO_SPLIT]  # 22 = 2 workers x 11
    assert [(b.bucket, b.samples, b.batch) for b in check.buckets] == [("1x48x88", 22, 11)]

    rows += [row("square0", "image", 96, 96, caption="square"), row("wide22", "image", 160, 90)]
    write_version(cat, tmp_path / "more", "small", rows)  # small@2, the new latest
    said: list[str] = []
    check = run_check(recipe, world_size=WORLD, catalog=cat, stages=None, say=said.append)
    assert said == [
        "data check on 2 worker(s): 1 bucket(s) left out (fewer samples than workers; 1 sample(s)); "
        "1 task(s) with samples lacking text: stage 1 (first) t2i; `omniforge train plan` shows "
        "each",
        f"data check: {NO_SPLIT}",
    ]


def test_shard_paths_are_checked_from_their_txt_members(tmp_path, monkeypatch):
    """Path data (no index): captions come from the shards' txt members, as training reads them;
    the shards are opened once for the texts of all the tasks that read them."""
    import training.preflight as preflight

    rows = [row(f"sq{i}", "image", 96, 96, caption="x" if i < 2 else None) for i in range(4)]
    rows += [row(f"ed{i}", "image_edit", 96, 96, instruction="y" if i else None) for i in range(3)]
    with ShardWriter(str(tmp_path / "shards"), prefix="p", max_samples=3) as writer:
        for r in rows:
            text = (r.get("caption") or r.get("instruction") or "").encode()
            media = (
                {"src.jpg": b"x", "tgt.jpg": b"x"} if r["kind"] == "image_edit" else {"jpg": b"x"}
            )
            writer.write(
                r["bucket"],
                r["key"],
                {"json": sample_json({"kind": r["kind"]}), "txt": text, **media},
            )
    opened: list[str] = []

    def open_shard(uri):  # the real reader, noting each opening
        opened.append(uri)
        return real_open(uri)

    real_open = preflight.open_shard
    monkeypatch.setattr(preflight, "open_shard", open_shard)
    data = copy.deepcopy(RECIPE)
    data["data"] = {"main": {"uri": str(tmp_path / "shards")}}
    data["stages"][0]["tasks"] = {"t2i": {"weight": 1, "data": "main"},
                                  "i2i_edit": {"weight": 1, "data": "main"}}  # fmt: skip
    data["stages"][1]["tasks"] = {"image_understanding": {"weight": 1, "data": "main"}}
    check = check_data(validate(Recipe, data), world_size=1, geometry=None)
    assert [str(p) for p in check.problems] == [
        "warning: stage 1 (first), task t2i, data 'main': 2 of 4 image samples have no caption "
        "(the condition it generates from; recaption / instruction / caption in the index, or a "
        "txt member)",
        "warning: stage 1 (first), task i2i_edit, data 'main': 1 of 3 image_edit samples have no "
        "instruction (the condition it generates from; recaption / instruction / caption in the "
        "index, or a txt member)",
        "warning: stage 2 (second), task image_understanding, data 'main': 2 of 4 image samples "
        "have no caption (the text it learns to write; recaption / instruction / caption in the "
        "index, or a txt member; or a conversation)",
    ]
    assert len(writer.finished) > 1 and sorted(opened) == sorted(s.uri for s in writer.finished)
    assert check.notes and "bucket sizes not checked" in check.notes[0]  # no geometry given


def test_train_run_refuses_before_any_run_starts(cat, small, tmp_path):
    from mlflow.tracking import MlflowClient

    from training.runner import run_training

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = validate(Recipe, RECIPE)
    with pytest.raises(DataCheckError, match="3 error"):
        run_training(recipe, tmp_path / "out", catalog=cat, tracking_uri=tracking)
    assert not (tmp_path / "out").exists()  # nothing written
    assert cat.list_runs(kind="training_stage") == []
    assert MlflowClient(tracking).search_experiments()[0].name == "Default"  # no run anywhere
    assert MlflowClient(tracking).search_runs(["0"]) == []


def test_train_run_trains_on_the_version_it_checked(cat, tmp_path):
    """``catalog://small@latest`` is read once, before the check: a version committed while the
    check runs (here: as it reports its warning) is neither checked nor trained on."""
    from training.runner import run_training

    rows = [row(f"wide{i}", "image", 160, 90, caption=f"wide {i}") for i in range(22)]
    rows.append(row("wide22", "image", 160, 90))  # no caption: the check warns
    checked = write_version(cat, tmp_path / "v1", "small", rows)

    class Console:
        """Prints lines; a curation job commits small's next version during the check's."""

        lines: list[str] = []

        def print(self, text: str, **kwargs) -> None:
            self.lines.append(text)
            if text.startswith("data check on"):
                write_version(cat, tmp_path / "v2", "small", rows[:22])

    data = copy.deepcopy(RECIPE)
    data["data"] = {"main": {"uri": "catalog://small@latest", "holdout": None}}
    for stage in data["stages"]:
        stage["tasks"] = {"t2i": {"weight": 1, "data": "main"}}
    console = Console()
    # stage 2 alone, without stage 1's weights: it stops after writing its recipe, before Ray
    with pytest.raises(ValueError, match="run the earlier stages first"):
        run_training(validate(Recipe, data), tmp_path / "out", stages=[1], catalog=cat,
                     console=console)  # fmt: skip
    assert console.lines[0].startswith("data check on 2 worker(s): 1 task(s) with samples lacking")
    assert cat.get_version("small").version == checked.version + 1  # committed meanwhile
    written = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert written["data"]["main"]["uri"] == checked.ref


# -- the CLI ------------------------------------------------------------------------------------


def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return path


def test_train_plan_prints_every_problem_and_exits_2(small, catalog_url, tmp_path):
    out = cli("train", "plan", str(recipe_file(tmp_path)), "--catalog", catalog_url)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    for expected in [
        "error: data 'gone': catalog://nope@latest cannot be read (dataset 'nope' is not in",
        "error: stage 1 (first), task t2v: no bucket can be drawn on 2 workers",
        "warning: stage 1 (first), task i2i_edit, data 'main': none of its 3 image_edit samples",
        "error: stage 1 (first), task v2v_edit, data 'main': catalog://small@1 has no accepted",
        "warning: 1 bucket(s) left out (fewer samples than workers; 1 sample(s)); 2 bucket(s) "
        "smaller than a full batch (samples repeat): see the note column above",
    ]:
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert lines[-1] == "data check: 3 error(s), 5 warning(s); `train run` refuses to start"
    assert "stage 1 (first) data on 2 worker(s)" in out.stdout  # the bucket table
    # the memory estimate per GPU rank, one row per stage, before the data check
    memory = out.stdout.split("memory per GPU rank on 2 worker(s), bf16 weights")[1]
    assert "no GPU found to compare against" in memory or torch.cuda.is_available()
    rows = [line.split("│")[1:-1] for line in memory.splitlines() if "│ 1 first" in line]
    assert [cell.strip() for cell in rows[0][:3]] == ["1 first", "1", "no"]
    assert "│ 2 second" in memory
    rows = [line.split("│")[1:-1] for line in out.stdout.splitlines() if "│ t2i " in line]
    assert [" ".join(cell.split()) for cell in rows[-1]] == [
        "t2i", "1x64x64", "1", "0", "12", "24", "left out: fewer samples than the 2 workers"
    ]  # fmt: skip


def test_train_run_reports_the_data_problems_as_one_error(small, catalog_url, tmp_path):
    out = cli(
        "train", "run", str(recipe_file(tmp_path)), "--catalog", catalog_url,
        "--output", str(tmp_path / "run"),
    )  # fmt: skip
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: the data of recipe 'check' cannot feed it on 2 worker(s)")
    assert len(lines) == 1 + 6 and all(line.startswith("  - ") for line in lines[1:]), lines
    assert not (tmp_path / "run").exists()
