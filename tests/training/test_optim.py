"""Per-module-group optimizer settings (``optimizer.groups``, ``training/optim.py``) and batch
size as papers state it (``batch_size`` x workers x ``grad_accumulation``): the recipe's checks
name each bad field, param groups follow the globs, every group follows the stage schedule
from its own lr, and in the trainer (real DeepSpeed on CPU, the tiny omni_video model, real
shards) two micro-batches of 1 accumulated make the same step as one batch of 2, and a stage
with two param groups and accumulation resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import Kept, write_image_shards
from pydantic import ValidationError

from core.config import ConfigWarning, load_config
from training.models.registry import build_model
from training.optim import DEFAULT, lr_factor, param_groups, set_lrs
from training.recipe import Recipe, StageConfig
from training.trainer import StageSpec, Trainer, process_group

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "omni_video_tiny.yaml"
# stage 1 on image understanding only: its loss (next-token CE on the caption) draws no noise,
# so batches of equal-length captions give the same loss however they are split
UNDERSTAND = [
    "stages.0.steps=8",
    "stages.0.checkpoint_every=8",
    "stages.0.trainable=[mllm, text_head]",
    "stages.0.tasks={image_understanding: {weight: 1.0, data: curated}}",
    "stages.0.condition_dropout=0.0",
]


def stage(**changes) -> StageConfig:
    base = {
        "name": "s",
        "trainable": ["vision_head", "adapter", "dit"],
        "optimizer": {"lr": 1e-3},
        "frame_area": 4096,
        "token_budget": 768,
        "tasks": {"t2i": {"weight": 1.0, "data": "d"}},
        "steps": 20,
        "checkpoint_every": 10,
    }
    return StageConfig.model_validate({**base, **changes})


def recipe(*stages: StageConfig) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "r",
            "model": {"family": "omni_video"},
            "data": {"d": {"uri": "/tmp/shards"}},
            "stages": [s.model_dump() for s in stages],
        }
    )


# -- the recipe ---------------------------------------------------------------------------------


def test_every_bad_glob_and_overlap_is_reported_at_once_by_field():
    bad = stage(
        trainable=["vision_head", "adapter"],
        optimizer={
            "lr": 1e-3,
            "groups": {
                "dit": {"lr": 1e-4},  # a group the stage does not train
                "vae": {"lr": 1e-4},  # frozen: never trained
                "*_head": {"weight_decay": 0.1},
                "vision_*": {"betas": [0.9, 0.95]},  # vision_head again
            },
        },
    )
    with pytest.raises(ValidationError) as error:
        recipe(bad)
    text = str(error.value)
    for line in [
        "stages.0.optimizer.groups.dit: 'dit' matches no module group this stage trains; it "
        "trains: vision_head, adapter",
        "stages.0.optimizer.groups.vae: 'vae' matches no module group this stage trains",
        "stages.0.optimizer.groups: module group 'vision_head' is matched by ['*_head', "
        "'vision_*']: give each group one glob",
    ]:
        assert line in text, text
    recipe(stage(optimizer={"lr": 1e-3, "groups": {"dit": {"lr": 1e-4}, "*apter": {"eps": 1}}}))


def test_a_glob_that_sets_nothing_is_warned_about():
    with pytest.warns(
        ConfigWarning, match=r"'stages\.s\.optimizer\.groups\.dit' has no effect: it sets nothing"
    ):
        stage(optimizer={"lr": 1e-3, "groups": {"dit": {}}})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "batch_size"),
        ("grad_accumulation", 0, "grad_accumulation"),
        ("optimizer", {"lr": 1e-3, "groups": {"dit": {"betas": [0.9, 1.0]}}}, "groups.dit.betas"),
        ("optimizer", {"lr": 1e-3, "groups": {"dit": {"lr": 0}}}, "groups.dit.lr"),
        ("optimizer", {"lr": 1e-3, "groups": {"dit": {"momentum": 0.9}}}, "groups.dit.momentum"),
    ],
)
def test_bad_values_name_their_field(field, value, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        stage(**{field: value})


def test_global_batch_is_batch_size_times_workers_times_accumulation():
    assert stage(batch_size=16, grad_accumulation=4).global_batch(8) == 512
    assert stage(batch_size=1).global_batch(8) == 8
    assert stage().global_batch(8) is None  # the token budget decides, per bucket


# -- param groups and the schedule ----------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    m = build_model("omni_video", "tiny")
    m.set_trainable(["vision_head", "adapter", "dit"])
    return m


def test_without_groups_one_group_holds_every_trainable_parameter_in_order(model):
    (group,) = param_groups(model, stage())
    assert group.name == DEFAULT
    expected = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in group.params] == [id(p) for p in expected]
    assert group.settings == {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8}


def test_each_glob_gets_its_groups_and_inherits_what_it_does_not_set(model):
    s = stage(
        optimizer={
            "lr": 1e-3,
            "weight_decay": 0.01,
            "groups": {"dit": {"lr": 2e-4, "betas": [0.9, 0.95]}, "adapt*": {"eps": 1e-6}},
        }
    )
    groups = param_groups(model, s)
    assert [(g.name, g.module_groups) for g in groups] == [
        (DEFAULT, ["vision_head"]),
        ("dit", ["dit"]),
        ("adapt*", ["adapter"]),
    ]
    for g in groups:
        owned = {id(p) for name in g.module_groups for p in model.groups[name].parameters()}
        assert {id(p) for p in g.params} == owned
    assert groups[1].settings == {"lr": 2e-4, "betas": (0.9, 0.95), "weight_decay": 0.01,
                                  "eps": 1e-8}  # fmt: skip
    assert groups[2].settings == {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01,
                                  "eps": 1e-6}  # fmt: skip
    optimizer = torch.optim.AdamW([g.torch() for g in groups])  # torch takes them as they are
    assert [pg["betas"] for pg in optimizer.param_groups] == [(0.9, 0.999), (0.9, 0.95)] + [
        (0.9, 0.999)
    ]


@pytest.mark.parametrize(
    ("kind", "step", "factor"),
    [
        ("cosine", 0, 0.25),  # warmup: (step + 1) / warmup_steps
        ("cosine", 3, 1.0),
        ("cosine", 4, 1.0),  # decay starts after the warmup
        ("cosine", 12, 0.1 + 0.9 * 0.5),  # half way through the 16 decay steps
        ("cosine", 20, 0.1),  # min_lr_ratio
        ("linear", 12, 1 - 0.9 * 0.5),
        ("constant", 0, 0.25),
        ("constant", 19, 1.0),
    ],
)
def test_every_group_follows_the_schedule_from_its_own_lr(model, kind, step, factor):
    s = stage(
        optimizer={"lr": 1e-3, "groups": {"dit": {"lr": 4e-4}}},
        schedule={"kind": kind, "warmup_steps": 4, "min_lr_ratio": 0.1},
    )
    groups = param_groups(model, s)
    optimizer = torch.optim.AdamW([g.torch() for g in groups])
    lrs = set_lrs(optimizer, groups, s, step)
    assert lr_factor(s, step) == pytest.approx(factor)
    assert lrs == pytest.approx({DEFAULT: 1e-3 * factor, "dit": 4e-4 * factor})
    assert [pg["lr"] for pg in optimizer.param_groups] == pytest.approx(list(lrs.values()))


# -- in the trainer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Eight square images (one bucket) with captions of one length, in small shards."""
    return write_image_shards(tmp_path_factory.mktemp("optim-shards"), "o", 8)


