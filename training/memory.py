"""Memory per rank of a training stage, estimated before anything trains (``train plan``).

Per rank, in bytes, for a stage on ``world_size`` data-parallel ranks:

(a) weights: every module group's parameters in the run dtype (bf16 on GPU under precision
    ``auto`` / ``bf16``, fp32 on CPU or under ``fp32``); ZeRO-1/2 never partition weights.
(b) gradients of the trainable parameters, in the run dtype; ZeRO-2 partitions them.
(c) AdamW state of the trainable parameters: two fp32 moments, plus an fp32 master copy under
    mixed precision (12 bytes per parameter, the ``K = 12`` of ZeRO, Rajbhandari et al. 2020,
    arXiv 1910.02054, section 3.1; fp32 training: 8). ZeRO-1 and ZeRO-2 partition it.
    An EMA (``stage.ema``) adds its fp32 shadow of the trainable parameters on every rank
    (``training/ema.py``).
(d) activations: an ESTIMATE, not an accounting. Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", arXiv 2205.05198, equation 1) give a
    transformer layer's stored activations as ``s b h (34 + 5 a s / h)`` bytes at 16-bit; with
    SDPA / flash attention the ``a s^2`` terms (scores, softmax, dropout mask) are not stored,
    leaving ``34`` bytes per token per hidden unit per layer. With full recomputation (gradient
    checkpointing) a layer keeps only its input, ``2 s b h`` bytes (same paper), plus one
    layer's full activations while it is recomputed. Here ``s b`` is the stage's token budget
    (latent tokens per local batch) and the layers are the blocks (children of each
    ``nn.ModuleList``) of every group that is not frozen by the family, whether it trains or
    passes gradients back: an upper bound for groups that sit upstream of every trainable one.
    Text tokens, the VAE and vision encoder (no grad) and framework buffers (NCCL, DeepSpeed's
    bucket buffers, the allocator's fragmentation) are not counted: leave headroom.

(a)-(c) are exact for the parameters counted; ``tests/training/test_memory.py`` checks them
against the tensors torch allocates for a tiny model.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass

from training.recipe import FAMILIES, Recipe, StageConfig

ACTIVATION_BYTES = 34  # per token x hidden unit x layer at 16 bit (Korthikanti et al., eq. 1)
CHECKPOINTED_BYTES = 2  # a checkpointed layer keeps only its 16-bit input (ibid.)
GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: parameters per module group and the hidden size of
    each transformer block per group."""

    params: dict[str, int]
    blocks: dict[str, list[int]]


@dataclass(frozen=True)
class StageMemory:
    """Bytes per rank of one stage (see the module docstring for what each part counts)."""

    weights: int
    grads: int
    optimizer: int
    ema: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.ema + self.activations


@dataclass(frozen=True)
class GpuInfo:
    """The GPUs a stage would run on: how many and the smallest one's memory in bytes."""

    count: int
    memory: int
    name: str
    source: str  # where the numbers come from (Ray cluster, local torch)


def _hidden(block) -> int:
    """A block's hidden size: its widest normalisation layer (narrower ones normalise a head's
    queries and keys), else from its parameters (a transformer layer holds about 12 h^2)."""
    widths = []
    for m in block.modules():
        shape = getattr(m, "normalized_shape", None)
        if shape:
            widths.append(int(shape[-1]))
        elif type(m).__name__.endswith("Norm") and getattr(m, "weight", None) is not None:
            widths.append(int(m.weight.shape[-1]))
    if widths:
        return max(widths)
    return max(1, round(math.sqrt(sum(p.numel() for p in block.parameters()) / 12)))


def model_shape(model) -> ModelShape:
    """Parameters per group and block widths of a built model (tiny, or production whose
    weights are on disk; any device, ``meta`` included)."""
    params = {name: sum(p.numel() for p in g.parameters()) for name, g in model.groups.items()}
    return ModelShape(params, {name: block_widths(g) for name, g in model.groups.items()})


def block_widths(module) -> list[int]:
    """The hidden size of each block of ``module``: the children of each ``nn.ModuleList``
    (a list inside a block is part of that block)."""
    from torch import nn

    seen: set[int] = set()
    widths = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and id(m) not in seen:
            for block in m:
                widths.append(_hidden(block))
                seen.update(id(x) for x in block.modules())
    return widths


