"""The memory estimate of ``train plan`` (``training/memory.py``): weights, gradients and AdamW
state against the tensors torch allocates for tiny models with known parameter counts; ZeRO
partitioning; the activation estimate's formula; the table's warning when a stage does not fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.config import validate
from training.memory import (
    GIB,
    GpuInfo,
    activation_bytes,
    block_widths,
    find_gpus,
    model_shape,
    stage_memory,
    state_bytes,
)
from training.models.registry import build_model
from training.plan import memory_table
from training.recipe import Recipe


def nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def tiny_net() -> nn.Module:
    """40 + 10 frozen parameters, then 10 * 3 + 3 = 33 trainable: 83 in all."""
    net = nn.Sequential(nn.Linear(4, 10), nn.GELU(), nn.Linear(10, 3))
    net[0].requires_grad_(False)
    return net


def test_fp32_states_are_the_tensors_torch_allocates():
    net = tiny_net()
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    net(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    weights, grads, optimizer = state_bytes(83, 33, world_size=1, zero_stage=0, dtype_bytes=4)
    assert (weights, grads, optimizer) == (83 * 4, 33 * 4, 33 * 8)
    assert weights == nbytes(net.parameters())
    assert grads == nbytes(p.grad for p in net.parameters() if p.grad is not None)
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert optimizer == nbytes(moments)  # (AdamW's per-tensor step counters are not counted)


def test_mixed_precision_states_are_bf16_weights_and_grads_with_fp32_master_and_moments():
    """The mixed-precision layout DeepSpeed keeps (ZeRO paper, K = 12): bf16 weights and
    gradients; an fp32 master copy of each trainable parameter that AdamW steps."""
    net = tiny_net().to(torch.bfloat16)
    trainable = [p for p in net.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_() for p in trainable]
    opt = torch.optim.AdamW(master, lr=1e-3)
    net(torch.randn(5, 4, dtype=torch.bfloat16)).float().square().mean().backward()
    for m, p in zip(master, trainable, strict=True):
        m.grad = p.grad.float()
    opt.step()
    weights, grads, optimizer = state_bytes(83, 33, world_size=1, zero_stage=0, dtype_bytes=2)
    assert weights == nbytes(net.parameters()) == 83 * 2
    assert grads == nbytes(p.grad for p in trainable) == 33 * 2
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert optimizer == nbytes(master) + nbytes(moments) == 33 * 12


def test_zero_levels_partition_optimizer_state_then_gradients():
    p, t, world = 1000, 400, 8
    assert state_bytes(p, t, world, 0, 2) == (2000, 800, 4800)
    assert state_bytes(p, t, world, 1, 2) == (2000, 800, 600)  # optimizer / world
    assert state_bytes(p, t, world, 2, 2) == (2000, 100, 600)  # and gradients / world
    assert state_bytes(p, 0, world, 2, 2) == (2000, 0, 0)  # nothing trains
    assert state_bytes(p, t, 3, 2, 2) == (2000, 267, 1600)  # a share rounds up


def test_activation_estimate_and_what_checkpointing_keeps():
    # 34 bytes per token x hidden unit x layer at 16 bit; a checkpointed layer keeps 2, plus
    # one layer recomputed in full
    assert activation_bytes(1000, [64, 64, 128], checkpointing=False) == 34 * 1000 * 256
    assert activation_bytes(1000, [64, 64, 128], checkpointing=True) == 1000 * (2 * 256 + 34 * 128)
    assert activation_bytes(1000, [64], checkpointing=False, dtype_bytes=4) == 2 * 34 * 1000 * 64
    assert activation_bytes(1000, [], checkpointing=False) == 0


def recipe(**stage) -> Recipe:
    base = {
        "name": "s",
        "trainable": ["adapter"],
        "optimizer": {"lr": 1e-4},
        "frame_area": 4096,
        "token_budget": 768,
        "tasks": {"t2i": {"weight": 1, "data": "d"}},
        "steps": 2,
        "checkpoint_every": 2,
    }
    return validate(
        Recipe,
        {
            "name": "m",
            "model": {"family": "omni_video", "size": "tiny"},
            "data": {"d": {"uri": "/shards/*.tar"}},
            "stages": [{**base, **stage}],
        },
    )


@pytest.fixture(scope="module")
def omni_video():
    return model_shape(build_model("omni_video", "tiny"))


def test_model_shape_counts_every_group_and_finds_the_blocks(omni_video):
    model = build_model("omni_video", "tiny")
    assert omni_video.params == {
        name: sum(p.numel() for p in g.parameters()) for name, g in model.groups.items()
    }
    assert sum(omni_video.params.values()) == sum(p.numel() for p in model.parameters())
    # the tiny sizes: two 64-wide blocks in the language model and in the DiT
    assert omni_video.blocks["mllm"] == omni_video.blocks["dit"] == [64, 64]
    assert omni_video.blocks["adapter"] == []


def test_block_widths_of_the_production_backbone_classes():
    """The layer stacks of a transformers LM and a diffusers MMDiT, built on the meta device
    (no memory): one width per block, the hidden size, not a head's q/k norm."""
    import core.compat  # noqa: F401  (torchvision with CPU torch)

    # isort: split
    from diffusers import HunyuanVideoTransformer3DModel
    from transformers import Qwen2Config, Qwen2Model

    with torch.device("meta"):
        lm = Qwen2Model(
            Qwen2Config(
                vocab_size=64,
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
        mmdit = HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_single_layers=3,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 2, 4),
        )
    assert block_widths(lm) == [48] * 3
    assert block_widths(mmdit) == [16] * (1 + 2 + 3)  # refiner, dual and single blocks