@contextmanager
def trainer(shards: Path, output: Path, *overrides: str, context=None) -> Iterator[Trainer]:
    r = load_config(Recipe, RECIPE, [f"data.curated.uri={shards}", *UNDERSTAND, *overrides])
    output.mkdir(parents=True, exist_ok=True)
    spec = StageSpec(recipe=r.model_dump(mode="json"), stage_index=0, output=str(output))
    with process_group():
        built = Trainer(spec, context or Kept(output / "kept"))
        try:
            yield built
        finally:
            built.data.close()
            for loader in built.loaders.values():
                loader.close()


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.engine.module.named_parameters() if p.requires_grad}


def test_two_accumulated_micro_batches_of_one_step_like_one_batch_of_two(shards, tmp_path):
    runs = {}
    for batch, micro in ((2, 1), (1, 2)):
        overrides = [f"stages.0.batch_size={batch}", f"stages.0.grad_accumulation={micro}"]
        # AdamW divides by sqrt(v) + eps: at the default 1e-8 a gradient entry near zero turns
        # fp32 rounding of the sum (1e-10) into a visible update; 1e-6 keeps the comparison to
        # what accumulation computes
        overrides.append("stages.0.optimizer.eps=1.0e-6")
        with trainer(shards, tmp_path / f"b{batch}", *overrides) as t:
            start = weights(t)
            steps = [t.train_step() for _ in range(2)]
            runs[batch] = (steps, weights(t), t.engine.global_steps, dict(t.task_counts))
    (one, after_one, global_one, counts_one), (two, after_two, global_two, counts_two) = (
        runs[2],
        runs[1],
    )
    assert global_one == global_two == 2  # one optimizer step per step, micro-batches or not
    assert counts_one == {"image_understanding": 2} and counts_two == {"image_understanding": 4}
    for a, b in zip(one, two, strict=True):
        assert a["keys"] == b["keys"] and len(a["keys"]) == 2  # the same samples, split in two
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # the accumulated gradient is the batch's: each micro-batch's loss divided by 2
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert any(not torch.equal(start[k], after_one[k]) for k in start)  # the steps trained
    for k in after_one:
        torch.testing.assert_close(after_two[k], after_one[k], rtol=1e-4, atol=1e-6)


