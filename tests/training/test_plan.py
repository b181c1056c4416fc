"""``train plan`` (``training/plan.py``): each stage's global batch (batch_size x workers x
grad_accumulation, or the token budget's per-GPU batch at each task's widest bucket), the
groups' own optimizer settings, and the CLI printing them for the world size it is given."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from helpers import cli
from PIL import Image
from rich.console import Console

from catalog.shards import ShardWriter, bucket_name, sample_json
from core.config import load_config
from training.plan import describe
from training.recipe import Recipe

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "omni_video_tiny.yaml"


def rendered(recipe: Recipe, workers: int | None = None) -> str:
    console = Console(record=True, width=250)
    for part in describe(recipe, workers=workers):
        console.print(part)
    return console.export_text()


def test_each_stage_shows_its_global_batch_and_groups_their_own_settings():
    r = load_config(
        Recipe,
        RECIPE,
        [
            "stages.0.batch_size=2",
            "stages.0.grad_accumulation=4",
            "stages.0.optimizer.groups={adapter: {lr: 2.0e-3, betas: [0.9, 0.95]}}",
            "stages.1.batch_size=12",  # more than the budget packs of either task
        ],
    )
    text = rendered(r, workers=3)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "stage 1 global batch 24 = 2 per GPU x 3 worker(s) x 4 accumulation step(s)" in lines
    assert "│ adapter │ 6,848 │ yes (lr 0.002, betas 0.9/0.95) │" in lines
    assert "│ vision_head │ 6,752 │ yes │" in lines
    # stage 2 caps at 12 what the budget (768 tokens) packs: 10 images or 3 clips of 9 frames
    # at the widest bucket, so the plan says the cap is not what every batch gets
    assert (
        "stage 2 global batch 36 = 12 per GPU x 3 worker(s) x 1 accumulation step(s) (the token "
        "budget "
        "packs fewer at the widest bucket: t2i 10, t2v 3)"
    ) in lines
    # stage 3 sets no batch_size: the budget's batch per GPU at each task's widest bucket
    stage3 = next(line for line in lines if line.startswith("stage 3 global batch"))
    assert stage3.startswith(
        "stage 3 global batch: the token budget's per-GPU batch x 3 worker(s) x 1 accumulation step(s); "
        "per GPU at the widest bucket: t2i 10, t2v 3, i2i_edit 5,"
    )
    assert "1x64x64:2" in text  # the tasks table: stage 1's batches capped at batch_size 2


@pytest.fixture
def shards(tmp_path) -> Path:
    """Eight captioned square images (one bucket) in shards."""
    writer = ShardWriter(str(tmp_path / "shards"), prefix="p", max_samples=4)
    for i in range(8):
        png = io.BytesIO()
        Image.new("RGB", (96, 96), (30 * i, 60, 90)).save(png, format="PNG")
        row = {"key": f"img{i}", "kind": "image", "status": "accepted", "width": 96,
               "height": 96, "num_frames": 1, "fps": None}  # fmt: skip
        writer.write(bucket_name(96, 96, 1), f"img{i}",
                     {"json": sample_json(row), "txt": f"picture {i}".encode(),
                      "png": png.getvalue()})  # fmt: skip
    writer.close()
    return tmp_path / "shards"


def test_train_plan_prints_the_global_batch_on_the_workers_it_is_given(shards, tmp_path):
    recipe = {
        "name": "batches",
        "workers": 2,
        "model": {"family": "omni_video", "size": "tiny"},
        "data": {"images": {"uri": str(shards)}},
        "stages": [
            {
                "name": "only",
                "trainable": ["vision_head", "adapter"],
                "optimizer": {"lr": 1e-3, "groups": {"adapter": {"weight_decay": 0.1}}},
                "frame_area": 4096,
                "token_budget": 768,
                "batch_size": 1,
                "grad_accumulation": 3,
                "tasks": {"t2i": {"weight": 1.0, "data": "images"}},
                "steps": 4,
                "checkpoint_every": 4,
            }
        ],
    }
    path = tmp_path / "batches.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = cli("train", "plan", str(path), "--workers", "4")
    assert out.returncode == 0, out.stderr
    assert "global batch 12 = 1 per GPU x 4 worker(s) x 3 accumulation step(s)" in out.stdout
    assert "yes (weight_decay 0.1)" in out.stdout
    assert "data check: ok on 4 worker(s)" in out.stdout