def test_stage_memory_of_a_tiny_recipe(omni_video):
    p, world = omni_video.params, 4
    adapter = p["adapter"]
    m = stage_memory(recipe(zero_stage=2), 0, omni_video, world, on_gpu=True)
    assert m.weights == 2 * sum(p.values())
    assert m.grads == -(-2 * adapter // world) and m.optimizer == -(-12 * adapter // world)
    assert m.ema == 0
    # vae and vision_encoder are frozen by the family: the mllm's and dit's 4 blocks count
    assert m.activations == 34 * 768 * 4 * 64
    assert m.total == m.weights + m.grads + m.optimizer + m.activations

    more = stage_memory(
        recipe(trainable=["adapter", "dit"], ema={"decay": 0.99}, gradient_checkpointing=True),
        0,
        omni_video,
        world,
        on_gpu=False,  # fp32: 4-byte weights and gradients, 8 bytes of moments, no master
    )
    trains = adapter + p["dit"]
    assert (more.weights, more.grads) == (4 * sum(p.values()), 4 * trains)
    assert more.optimizer == -(-8 * trains // world)  # ZeRO-1 (the default)
    assert more.ema == 4 * trains
    assert more.activations == 2 * 768 * (2 * 4 * 64 + 34 * 64)


def test_the_table_warns_for_a_stage_that_does_not_fit(omni_video):
    r = recipe(zero_stage=1)
    need = stage_memory(r, 0, omni_video, 2, on_gpu=True).total
    small = GpuInfo(8, need - 1, "Tiny GPU", "test")
    table, warnings = memory_table(r, omni_video, 2, small)
    assert "8 x Tiny GPU" in table.title
    (warning,) = warnings
    assert warning.startswith("stage 1 (s): about ")
    for knob in ("zero_stage: 2 (now 1)", "gradient_checkpointing: true", "token_budget (now 768)"):
        assert knob in warning
    assert "ema" not in warning
    assert memory_table(r, omni_video, 2, GpuInfo(8, need, "Big GPU", "test"))[1] == []
    with_ema = recipe(zero_stage=2, gradient_checkpointing=True, ema={"decay": 0.99})
    (warning,) = memory_table(with_ema, omni_video, 2, GpuInfo(1, 1, "Tiny GPU", "test"))[1]
    assert "zero_stage" not in warning and "gradient_checkpointing" not in warning
    assert "no ema (its fp32 copy of the trainable parameters is on every rank)" in warning
    table, warnings = memory_table(r, omni_video, 2, None)
    assert warnings == [] and table.title.endswith("no GPU found to compare against")
    assert table.row_count == 1


def test_find_gpus_reads_the_ray_cluster(ray_session):
    address = ray_session.get_runtime_context().gcs_address
    found = find_gpus(address)
    gpus = int(ray_session.cluster_resources().get("GPU", 0))
    if gpus == 0:
        assert found is None
    else:
        assert found.count == gpus and found.memory > GIB
        assert found.source == f"Ray cluster at {address}"
