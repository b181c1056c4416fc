"""Every stage of every production (7b) recipe trains one step at tiny size, through the
production path: the recipe's ``model.pretrained`` points at tiny random checkpoints of the
same transformers / diffusers classes (``tiny_models.save_tiny_backbones``), the model loads in
the trainer's dtype, each stage's trainable groups, gradient checkpointing and DeepSpeed config
(ZeRO level, AdamW settings) are the recipe's, and the step is one hybrid batch per task group
(image / video) holding one synthetic sample of each of the stage's tasks. What shrinks: the
backbones (tiny checkpoints), the media (32 x 48 pixels, 9 frames) and the batch (one sample per
task), and the warmup's teachers (tiny CLIP / CogVideoX checkpoints). Checked: a finite loss,
every trainable group changes, no frozen group does."""

from __future__ import annotations

import core.compat  # noqa: F401  (before transformers / diffusers)

# isort: split

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_backbones, save_tiny_teachers

from core.config import load_config
from training.data.batch import MixedBatch, TaskBatch
from training.models.distill import load_distiller
from training.models.registry import build_model
from training.optim import param_groups
from training.recipe import Recipe
from training.tasks import EDIT_TASKS, IMAGE_TASKS, VIDEO_TASKS
from training.trainer import deepspeed_config, process_group, weights_dtype

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
PRODUCTION = ("omni_video_7b", "haplo_omni_7b", "vino_7b")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; one thread is steadier on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    return save_tiny_backbones(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    """HaploOmni's warmup teachers, reading the tiny Wan VAE's 4-channel latents."""
    return save_tiny_teachers(tmp_path_factory.mktemp("teachers"), latent_channels=4, patch=2)


def synthetic(model, task: str, seed: int) -> TaskBatch:
    """One sample of ``task`` at 32 x 48 pixels (9 frames for video tasks)."""
    gen = torch.Generator().manual_seed(seed)
    frames = 1 + 2 * model.geometry.temporal_factor if task in VIDEO_TASKS else 1
    shape = (1, frames, 3, 32, 48)
    ids, mask = model.tokenize([f"a red cat on a blue mat, sample {seed}"])
    return TaskBatch(
        task=task,
        keys=[f"{task}-{seed}"],
        pixels=torch.rand(shape, generator=gen) * 2 - 1,
        input_ids=ids,
        attention_mask=mask,
        source_pixels=torch.rand(shape, generator=gen) * 2 - 1 if task in EDIT_TASKS else None,
        drop={"text": torch.tensor([False]), "source": torch.tensor([False])},
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {
        name: torch.cat([p.detach().float().flatten().clone() for p in group.parameters()])
        for name, group in model.groups.items()
    }


@pytest.mark.parametrize("name", PRODUCTION)
def test_every_stage_of_the_7b_recipe_trains_a_step(name, tiny_checkpoints, tiny_teachers, offline):
    import deepspeed

    pretrained = {k: str(v) for k, v in tiny_checkpoints[name.removesuffix("_7b")].items()}
    recipe = load_config(Recipe, RECIPES / f"{name}.yaml")
    recipe = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"pretrained": pretrained})}
    )
    m = recipe.model
    for index, stage in enumerate(recipe.stages):
        torch.manual_seed(recipe.seed)
        model = build_model(
            m.family,
            m.size,
            m.pretrained,
            stage.timestep_shift,
            dtype=weights_dtype(recipe, False),
            options=m.options(),
        )
        if stage.distill:  # a warmup, as the Trainer sets it up, with tiny teachers
            teachers = {
                g: cfg.model_copy(update={"teacher": str(tiny_teachers[g])})
                for g, cfg in stage.distill.items()
            }
            dtype = weights_dtype(recipe, False)
            tf = model.geometry.temporal_factor
            model.set_distillation(load_distiller(teachers, stage.name, tf, dtype))
        trainable = model.set_trainable(stage.trainable)
        model.set_gradient_checkpointing(stage.gradient_checkpointing)
        before = snapshot(model)
        params = [g.torch() for g in param_groups(model, stage)]  # as the Trainer passes them
        with process_group():
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=params, config=deepspeed_config(recipe, stage, False)
            )
            # one optimizer step: the stage's grad_accumulation micro-batches of each group
            for _ in range(stage.grad_accumulation):
                for group, tasks in (("image", IMAGE_TASKS), ("video", VIDEO_TASKS)):
                    parts = [synthetic(model, t, index) for t in stage.tasks if t in tasks]
                    if not parts:
                        continue
                    torch.manual_seed(index)
                    out = engine(MixedBatch(group, parts))
                    loss = out["loss"]
                    assert torch.isfinite(loss), (stage.name, group, loss)
                    for g in stage.distill:  # the warmup's teacher took part
                        assert f"loss/distill_{g}" in out, (stage.name, sorted(out))
                    engine.backward(loss)
                    engine.step()
        after = snapshot(model)
        changed = {g for g in before if not torch.equal(before[g], after[g])}
        assert changed == set(trainable), (stage.name, sorted(changed), trainable)


