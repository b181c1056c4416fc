import copy
import warnings

import pytest
from helpers import TINY_RECIPE

from core.config import ConfigError, ConfigWarning, validate
from training.recipe import Recipe

BASE = TINY_RECIPE


def recipe(**changes) -> dict:
    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[keys[-1]] = value
    return data


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(Recipe, data)
    return info.value.problems


def test_valid_recipe():
    r = validate(Recipe, recipe())
    assert r.stages[0].tasks["t2v"].num_frames == 9
    assert r.stages[0].zero_stage == 1 and r.stages[0].condition_dropout == 0.1
    assert r.stage_index("align") == 0 == r.stage_index(1)
    with pytest.raises(ValueError, match="stage 2 does not exist"):
        r.stage_index(2)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"model__family": "sora"},
            "model.family: Input should be 'omni_video', 'haplo_omni' or 'vino' (got 'sora')",
        ),
        (
            {"stages__0__optimizer__lr": -1},
            "stages.0.optimizer.lr: Input should be greater than 0 (got -1)",
        ),
        ({"stages__0__zero_stage": 3}, "stages.0.zero_stage: Input should be 0, 1 or 2 (got 3)"),
        (
            {"stages__0__tasks__t2v__data": "other"},
            "stages.0.tasks.t2v.data is 'other'; allowed: main",
        ),
        (
            {"stages__0__tasks__t2v__num_frames": None},
            "tasks.t2v.num_frames is required for a video task",
        ),
        (
            {"stages__0__tasks__t2i__num_frames": 9},
            "num_frames must be 1 or unset for an image task",
        ),
        (
            {"stages__0__tasks__t3d": {"weight": 1, "data": "main"}},
            "stages.0.tasks.t3d.[key]: Input should be 't2i'",
        ),
        (
            {"stages__0__condition_dropout": 1.0},
            "stages.0.condition_dropout: Input should be less than 1 (got 1.0)",
        ),
        (
            {"stages__0__lr": 1e-4},
            "stages.0.lr: unknown key; allowed keys here: checkpoint_every, condition_dropout",
        ),
        (
            {"data__main__uri": "catalog://demo@zero"},
            "version must be a positive integer or 'latest'",
        ),
        ({"stages": []}, "stages: List should have at least 1 item"),
    ],
)
def test_recipe_errors_name_the_field(changes, message):
    found = problems(recipe(**changes))
    assert any(message in p for p in found), found


def test_duplicate_stage_names():
    data = recipe()
    data["stages"].append(copy.deepcopy(data["stages"][0]))
    assert any("stage names must be unique; repeated: ['align']" in p for p in problems(data))


def test_ineffective_settings_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate(
            Recipe,
            recipe(
                stages__0__checkpoint_every=50,
                stages__0__tasks__t2i__fps=8,
                model__pretrained={"mllm": "/models/qwen"},
            ),
        )
    messages = " | ".join(str(w.message) for w in caught if w.category is ConfigWarning)
    assert "stages.align.checkpoint_every" in messages
    assert "stages.align.tasks.t2i.fps" in messages
    assert "model.pretrained" in messages
