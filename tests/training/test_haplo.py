"""HaploOmni's multimodal AdaLN and warmup feature distillation (haplo-omni.txt:82-104, 162,
271): tiny random teachers of the paper's classes (transformers ``CLIPVisionModel``, diffusers
``CogVideoXTransformer3DModel``) are saved to tmp dirs and loaded through the production path
(``training.models.distill.load_distiller``); a distilling warmup stage of the tiny recipe runs
through the real trainer (DeepSpeed on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_image_shards
from tiny_models import save_tiny_teachers

from core.config import load_config
from core.weights import MissingWeights
from training.data.batch import TaskBatch
from training.models.adaln import HaploBlock, MultimodalAdaLN
from training.models.distill import check_teachers, load_distiller
from training.models.haplo_omni import build_tiny
from training.models.registry import build_model
from training.recipe import DistillConfig, Recipe
from training.trainer import StageSpec, Trainer, process_group

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "haplo_omni_tiny.yaml"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CLIP-ViT and CogVideoX transformer, saved as their libraries save them."""
    return save_tiny_teachers(tmp_path_factory.mktemp("teachers"))


def make_batch(model, task: str, b: int = 2) -> TaskBatch:
    """Two 16x24 images with captions (tiny geometry), fixed by the seed."""
    gen = torch.Generator().manual_seed(0)
    ids, mask = model.tokenize(["a red cat sits on a blue mat", "waves at dusk"][:b])
    pixels = torch.rand((b, 1, 3, 16, 24), generator=gen) * 2 - 1
    keys = [f"k{i}" for i in range(b)]
    return TaskBatch(task=task, keys=keys, pixels=pixels, input_ids=ids, attention_mask=mask)


def distiller(teachers, groups=("pre_decoder", "post_decoder"), weight=1.0):
    cfg = {g: DistillConfig(teacher=str(teachers[g]), weight=weight) for g in groups}
    return load_distiller(cfg, "test distill", temporal_factor=4)


# -- multimodal AdaLN -------------------------------------------------------------------------


def test_adaln_layer_count_is_a_model_option():
    recipe = load_config(Recipe, RECIPE, ["model.adaln_layers=2"])
    model = build_model("haplo_omni", "tiny", options=recipe.model.options())
    blocks = model.groups["pre_connector"].blocks
    assert len(blocks) == 2 and all(isinstance(b, HaploBlock) for b in blocks)
    assert len(build_model("haplo_omni", "tiny").groups["pre_connector"].blocks) == 0
    with pytest.raises(ValueError, match="model.adaln_layers"):
        load_config(Recipe, RECIPE, ["model.family=omni_video", "model.adaln_layers=2"])


def test_a_fresh_haplo_block_is_the_identity_and_a_trained_one_follows_the_condition():
    torch.manual_seed(0)
    block, x = HaploBlock(16, 2), torch.randn(2, 5, 16)
    t0, t1 = torch.zeros(2), torch.full((2,), 0.7)
    assert torch.equal(block(x, t0), x)  # W_Ada starts at zero: scale, shift, gate all 0
    for norm in (block.norm1, block.norm2):
        torch.nn.init.normal_(norm.state.weight, std=0.5)
    assert not torch.allclose(block(x, t0), x)
    assert not torch.allclose(block(x, t0), block(x, t1))  # the time condition matters


def test_the_switch_score_picks_between_the_two_modulation_sets_per_token():
    torch.manual_seed(0)
    ada, t = MultimodalAdaLN(8), torch.zeros(1)
    torch.nn.init.normal_(ada.state.weight, std=1.0)
    torch.nn.init.normal_(ada.state.bias, std=1.0)
    h = torch.randn(1, 4, 8)
    _, gate = ada(h, t)
    with torch.no_grad():
        ada.switch.weight.mul_(-1)  # swaps each token's two scores
    _, swapped = ada(h, t)
    assert not torch.allclose(gate, swapped)


def test_adaln_changes_the_tiny_model_losses():
    batch = make_batch(build_tiny(), "t2i")
    torch.manual_seed(0)
    model = build_tiny(adaln_layers=2)
    torch.manual_seed(1)
    before = model.task_loss(batch)["loss"]
    torch.manual_seed(1)
    assert torch.equal(model.task_loss(batch)["loss"], before)  # identity at init: same again
    for block in model.groups["pre_connector"].blocks:
        torch.nn.init.normal_(block.norm1.state.weight, std=0.5)
    torch.manual_seed(1)
    assert not torch.isclose(model.task_loss(batch)["loss"], before)