def test_production_weights_load_in_bf16_on_gpu(tiny_checkpoints, offline):
    """``precision: auto`` loads the backbones in bf16 on GPU (fp32 on CPU, or when asked);
    the bf16 model (here on CPU) runs the VLM's own vision tower and the LM end to end."""
    recipe = load_config(Recipe, RECIPES / "vino_7b.yaml")
    assert weights_dtype(recipe, on_gpu=True) == torch.bfloat16
    assert weights_dtype(recipe, on_gpu=False) == torch.float32
    fp32 = recipe.model_copy(update={"precision": "fp32"})
    assert weights_dtype(fp32, on_gpu=True) == torch.float32
    for family, task in (("omni_video", "video_understanding"), ("vino", "v2v_edit")):
        pretrained = {k: str(v) for k, v in tiny_checkpoints[family].items()}
        model = build_model(family, "7b", pretrained, 5.0, dtype=torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        torch.manual_seed(0)
        loss = model(synthetic(model, task, 0))["loss"]
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_a_7b_plan_without_weights_is_built_from_the_configs(tiny_checkpoints, tmp_path):
    """Weights on the cluster, configs here: ``train plan`` builds the model from the
    backbones' configs on the meta device; shapes and parameter counts equal a real build's,
    the memory table prints, and the note names what was missing."""
    import json
    import shutil

    from helpers import cli

    from core.weights import MissingWeights
    from training.memory import model_shape
    from training.plan import build

    full = next(iter(tiny_checkpoints["vino"].values())).parent
    configs = tmp_path / "configs"  # the folders without their weight files
    shutil.copytree(full, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))

    def moved(family: str, root) -> dict[str, str]:  # the family's folders under ``root``
        return {k: str(root / v.relative_to(full)) for k, v in tiny_checkpoints[family].items()}

    for name in PRODUCTION:
        family = name.removesuffix("_7b")
        base = load_config(Recipe, RECIPES / f"{name}.yaml")

        def pointed(root, base=base, family=family):
            model = base.model.model_copy(update={"pretrained": moved(family, root)})
            return base.model_copy(update={"model": model})

        with pytest.raises(MissingWeights, match="no weights"):
            build(pointed(configs))
        meta = build(pointed(configs), config_only=True)
        assert {p.device.type for p in meta.parameters()} == {"meta"}
        assert model_shape(meta) == model_shape(build(pointed(full))), name
    paths = moved("haplo_omni", configs)
    out = cli(
        "train", "plan", "haplo_omni_7b", "--set", f"model.pretrained={json.dumps(paths)}",
        "--catalog", str(tmp_path / "no-catalog.db"),
    )  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr
    assert "memory per GPU rank on 8 worker(s), bf16 weights" in out.stdout
    assert "unified_tuning" in out.stdout.split("memory per GPU rank")[1]
    assert "built from their configs alone" in out.stderr
    assert "hf download Qwen/Qwen2.5-7B-Instruct" in out.stderr