GROUPS = [
    "stages.0.optimizer.groups={text_head: {lr: 5.0e-3, betas: [0.9, 0.95]}}",
    "stages.0.schedule={kind: cosine, warmup_steps: 2, min_lr_ratio: 0.1}",
    "stages.0.batch_size=1",
    "stages.0.grad_accumulation=2",
]


def test_a_stage_with_two_param_groups_and_accumulation_resumes_exactly(shards, tmp_path):
    context = Kept(tmp_path / "kept")
    with trainer(shards, tmp_path / "a", *GROUPS, context=context) as t:
        assert [g.name for g in t.param_groups] == [DEFAULT, "text_head"]
        first = [t.train_step() for _ in range(2)]
        t.save_checkpoint({"loss": first[-1]["loss"]})
        rest = [t.train_step() for _ in range(2)]
        final = weights(t)
    assert first[0]["lr"] == pytest.approx(1e-3 / 2) and first[0]["lr/text_head"] == 5e-3 / 2
    assert rest[0]["lr/text_head"] == 5e-3  # step 2: the warmup is over, the decay starts
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 6))  # step 3: 1 of 6 decay steps
    assert rest[1]["lr/text_head"] == pytest.approx(5e-3 * factor)
    assert rest[1]["lr"] == pytest.approx(1e-3 * factor)
    (checkpoint,) = context.kept

    with trainer(shards, tmp_path / "b", *GROUPS, context=Kept(tmp_path / "k2", checkpoint)) as t:
        assert t.step == 2
        betas = [g["betas"] for g in t.engine.optimizer.param_groups]
        assert [tuple(b) for b in betas] == [(0.9, 0.999), (0.9, 0.95)]
        again = [t.train_step() for _ in range(2)]
        resumed = weights(t)
    for x, y in zip(again, rest, strict=True):
        assert (x["step"], x["keys"]) == (y["step"], y["keys"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["lr/text_head"] == y["lr/text_head"]
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], rtol=1e-5, atol=1e-6)