def run_dtype_bytes(precision: str, on_gpu: bool) -> int:
    """Bytes per weight / gradient in the run dtype (``trainer.deepspeed_config``)."""
    return 2 if on_gpu and precision in ("auto", "bf16") else 4


def state_bytes(
    num_params: int, num_trainable: int, world_size: int, zero_stage: int, dtype_bytes: int
) -> tuple[int, int, int]:
    """(weights, gradients, AdamW state) bytes per rank: (a), (b), (c) of the docstring."""
    mixed = dtype_bytes < 4
    optimizer = num_trainable * (12 if mixed else 8)
    grads = num_trainable * dtype_bytes
    if zero_stage >= 1:
        optimizer = math.ceil(optimizer / world_size)
    if zero_stage >= 2:
        grads = math.ceil(grads / world_size)
    return num_params * dtype_bytes, grads, optimizer


def activation_bytes(
    tokens: int, widths: list[int], checkpointing: bool, dtype_bytes: int = 2
) -> int:
    """(d): stored activations of ``tokens`` through blocks of the given hidden sizes."""
    if not widths:
        return 0
    scale = dtype_bytes / 2  # the constants are for 16-bit activations
    if checkpointing:
        kept = CHECKPOINTED_BYTES * tokens * sum(widths)
        return round(scale * (kept + ACTIVATION_BYTES * tokens * max(widths)))
    return round(scale * ACTIVATION_BYTES * tokens * sum(widths))


def stage_memory(
    recipe: Recipe, index: int, shape: ModelShape, world_size: int, on_gpu: bool
) -> StageMemory:
    """Bytes per rank of stage ``index`` of ``recipe`` on ``world_size`` ranks."""
    stage: StageConfig = recipe.stages[index]
    spec = FAMILIES[recipe.model.family]
    trains = [
        g
        for g in spec.groups
        if g not in spec.frozen and any(fnmatch.fnmatchcase(g, p) for p in stage.trainable)
    ]
    num_trainable = sum(shape.params.get(g, 0) for g in trains)
    size = run_dtype_bytes(recipe.precision, on_gpu)
    weights, grads, optimizer = state_bytes(
        sum(shape.params.values()), num_trainable, world_size, stage.zero_stage, size
    )
    widths = [w for g, ws in shape.blocks.items() if g not in spec.frozen for w in ws]
    acts = activation_bytes(stage.token_budget, widths, stage.gradient_checkpointing, size)
    ema = 4 * num_trainable if stage.ema else 0
    return StageMemory(weights, grads, optimizer, ema, acts)


def knobs(stage: StageConfig) -> str:
    """What to change in a stage that does not fit, in the order worth trying."""
    out = []
    if stage.zero_stage < 2:
        out.append(f"zero_stage: 2 (now {stage.zero_stage})")
    if not stage.gradient_checkpointing:
        out.append("gradient_checkpointing: true")
    out.append(f"a smaller token_budget (now {stage.token_budget})")
    if stage.ema:
        out.append("no ema (its fp32 copy of the trainable parameters is on every rank)")
    out.append("fewer trainable groups, or more workers (partitions the ZeRO states)")
    return "; ".join(out)


def gib(n: int) -> str:
    """Bytes for people: ``1.5 GiB``, ``12.0 MiB``, ``300 B``."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _gpu_of_a_worker() -> tuple[str, int]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory


def find_gpus(address: str | None) -> GpuInfo | None:
    """The GPUs to compare with: with ``address`` (or ``RAY_ADDRESS``), the Ray cluster's
    ``GPU`` resource, one task on a GPU reading its memory (Ray reports counts and
    ``accelerator_type``, not memory); else this machine's GPUs through torch. None: no GPU."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        from core.cluster import init_ray

        init_ray(address)
        count = int(ray.cluster_resources().get("GPU", 0))
        if not count:
            return None
        probe = ray.remote(num_gpus=1)(_gpu_of_a_worker)
        name, memory = ray.get(probe.remote())
        return GpuInfo(count, memory, name, f"Ray cluster at {address}")
    import torch

    if not torch.cuda.is_available():
        return None
    sizes = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    small = min(sizes, key=lambda p: p.total_memory)
    return GpuInfo(len(sizes), small.total_memory, small.name, "this machine (torch.cuda)")
