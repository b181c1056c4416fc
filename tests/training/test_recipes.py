"""The built-in recipes in training/recipes: every one validates cleanly and trains existing
module groups; the production (7b) templates carry the published values the project relies on
and refuse to build without local weights."""

import functools
import warnings
from pathlib import Path

import pytest

from catalog.filters import parse_filter
from catalog.names import is_catalog_uri
from catalog.schema import COLUMNS
from catalog.shards import ASPECT_CLASSES
from core.config import ConfigWarning, load_config
from core.weights import MissingWeights
from training.data.buckets import bucket_for, tokens
from training.models.registry import build_model
from training.recipe import Recipe
from training.tasks import EDIT_TASKS, IMAGE_TASKS

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
ALL = sorted(p.stem for p in RECIPES.glob("*.yaml"))
PRODUCTION = ["haplo_omni_7b", "omni_video_7b", "vino_7b"]
# ConfigWarnings a recipe is allowed to raise (substrings of the message); none so far.
EXPECTED_WARNINGS: dict[str, list[str]] = {}
# pretrained keys of the 7b size (training/models/production.py)
PRETRAINED_KEYS = {
    "omni_video": {"mllm", "vision_encoder", "dit", "vae"},
    "haplo_omni": {"pre_decoder", "base_decoder", "post_decoder", "vae"},
    "vino": {"vlm", "vision_encoder", "mmdit", "vae"},
}
# 7b geometry: Wan / HunyuanVideo VAE 8x spatial * patch 2, 4x temporal
SPATIAL_7B, TEMPORAL_7B = 16, 4


def load(name: str) -> Recipe:
    """Load a recipe; fail on any ConfigWarning not listed in EXPECTED_WARNINGS."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = load_config(Recipe, RECIPES / f"{name}.yaml")
    expected = EXPECTED_WARNINGS.get(name, [])
    unexpected = [
        str(w.message)
        for w in caught
        if issubclass(w.category, ConfigWarning) and not any(e in str(w.message) for e in expected)
    ]
    assert not unexpected, f"{name}: unexpected ConfigWarning(s): {unexpected}"
    return recipe


@functools.cache
def tiny(family: str):
    """The family's tiny model: its module groups have the same names at every size."""
    return build_model(family, "tiny")


def test_one_recipe_per_family_and_size():
    """Every registered family has a recipe at every size it builds, named
    ``<family>_<size>`` and no other; the 7b ones are the PRODUCTION templates checked below."""
    from training.models.registry import FAMILIES, SIZES

    models = {name: load(name).model for name in ALL}
    found = sorted((m.family, m.size, name) for name, m in models.items())
    assert found == sorted((f, s, f"{f}_{s}") for f in FAMILIES for s in SIZES[f])
    assert sorted(name for _, size, name in found if size == "7b") == PRODUCTION


@pytest.mark.parametrize("name", ALL)
def test_recipe_validates_and_trains_existing_groups(name):
    r = load(name)
    assert r.name == name
    model = tiny(r.model.family)
    supported = set(model.supported_tasks())
    for stage in r.stages:
        chosen = model.select_groups(stage.trainable)  # raises on a glob matching nothing
        assert set(model.set_trainable(stage.trainable)) <= set(chosen)  # not only frozen groups
        assert set(stage.tasks) <= supported, (stage.name, sorted(set(stage.tasks) - supported))
    for key, data in r.data.items():
        if data.filter is not None:
            parse_filter(data.filter, COLUMNS)  # column names exist, grammar is valid
        assert is_catalog_uri(data.uri), key


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_template_shape(name):
    r = load(name)
    assert r.model.size == "7b" and r.precision == "auto"
    assert set(r.model.pretrained) == PRETRAINED_KEYS[r.model.family]
    assert all(Path(p).is_absolute() for p in r.model.pretrained.values())
    for stage in r.stages:
        assert stage.checkpoint_every <= stage.steps
        # the token budget holds at least one sample of every task in its largest bucket
        for task_name, task in stage.tasks.items():
            frames = 1 if task_name in IMAGE_TASKS else task.num_frames
            media = 2 if task_name in EDIT_TASKS else 1
            largest = max(
                tokens(
                    bucket_for(w, h, frames, stage.frame_area, SPATIAL_7B, TEMPORAL_7B),
                    SPATIAL_7B,
                    TEMPORAL_7B,
                )
                for w, h in ASPECT_CLASSES
            )
            assert largest * media <= stage.token_budget, (stage.name, task_name)


def test_vino_table1_values():
    """VINO (arXiv 2601.02358) Table 1: lr 1e-4 / 4e-5 / 2e-5, constant schedule, weight decay
    0.01, grad clip 1.0, EMA 0.9999 from stage 2, frame area 320^2 then 640^2, shift 3 then 5."""
    r = load("vino_7b")
    assert len(r.stages) == 3
    assert [s.optimizer.lr for s in r.stages] == [1e-4, 4e-5, 2e-5]
    assert all(s.schedule.kind == "constant" for s in r.stages)
    assert all(s.optimizer.weight_decay == 0.01 for s in r.stages)
    assert all(s.grad_clip == 1.0 for s in r.stages)
    assert r.stages[0].ema is None
    assert [s.ema.decay for s in r.stages[1:]] == [0.9999, 0.9999]
    assert [s.frame_area for s in r.stages] == [320**2, 320**2, 640**2]
    assert [s.timestep_shift for s in r.stages] == [3.0, 3.0, 5.0]
    assert all("vlm" not in tiny("vino").select_groups(s.trainable) for s in r.stages)


def test_omni_video_zero1_and_fps():
    """Omni-Video: DeepSpeed ZeRO-1; video sampled at 8 fps, 12 fps in stage 3."""
    r = load("omni_video_7b")
    assert len(r.stages) == 3
    assert all(s.zero_stage == 1 for s in r.stages)
    for i, stage in enumerate(r.stages):
        fps = {t.fps for name, t in stage.tasks.items() if name not in IMAGE_TASKS}
        assert fps == ({12} if i == 2 else {8} if i == 1 else set()), (stage.name, fps)


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_template_refuses_to_build_without_weights(name, offline):
    r = load(name)
    present = [p for p in r.model.pretrained.values() if Path(p).exists()]
    if present:
        pytest.skip(f"placeholder weight dirs exist on this machine: {present}")
    m = r.model
    with pytest.raises(MissingWeights) as err:
        build_model(m.family, m.size, m.pretrained, r.stages[0].timestep_shift)
    message = str(err.value)
    for group, path in m.pretrained.items():
        assert f"{group} directory {path} does not exist" in message
    assert "hf download" in message


def test_budget_rule_example():
    """The documented conversion: tokens per sample = (1 + (F-1)/4) * (H/16) * (W/16)."""
    shape = bucket_for(1, 1, 33, 320 * 320, SPATIAL_7B, TEMPORAL_7B)
    assert (shape.height, shape.width, shape.frames) == (320, 320, 33)
    assert tokens(shape, SPATIAL_7B, TEMPORAL_7B) == (1 + 32 // 4) * 20 * 20 == 3600