# -- distillation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task,group", [("image_understanding", "pre_decoder"), ("t2i", "post_decoder")]
)
def test_distillation_is_finite_decreases_and_trains_only_the_stage_groups(teachers, task, group):
    torch.manual_seed(0)
    model = build_tiny(adaln_layers=2)
    # weighted so that the relational term (~1e-2) leads the task loss on this tiny problem
    model.set_distillation(distiller(teachers, weight=50.0))
    teacher = model.distiller.teachers[group]
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model.set_trainable([group])
    batch = make_batch(model, task)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    key = f"loss/distill_{group}"
    history = []
    for _ in range(6):
        torch.manual_seed(1)  # the same timesteps and noise every step
        out = model.task_loss(batch)
        assert torch.isfinite(out[key])
        history.append(float(out[key]))
        opt.zero_grad()
        out["loss"].backward()
        for name, g in model.groups.items():
            grads = [p.grad is not None for p in g.parameters()]
            assert any(grads) if name == group else not any(grads), name
        opt.step()
    assert history[-1] < 0.8 * history[0], history
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("distiller") for k in model.state_dict())  # never saved


def test_the_warmup_trains_each_decoder_on_its_own(teachers):
    """haplo-omni.txt:162: the decoders are "fine-tuned independently": no warmup pass runs the
    connectors (fresh at production size) or the base decoder; understanding trains by
    distillation alone, generation by unconditional flow matching plus distillation."""
    torch.manual_seed(0)
    model = build_tiny(adaln_layers=2)
    model.set_distillation(distiller(teachers))
    ran: list[str] = []
    for name in ("pre_connector", "base_decoder", "post_connector"):
        model.groups[name].register_forward_hook(lambda *_, n=name: ran.append(n))
    model.groups["post_decoder"].register_forward_hook(lambda *_: ran.append("post_decoder"))
    out = model.task_loss(make_batch(model, "image_understanding"))
    assert set(out) == {"loss", "loss/distill_pre_decoder"} and ran == []
    out = model.task_loss(make_batch(model, "t2i"))
    assert set(out) == {"loss", "loss/flow", "loss/distill_post_decoder"}
    assert ran == ["post_decoder"]
    edit = make_batch(model, "i2i_edit")
    edit.source_pixels = edit.pixels.flip(0)
    with pytest.raises(ValueError, match="i2i_edit needs the connectors"):
        model.task_loss(edit)
    model.set_distillation(distiller(teachers, groups=("post_decoder",)))
    with pytest.raises(ValueError, match="no pre_decoder teacher"):
        model.task_loss(make_batch(model, "image_understanding"))
    model.set_distillation(None)  # the connected model again: text CE through the base
    assert set(model.task_loss(make_batch(model, "image_understanding"))) == {"loss", "loss/text"}
    assert "base_decoder" in ran and "pre_connector" in ran


def test_a_warmup_stage_trains_only_what_the_warmup_can(teachers):
    """A stage with teachers may train only the decoders, no edit task, and understanding
    only with a pre-decoder teacher; at 7b it is exempt from the fresh-connector rule, while a
    stage training a decoder through the fresh connectors without teachers is refused."""
    with pytest.raises(ValueError) as err:
        load_config(
            Recipe,
            RECIPE,
            [
                "stages.0.trainable=[pre_decoder, post_decoder, pre_connector]",
                "stages.0.distill={post_decoder: {teacher: /x}}",
                "stages.0.tasks.i2i_edit={weight: 1.0, data: curated}",
            ],
        )
    text = str(err.value)
    assert "stages.0.trainable" in text and "never runs pre_connector" in text
    assert "stages.0.tasks.image_understanding" in text and "add a pre_decoder teacher" in text
    assert "stages.0.tasks.i2i_edit" in text and "cannot train edits" in text
    seven = load_config(Recipe, RECIPE.with_name("haplo_omni_7b.yaml"))
    assert [bool(s.distill) for s in seven.stages[:3]] == [True, True, False]
    with pytest.raises(ValueError) as err:  # the same warmup without teachers: connected
        load_config(Recipe, RECIPE.with_name("haplo_omni_7b.yaml"), ["stages.0.distill={}"])
    text = str(err.value)
    assert "stage 'warmup_pre_decoder' trains pre_decoder through the module group" in text
    assert "'pre_connector'" in text and "'post_connector'" in text


