"""A stage's optimizer settings as torch param groups, and each group's lr at a step.

``optimizer.groups`` of a stage maps globs over the family's module groups to their own lr,
betas, weight decay or eps (``training.recipe.GroupOptimizerConfig``; the recipe checks each
glob matches a group the stage trains and no group is matched twice). ``param_groups`` turns
that into torch param groups: first the trainable parameters no glob claims, with the stage
optimizer's values (a stage without ``groups`` has exactly this one group, in the order of
``model.parameters()``, as before per-group settings existed), then one group per glob.
DeepSpeed builds its AdamW over these groups (``deepspeed.initialize(model_parameters=...)``)
and ZeRO-1/2 partitions each group on its own, so the optimizer state keeps the layout.

The schedule (warmup, then constant / cosine / linear to ``min_lr_ratio``) is one factor of
the step that scales every group from its own base lr (``lr_factor``): a group at 2e-4 and
the stage at 1e-4 warm up together and decay to the same fraction. The lr is a pure function
of the step, set before each optimizer step (``set_lrs``), so nothing of the schedule needs
saving: a resumed stage sets the same lr at the same step.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch

from training.recipe import StageConfig

DEFAULT = "default"  # the group of the trainable parameters no glob of optimizer.groups claims


@dataclass
class ParamGroup:
    name: str  # DEFAULT or the glob of optimizer.groups
    module_groups: list[str]
    params: list[torch.nn.Parameter]
    settings: dict[str, Any]  # lr, betas, weight_decay, eps

    def torch(self) -> dict[str, Any]:
        """The group as ``torch.optim`` takes it."""
        return {"params": self.params, **self.settings, "betas": tuple(self.settings["betas"])}


def param_groups(model: Any, stage: StageConfig) -> list[ParamGroup]:
    """The torch param groups of ``stage`` over ``model`` (a ``FamilyModel`` whose trainable
    groups are set): the default group first (left out when empty), then one per glob."""
    opt = stage.optimizer
    claimed: set[int] = set()
    globbed = []
    for glob in opt.groups:
        names = [n for n in model.groups if fnmatch.fnmatchcase(n, glob)]
        params = [
            p
            for n in names
            for p in model.groups[n].parameters()
            if p.requires_grad and id(p) not in claimed
        ]
        claimed.update(id(p) for p in params)
        names = [n for n in names if any(p.requires_grad for p in model.groups[n].parameters())]
        globbed.append(ParamGroup(glob, names, params, opt.settings(glob)))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    rest_names = [
        n
        for n, g in model.groups.items()
        if any(p.requires_grad and id(p) not in claimed for p in g.parameters())
    ]
    default = [ParamGroup(DEFAULT, rest_names, rest, opt.settings())] if rest else []
    groups = default + globbed
    empty = [g.name for g in globbed if not g.params]
    if empty:
        raise ValueError(
            f"stage {stage.name!r}: optimizer.groups {empty} hold no trainable parameter"
        )
    return groups


def lr_factor(stage: StageConfig, step: int) -> float:
    """The schedule at ``step`` (0-based) as a fraction of a base lr: linear warmup over
    ``warmup_steps``, then constant, or cosine / linear decay to ``min_lr_ratio``."""
    sched = stage.schedule
    if step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return 1.0
    span = max(1, stage.steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / span)
    floor = sched.min_lr_ratio
    if sched.kind == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - floor) * progress


def lr_at(stage: StageConfig, step: int) -> float:
    """The stage optimizer's lr at ``step`` (that of the default group)."""
    return stage.optimizer.lr * lr_factor(stage, step)


def set_lrs(
    optimizer: torch.optim.Optimizer, groups: list[ParamGroup], stage: StageConfig, step: int
) -> dict[str, float]:
    """Set each param group's lr for ``step``; returns group name -> lr. ``optimizer``'s
    param groups are ``groups`` in order (DeepSpeed's ZeRO optimizer keeps the order)."""
    if len(optimizer.param_groups) != len(groups):
        raise AssertionError(
            f"optimizer has {len(optimizer.param_groups)} param groups, expected {len(groups)}"
        )
    factor = lr_factor(stage, step)
    lrs = {}
    for torch_group, group in zip(optimizer.param_groups, groups, strict=True):
        torch_group["lr"] = lrs[group.name] = group.settings["lr"] * factor
    return lrs
