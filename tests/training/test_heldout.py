"""The held-out split (training/data/holdout.py) through the real loaders, sources, preflight and
evaluation: a salted key hash, the same whatever the order, shard layout, worker count or
process; training never reads a held-out sample, evaluation reads only them; resume stays
exact; the data check counts both sides."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from catalog.index import write_index_part
from catalog.schema import rows_to_table
from catalog.shards import ShardWriter, bucket_name, sample_json
from core.config import validate
from training.artifacts import StageArtifacts
from training.data.holdout import (
    FLOOR_DIVISOR,
    HoldoutConfig,
    holdout_hash,
    plan_split,
)
from training.data.loaders import TaskLoader, build_task_loaders
from training.data.sources import resolve_data
from training.models.base import Geometry
from training.preflight import check_data
from training.recipe import DataConfig, Recipe, StageConfig
from training.tasks import task_spec

GEOM = Geometry(spatial_factor=16, temporal_factor=4, max_text_len=16)


def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level stand-in for a model tokenizer (L = 16)."""
    ids = torch.zeros(len(texts), 16, dtype=torch.int64)
    for i, t in enumerate(texts):
        b = list(t.encode())[:16]
        ids[i, : len(b)] = torch.tensor(b)
    return ids, (ids > 0).long()


def png(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(out, format="PNG")
    return out.getvalue()


AREA = 64 * 64
RULE = HoldoutConfig(fraction=0.2, salt="test-salt", min_samples=0)


def keys(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def held(rule: HoldoutConfig, names: list[str], kind: str = "image") -> set[str]:
    split = plan_split(rule, [(k, kind) for k in names])
    return {k for k in names if split.held_out(k, kind)}


# -- the rule --------------------------------------------------------------------------------


def test_split_ignores_order_and_process_and_follows_the_salt():
    names = keys(2000)
    first = held(RULE, names)
    assert first == held(RULE, list(reversed(names)))
    # another interpreter with another str hash seed: the same keys
    code = (
        "import json, sys; from training.data.holdout import holdout_hash; "
        "print(json.dumps([holdout_hash('test-salt', k) for k in json.load(sys.stdin)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(names),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert json.loads(out.stdout) == [holdout_hash("test-salt", k) for k in names]
    other = held(RULE.model_copy(update={"salt": "another"}), names)
    assert other != first and len(other ^ first) > len(first) // 2  # mostly other keys


def test_fraction_is_respected_on_many_keys():
    names = keys(20000)
    n = len(held(HoldoutConfig(fraction=0.02, min_samples=0), names))
    assert 400 - 5 * 20 < n < 400 + 5 * 20  # binomial: mean 400, sd ~20
    n = len(held(HoldoutConfig(fraction=0.3, min_samples=0), names))
    assert 6000 - 5 * 65 < n < 6000 + 5 * 65


@pytest.mark.parametrize("n, expected", [(9, 0), (50, 5), (200, 8)])
def test_min_samples_floor_takes_at_most_a_tenth(n, expected):
    """A tiny fraction alone holds out nothing here; the floor holds out min(8, n // 10), the
    keys with the smallest hashes, per kind."""
    rule = HoldoutConfig(fraction=1e-9, min_samples=8)
    names = keys(n)
    split = plan_split(rule, [(k, "image") for k in names] + [(k, "video") for k in keys(n, "v")])
    assert split.counts == {"image": (n - expected, expected), "video": (n - expected, expected)}
    hashes = sorted(holdout_hash(rule.salt, k) for k in names)
    chosen = {k for k in names if split.held_out(k, "image")}
    assert sorted(holdout_hash(rule.salt, k) for k in chosen) == hashes[:expected]
    assert FLOOR_DIVISOR == 10


def test_recipe_default_and_disabled_split():
    assert DataConfig(uri="/x").holdout == HoldoutConfig(
        fraction=0.02, salt="omniforge-holdout-v1", min_samples=8
    )
    assert DataConfig(uri="/x", holdout=None).holdout is None
    assert not HoldoutConfig(fraction=0).enabled
    with pytest.raises(ValueError, match="holdout.fraction"):
        validate(DataConfig, {"uri": "/x", "holdout": {"fraction": 1.0}})


# -- shards and loaders ----------------------------------------------------------------------


def write_images(root: Path, names: list[str], max_samples: int, prefix: str = "s") -> list[str]:
    """Square 32x32 PNG images, each with a caption, ``max_samples`` per shard."""
    with ShardWriter(str(root), prefix=prefix, max_samples=max_samples) as writer:
        for i, key in enumerate(names):
            row = {"key": key, "kind": "image", "status": "accepted", "width": 32, "height": 32,
                   "num_frames": 1, "fps": None}  # fmt: skip
            members = {"json": sample_json(row), "txt": f"card {key}".encode()}
            writer.write(bucket_name(32, 32, 1), key, {**members, "png": png(32, 32, (i, 9, 9))})
    return [s.uri for s in writer.finished]


NAMES = keys(60, "img")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> tuple[Path, Path]:
    """The same 60 images twice: 7 per shard in written order, 100 per shard reversed."""
    root = tmp_path_factory.mktemp("heldout")
    write_images(root / "a", NAMES, 7)
    write_images(root / "b", list(reversed(NAMES)), 100, prefix="other")
    return root / "a", root / "b"


def stage(**tasks) -> StageConfig:
    return StageConfig(name="s", trainable=["*"], optimizer={"lr": 1e-4}, frame_area=AREA,
                       token_budget=60, tasks=tasks or {"t2i": {"weight": 1, "data": "d"}},
                       steps=4, checkpoint_every=4)  # fmt: skip


def loaders(root: Path, part: str, rank: int = 0, world: int = 1, rule=RULE) -> TaskLoader:
    data = {"d": DataConfig(uri=str(root), holdout=rule)}
    return build_task_loaders(stage(), data, None, rank, world, 7, GEOM, tokenize, part=part)["t2i"]


def epoch(loader: TaskLoader) -> list[str]:
    """Every key of one epoch of each bucket of the loader (keys only: no decode needed)."""
    out = []
    with loader:
        for shape in loader.shapes:
            out += loader.next_batch(shape, loader.samples_per_epoch(shape)).keys
    return out


def test_training_never_reads_held_out_keys_and_evaluation_only_them(layouts):
    expected = held(RULE, NAMES)
    assert 0 < len(expected) < len(NAMES)
    for root in layouts:  # whatever the shard layout and order
        trained = epoch(loaders(root, "train", 0, 2)) + epoch(loaders(root, "train", 1, 2))
        assert sorted(trained) == sorted(set(NAMES) - expected)  # each once, none held out
        assert sorted(epoch(loaders(root, "eval"))) == sorted(expected)
        src = resolve_data(DataConfig(uri=str(root), holdout=RULE))
        assert src.split.counts == {"image": (len(NAMES) - len(expected), len(expected))}
        assert sum(src.counts_for("t2i", "eval").values()) == len(expected)
    # no split: evaluation reads the training samples, training reads everything
    assert sorted(epoch(loaders(layouts[0], "train", rule=None))) == sorted(NAMES)
    assert sorted(epoch(loaders(layouts[0], "eval", rule=None))) == sorted(NAMES)


def test_a_loader_scanning_its_shards_splits_the_same(layouts):
    """``TaskLoader`` without counts scans the shards itself and applies the rule too."""
    split = resolve_data(DataConfig(uri=str(layouts[1]), holdout=RULE)).split
    shards = sorted(str(p) for p in layouts[1].rglob("*.tar"))
    scanning = TaskLoader("t2i", shards, tokenize=tokenize, geometry=GEOM, frame_area=AREA,
                          token_budget=60, holdout=split.cut("image"), part="eval")  # fmt: skip
    assert sorted(epoch(scanning)) == sorted(held(RULE, NAMES))


def test_resume_is_exact_and_refuses_another_split(layouts):
    a = loaders(layouts[0], "train", 1, 2)
    (shape,) = a.shapes
    first = [a.next_batch(shape, 5).keys for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))
    rest = [a.next_batch(shape, 5).keys for _ in range(6)]  # into the next epoch
    b = loaders(layouts[0], "train", 1, 2)
    b.load_state_dict(state)
    assert [b.next_batch(shape, 5).keys for _ in range(6)] == rest
    assert b.state_dict() == a.state_dict() and a.state_dict()["streams"][str(shape)]["epoch"] >= 1
    assert not set(sum(first + rest, [])) & held(RULE, NAMES)
    other = loaders(layouts[0], "train", 1, 2, rule=RULE.model_copy(update={"salt": "x"}))
    with pytest.raises(ValueError, match="holdout"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="part"):
        loaders(layouts[0], "eval", 1, 2).load_state_dict(state)
    for lo in (a, b, other):
        lo.close()


# -- catalog data and the data check ---------------------------------------------------------


def image_row(key: str, aesthetic: float) -> dict:
    return {"key": key, "kind": "image", "source_uri": f"/raw/{key}", "status": "accepted",
            "reasons": [], "width": 32, "height": 32, "num_frames": 1, "fps": None,
            "bucket": bucket_name(32, 32, 1), "caption": f"card {key}",
            "aesthetic": aesthetic}  # fmt: skip


def commit(cat, root: Path, rows: list[dict], name: str = "cards"):
    with ShardWriter(str(root), prefix="c", max_samples=8) as writer:
        for r in rows:
            r["shard"] = writer.write(r["bucket"], r["key"], {"json": sample_json(r), "png": b"x"})
    write_index_part(rows_to_table(rows), root / "index", "part-0")
    v = cat.begin_version(name, root_uri=str(root), config_hash="h")
    cat.add_shards(v.id, writer.finished)
    return cat.commit_version(v.id, str(root / "index"))


def test_catalog_split_is_the_versions_whatever_the_filter(cat, tmp_path):
    rows = [image_row(k, float(i % 10)) for i, k in enumerate(NAMES)]
    commit(cat, tmp_path / "v", rows)
    rule = HoldoutConfig(fraction=0.02, salt="test-salt", min_samples=8)
    whole = resolve_data(DataConfig(uri="catalog://cards@1", holdout=rule), cat)
    expected = held(rule, NAMES)
    assert len(expected) == 6  # the floor: min(8, 60 // 10)
    assert whole.split.counts == {"image": (54, 6)}
    good = resolve_data(
        DataConfig(uri="catalog://cards@1", filter="aesthetic >= 5", holdout=rule), cat
    )
    kept = {r["key"] for r in rows if r["aesthetic"] >= 5}
    assert good.split.cutoffs == whole.split.cutoffs  # planned before the filter
    assert good.split.counts["image"][1] == len(expected & kept)
    assert sum(good.counts_for("t2i", "eval").values()) == len(expected & kept)
    assert sum(good.counts_for("t2i").values()) == len(kept - expected)


def recipe_for(uri: str, holdout: dict | None, **tasks) -> Recipe:
    return validate(
        Recipe,
        {
            "name": "heldout",
            "workers": 2,
            "model": {"family": "omni_video", "size": "tiny"},
            "data": {"d": {"uri": uri, "holdout": holdout}},
            "stages": [
                stage(**tasks).model_dump(mode="json") | {"token_budget": 768, "frame_area": 4096}
            ],
        },
    )


def test_preflight_counts_training_and_held_out_samples(cat, tmp_path):
    from training.preflight import model_geometry

    commit(cat, tmp_path / "v", [image_row(k, 5.0) for k in NAMES])
    rule = {"fraction": 0.2, "salt": "test-salt", "min_samples": 0}
    recipe = recipe_for("catalog://cards@1", rule, t2i={"weight": 1, "data": "d"},
                        image_understanding={"weight": 1, "data": "d"})  # fmt: skip
    check = check_data(recipe, world_size=2, geometry=model_geometry(recipe.model), catalog=cat)
    n = len(held(RULE, NAMES))
    assert check.errors == []
    assert check.task_counts == {("1 (s)", "t2i"): (60 - n, n),
                                 ("1 (s)", "image_understanding"): (60 - n, n)}  # fmt: skip
    assert [(b.task, b.samples, b.held_out) for b in check.buckets] == [
        ("t2i", 60 - n, n),
        ("image_understanding", 60 - n, n),
    ]
    assert check.splits["d"]["held_out"] == {"image": n}
    assert check.splits["d"]["train"] == {"image": 60 - n}
    assert check.splits["d"]["salt"] == "test-salt" and check.splits["d"]["fraction"] == 0.2


def test_preflight_refuses_a_task_left_without_training_data(cat, tmp_path):
    """Keys chosen so that the rule holds every one out (fraction 0.9): an error naming the
    setting; keys none of which it holds out: a note that evaluation reads training samples."""
    rule = HoldoutConfig(fraction=0.9, salt="test-salt", min_samples=0)
    cut = rule.fraction * 2**64
    all_out = [k for k in keys(40, "a") if holdout_hash(rule.salt, k) < cut][:5]
    commit(cat, tmp_path / "v", [image_row(k, 5.0) for k in all_out])
    recipe = recipe_for("catalog://cards@1", rule.model_dump(), t2i={"weight": 1, "data": "d"})
    check = check_data(recipe, world_size=1, geometry=None, catalog=cat)
    assert [(p.code, p.task) for p in check.errors] == [("all_held_out", "t2i")]
    assert "no training data left" in check.errors[0].message
    assert "data.d.holdout" in check.errors[0].message

    none_out = [k for k in keys(200, "b") if holdout_hash(rule.salt, k) >= cut][:5]
    commit(cat, tmp_path / "w", [image_row(k, 5.0) for k in none_out], name="cards2")
    recipe = recipe_for("catalog://cards2@1", rule.model_dump(), t2i={"weight": 1, "data": "d"})
    check = check_data(recipe, world_size=1, geometry=None, catalog=cat)
    assert check.errors == [] and check.task_counts == {("1 (s)", "t2i"): (5, 0)}
    assert any("t2i: none of the 5 image sample(s)" in n for n in check.notes), check.notes


# -- evaluation ------------------------------------------------------------------------------


def test_evaluation_batches_are_held_out_and_say_so(layouts, store, tmp_path):
    """The trainer's ``held_out()`` (rank 0): held-out keys only, the MLflow tag saying so;
    without a split, training samples with a warning and the tag saying that."""
    from mlflow.tracking import MlflowClient

    from core.tracking import MetricLogger
    from training.models.registry import build_model

    uri, run_id = store
    host = StageArtifacts()  # what the mixin reads of a Trainer (rank 0)
    host.rank, host.step, host.device, host.ema, host.catalog = 0, 0, "cpu", None, None
    host.model = build_model("omni_video", "tiny")
    (tmp_path / "stage").mkdir()
    host.spec = SimpleNamespace(output=str(tmp_path / "stage"), tracking_uri=uri,
                                mlflow_run_id=run_id)  # fmt: skip
    host.out_dir = tmp_path / "stage"
    host.tracker = MetricLogger(uri, run_id)
    host.stage = stage().model_copy(update={"token_budget": 4096})
    host.recipe = validate(
        Recipe,
        {
            "name": "h",
            "model": {"family": "omni_video", "size": "tiny"},
            "data": {"d": {"uri": str(layouts[0]), "holdout": RULE.model_dump()}},
            "stages": [host.stage.model_dump(mode="json")],
        },  # fmt: skip
    )
    batch = host.held_out()["t2i"]
    expected = held(RULE, NAMES)
    assert set(batch.keys) <= expected and len(set(batch.keys)) == len(batch.keys)
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["omniforge.eval_data.t2i"] == "held-out samples"

    host._held_out = None
    host.recipe.data["d"].holdout = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = host.held_out()["t2i"]
    assert any("measured on training samples" in str(w.message) for w in caught)
    assert not set(batch.keys) <= expected  # training samples: most are not held out
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["omniforge.eval_data.t2i"].startswith("training samples: its data has no held-out")
    assert task_spec("t2i").kind == "image"


@pytest.fixture
def store(tmp_path, monkeypatch) -> tuple[str, str]:
    from core import tracking

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, tracking.start_run(uri, "heldout", "stage")
