"""The trainer of one stage on one rank, in-process: real DeepSpeed on CPU (gloo), the tiny
omni_video model, real shards. A non-finite loss or gradient stops the step before the
optimizer step; a resume through the one checkpointer restores every registered state and
refuses other settings. Runs over Ray Train with two ranks are in ``test_runner.py``."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import Kept
from PIL import Image

from catalog.shards import ShardWriter, bucket_name, sample_json
from core.config import load_config
from training import checkpoint as ckpt
from training.recipe import Recipe
from training.trainer import NonFiniteError, StageSpec, Trainer, process_group

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "omni_video_tiny.yaml"
STEPS = ["stages.0.steps=8", "stages.0.checkpoint_every=8"]
# stage 1 with every kind of registered state: hybrid batches of the image group (mixer), EMA
MIXED = [
    "stages.0.hybrid=true",
    "stages.0.trainable=[text_head, vision_head, adapter, dit]",
    "stages.0.tasks.image_understanding={weight: 0.5, data: curated}",
    "stages.0.ema={decay: 0.9}",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Twelve captioned images in two buckets (square and 16:9), in small shards."""
    root = tmp_path_factory.mktemp("trainer-shards")
    writer = ShardWriter(str(root), prefix="t", max_samples=3)
    for i in range(12):
        width, height = (96, 96) if i % 2 else (160, 90)
        png = io.BytesIO()
        Image.new("RGB", (width, height), (20 * i, 255 - 20 * i, 90)).save(png, format="PNG")
        row = {"key": f"img{i}", "kind": "image", "status": "accepted", "width": width,
               "height": height, "num_frames": 1, "fps": None}  # fmt: skip
        writer.write(bucket_name(width, height, 1), f"img{i}",
                     {"json": sample_json(row), "txt": f"picture {i}".encode(),
                      "png": png.getvalue()})  # fmt: skip
    writer.close()
    return root


@contextmanager
def trainer(shards: Path, output: Path, *overrides: str, context=None) -> Iterator[Trainer]:
    """Stage 1 of omni_video_tiny on the test shards, one rank, its own process group."""
    recipe = load_config(Recipe, RECIPE, [f"data.curated.uri={shards}", *STEPS, *overrides])
    output.mkdir(parents=True, exist_ok=True)
    spec = StageSpec(recipe=recipe.model_dump(mode="json"), stage_index=0, output=str(output))
    with process_group():
        built = Trainer(spec, context or Kept(output / "kept"))
        try:
            yield built
        finally:
            built.data.close()
            for loader in built.loaders.values():
                loader.close()


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in t.engine.module.named_parameters()}


def assert_unchanged(t: Trainer, before: dict[str, torch.Tensor], global_steps: int) -> None:
    """No optimizer step happened: DeepSpeed counted none and no weight moved."""
    after = t.engine.module.named_parameters()
    assert all(torch.equal(p, before[name]) for name, p in after)
    assert t.engine.global_steps == global_steps


@pytest.mark.parametrize("zero_stage", [0, 1], ids=["no-zero", "zero1"])
def test_a_non_finite_gradient_with_a_finite_loss_is_never_applied(zero_stage, shards, tmp_path):
    with trainer(shards, tmp_path, f"stages.0.zero_stage={zero_stage}") as t:
        healthy = t.train_step()
        assert math.isfinite(healthy["loss"]) and healthy["grad_norm"] > 0
        if zero_stage:  # measured before the step: the norm DeepSpeed's step clipped with
            assert healthy["grad_norm"] == pytest.approx(float(t.engine.get_global_grad_norm()))

        # one trainable weight's gradient turns NaN in backward; the forward is untouched
        param = next(p for p in t.engine.module.parameters() if p.requires_grad)
        param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        before, global_steps = weights(t), t.engine.global_steps
        with pytest.raises(NonFiniteError) as error:
            t.train_step()
        assert str(error.value).startswith(
            "stage 'align' step 1: non-finite gradient norm on task t2i (samples ['img"
        )
        assert str(error.value).endswith("stopping before the optimizer step")
        assert_unchanged(t, before, global_steps)
        assert t.step == 1 and dict(t.task_counts) == {"t2i": 1}  # the healthy step only