def test_a_missing_teacher_fails_at_start_up_naming_the_path(tmp_path):
    missing = tmp_path / "no-clip-here"
    with pytest.raises(MissingWeights) as err:
        load_distiller({"pre_decoder": DistillConfig(teacher=str(missing))}, "stage 'w'", 4)
    assert str(missing) in str(err.value) and "hf download openai/clip-vit-large-patch14" in str(
        err.value
    )


def test_a_teacher_for_a_group_the_stage_does_not_train_is_a_recipe_error(teachers):
    with pytest.raises(ValueError) as err:
        load_config(
            Recipe,
            RECIPE,
            [
                "stages.1.distill={pre_decoder: {teacher: /x}, vae: {teacher: /y}}",
            ],
        )
    text = str(err.value)
    assert "stages.1.distill.pre_decoder" in text and "add it to trainable" in text
    assert "stages.1.distill.vae" in text


# -- through the trainer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_image_shards(tmp_path_factory.mktemp("haplo-shards"), "h", 6)


class Context:
    def report(self, metrics, checkpoint_dir):
        pass

    def latest_checkpoint(self):
        from contextlib import nullcontext

        return nullcontext(None)


def test_a_distilling_warmup_stage_of_the_tiny_recipe_runs_in_the_trainer(
    teachers, shards, tmp_path
):
    pre, post = teachers["pre_decoder"], teachers["post_decoder"]
    recipe = load_config(
        Recipe,
        RECIPE,
        [
            f"data.curated.uri={shards}",
            "stages.0.steps=4",
            "stages.0.checkpoint_every=4",
            f"stages.0.distill={{pre_decoder: {{teacher: {pre}}}, post_decoder: {{teacher: {post}}}}}",
        ],
    )
    assert recipe.model.adaln_layers == 2
    spec = StageSpec(recipe=recipe.model_dump(mode="json"), stage_index=0, output=str(tmp_path))
    with process_group():
        t = Trainer(spec, Context())
        try:
            teacher_params = [
                p for d in t.model.distiller.teachers.values() for p in d.parameters()
            ]
            trained = {id(p) for g in t.engine.optimizer.param_groups for p in g["params"]}
            assert not any(id(p) in trained for p in teacher_params)
            expected = {"image_understanding": "pre_decoder", "t2i": "post_decoder"}
            for _ in range(4):
                metrics = t.train_step()
                value = metrics[f"loss/distill_{expected[metrics['task']]}"]
                assert value == value and value >= 0  # finite, logged with the step's metrics
        finally:
            t.data.close()
            for loader in t.loaders.values():
                loader.close()


def test_a_missing_teacher_stops_the_trainer_before_training(shards, tmp_path):
    missing = tmp_path / "CogVideoX-2b"
    recipe = load_config(
        Recipe,
        RECIPE,
        [
            f"data.curated.uri={shards}",
            f"stages.0.distill={{post_decoder: {{teacher: {missing}}}}}",
            "stages.0.tasks={t2i: {weight: 1.0, data: curated}}",  # no pre-decoder teacher
        ],
    )
    spec = StageSpec(recipe=recipe.model_dump(mode="json"), stage_index=0, output=str(tmp_path))
    with process_group(), pytest.raises(MissingWeights, match=str(missing)):
        Trainer(spec, Context())


def test_the_7b_template_names_its_teachers_and_refuses_to_start_without_them():
    recipe = load_config(Recipe, RECIPE.with_name("haplo_omni_7b.yaml"))
    assert recipe.model.adaln_layers == 2
    for stage in recipe.stages[:2]:  # the two warmup stages
        ((group, cfg),) = stage.distill.items()
        if Path(cfg.teacher).exists():
            pytest.skip(f"placeholder teacher dir exists on this machine: {cfg.teacher}")
        with pytest.raises(MissingWeights, match=cfg.teacher) as err:
            load_distiller(stage.distill, f"stage {stage.name!r} distill", 4)
        assert "hf download" in str(err.value)
    assert not any(stage.distill for stage in recipe.stages[2:])
    with pytest.raises(MissingWeights) as err:  # the driver's check names both at once
        check_teachers(recipe)
    assert "clip-vit-large-patch14" in str(err.value) and "CogVideoX-2b" in str(err.value)
    check_teachers(recipe, stages=[2, 3])  # stages without teachers need none
