import copy
import warnings

import pytest
from helpers import TINY_RECIPE

from core.config import ConfigError, ConfigWarning, validate
from training.recipe import FAMILIES, Recipe

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
            "stages.0.tasks.t2v.data: 'other' is not a key of the data section; allowed: main",
        ),
        (
            {"stages__0__tasks__t2v__num_frames": None},
            "stages.0.tasks.t2v.num_frames: required for a video task",
        ),
        (
            {"stages__0__tasks__t2i__num_frames": 9},
            "stages.0.tasks.t2i.num_frames: must be 1 or unset for an image task",
        ),
        (
            {"stages__0__tasks__t3d": {"weight": 1, "data": "main"}},
            "stages.0.tasks.t3d: 't3d' is not an allowed key here: Input should be 't2i'",
        ),
        (
            {"stages__0__condition_dropout": 1.0},
            "stages.0.condition_dropout: Input should be less than 1 (got 1.0)",
        ),
        (
            {"stages__0__lr": 1e-4},
            "stages.0.lr: unknown key; allowed keys here: batch_size, checkpoint_every, condition_dropout",
        ),
        (
            {"data__main__uri": "catalog://demo@zero"},
            "version must be a positive integer or 'latest'",
        ),
        ({"stages": []}, "stages: List should have at least 1 item"),
        (
            {"stages__0__trainable": ["adaptor"]},
            "stages.0.trainable: 'adaptor' matches no module group of omni_video; groups: mllm, ",
        ),
        (
            {"stages__0__trainable": ["v*[er]"]},
            "stages.0.trainable: 'v*[er]' matches only frozen group(s) vae, vision_encoder of "
            "omni_video (fixed pretrained components); trainable groups: mllm, text_head,",
        ),
    ],
)
def test_recipe_errors_name_the_field(changes, message):
    found = problems(recipe(**changes))
    assert any(message in p for p in found), found


def test_every_cross_field_problem_is_reported_at_once():
    data = recipe(
        model__family="vino",
        stages__0__trainable=["connector", "adapter", "vae"],
        stages__0__tasks__t2v__num_frames=None,
        stages__0__tasks__t2v__data="other",
    )
    data["stages"][0]["tasks"]["image_understanding"] = {"weight": 1, "data": "main"}
    data["stages"].append(copy.deepcopy(data["stages"][0]))
    assert problems(data) == [
        "stages: stage names must be unique; repeated: ['align']",
        *[
            line.replace("stages.0", f"stages.{i}")
            for i in (0, 1)
            for line in [
                "stages.0.tasks.t2v.num_frames: required for a video task",
                "stages.0.trainable: 'adapter' matches no module group of vino; groups: vlm, "
                "learnable_queries, connector, mmdit, boundary_connector, vae, "
                "vision_encoder",
                "stages.0.trainable: 'vae' matches only frozen group(s) vae of vino (fixed "
                "pretrained components); trainable groups: vlm, learnable_queries, connector, "
                "mmdit, boundary_connector",
                "stages.0.tasks.t2v.data: 'other' is not a key of the data section; allowed: main",
                "stages.0.tasks.image_understanding: vino does not train image_understanding; "
                "its tasks: t2i, t2v, i2i_edit, v2v_edit",
            ]
        ],
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_table_matches_the_built_models(family):
    """``FAMILIES`` lets validation check groups and tasks without building a model: it must
    say what the model says (every size builds the same classes)."""
    from training.models.registry import build_model

    model = build_model(family, "tiny")
    spec = FAMILIES[family]
    assert spec.groups == tuple(model.groups)
    assert spec.frozen == tuple(model.frozen_groups)
    assert spec.tasks == model.supported_tasks()


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


def test_fresh_groups_must_train_before_a_stage_trains_through_them():
    """At a production size a group the papers train from scratch may not sit frozen where a
    stage trains through it; every such problem at once, naming the stage and the group."""
    data = recipe(model__size="7b", stages__0__trainable=["dit"])  # DiT through a fresh adapter
    data["stages"].append(copy.deepcopy(data["stages"][0]) | {"name": "joint"})
    data["stages"][1]["trainable"] = ["adapter", "dit"]
    assert problems(data) == [
        "stages.0.trainable: stage 'align' trains dit through the module group 'vision_head', "
        "which starts from random weights at size '7b' and is frozen in this stage: add "
        "'vision_head' to its trainable groups (or train 'vision_head' in an earlier stage)",
        "stages.1.trainable: stage 'joint' trains adapter, dit through the module group "
        "'vision_head', which starts from random weights at size '7b' and is frozen in this "
        "stage: add 'vision_head' to its trainable groups (or train 'vision_head' in an "
        "earlier stage)",
        "stages: the module group 'vision_head' starts from random weights at size '7b' but "
        "no stage trains it",
        "stages.0.trainable: stage 'align' trains dit through the module group 'adapter', "
        "which starts from random weights at size '7b' and is frozen in this stage: add "
        "'adapter' to its trainable groups (or train 'adapter' in an earlier stage)",
    ]
    validate(Recipe, recipe(model__size="7b"))  # the base trains both fresh groups first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        validate(Recipe, recipe(stages__0__trainable=["dit"]))  # tiny: everything starts fresh