def test_a_non_finite_loss_stops_the_step_before_backward(shards, tmp_path):
    with trainer(shards, tmp_path) as t:
        t.engine.module.register_forward_hook(
            lambda module, inputs, out: {**out, "loss": out["loss"] * float("nan")}
        )
        before, global_steps = weights(t), t.engine.global_steps
        with pytest.raises(NonFiniteError, match=r"step 0: non-finite loss on task t2i "):
            t.train_step()
        assert_unchanged(t, before, global_steps)
        assert all(p.grad is None for p in t.engine.module.parameters())  # no backward ran


@pytest.fixture(scope="module")
def stopped(shards, tmp_path_factory) -> tuple[Path, list[dict], dict[str, torch.Tensor]]:
    """A mixed stage checkpointed after step 2: (the checkpoint, steps 3-4 of the run that
    went on, its weights and EMA after step 4)."""
    out = tmp_path_factory.mktemp("stopped")
    context = Kept(out / "kept")
    with trainer(shards, out, *MIXED, context=context) as t:
        t.train_step(), t.train_step()
        t.save_checkpoint({"loss": 1.0})
        rest = [t.train_step() for _ in range(2)]
        final = {**weights(t), **{f"ema/{k}": v.clone() for k, v in t.ema.state_dict().items()}}
    (checkpoint,) = context.kept
    return checkpoint, rest, final


def test_a_resume_restores_every_registered_state(stopped, shards, tmp_path):
    checkpoint, rest, final = stopped
    assert ckpt.verify(checkpoint) is None
    shared = json.loads((checkpoint / "trainer.json").read_text())
    assert sorted(shared) == ["format", "mixer", "sampler", "step", "task_counts", "world_size"]
    assert shared["step"] == 2 and shared["world_size"] == 1
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == ["deepspeed", "ema.safetensors", "loaders-rank0.json", "manifest-rank0.json",
                     "recipe.yaml", "trainer.json"]  # fmt: skip

    with trainer(shards, tmp_path, *MIXED, context=Kept(tmp_path / "kept", checkpoint)) as t:
        assert t.step == 2 and dict(t.task_counts) == shared["task_counts"]
        again = [t.train_step() for _ in range(2)]
        resumed = {**weights(t), **{f"ema/{k}": v for k, v in t.ema.state_dict().items()}}
    for x, y in zip(again, rest, strict=True):  # the same draws, mixes and samples
        assert (x["step"], x["task"], x["keys"]) == (y["step"], y["task"], y["keys"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    assert {k for k in final if k.startswith("ema/")}  # the EMA is part of the comparison
    assert all(torch.allclose(resumed[k], final[k], atol=1e-6) for k in final)


def test_a_resume_with_other_settings_fails_naming_each(stopped, shards, tmp_path):
    checkpoint, _, _ = stopped
    # checkpoint_every may change: it says when state is saved, not what the stage computes
    other = [*MIXED, "seed=1", "stages.0.optimizer.lr=0.002", "stages.0.hybrid=false",
             "stages.0.checkpoint_every=4"]  # fmt: skip
    context = Kept(tmp_path / "kept", checkpoint)
    with (
        pytest.raises(ckpt.CheckpointError) as error,
        trainer(shards, tmp_path, *other, context=context),
    ):
        pass
    assert str(error.value) == (
        f"cannot resume stage 'align' from checkpoint {checkpoint.name} (step 2): it was "
        "written with other settings: seed: 0 in the checkpoint, 1 now; "
        "stages.0.optimizer.lr: 0.001 in the checkpoint, 0.002 now; "
        "stages.0.hybrid: True in the checkpoint, False now; "
        "resume with the settings the stage started with"
    )
