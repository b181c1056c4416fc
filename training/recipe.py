"""Training recipe (YAML, validated): a model family + size, named data, and ordered stages.

Each stage names the module groups it trains (globs over the family's groups), its optimizer
(with ``optimizer.groups``: globs over those groups -> their own lr / betas / weight decay /
eps, see ``training/optim.py``), schedule, EMA, ZeRO stage, frame area, timestep shift,
condition-dropout rate, its batch (a token budget per GPU, optionally capped at ``batch_size``
samples, and ``grad_accumulation`` micro-batches per optimizer step: the global batch is
batch_size x workers x grad_accumulation), a task mixture (task -> weight + data +
frames/fps) and whether batches mix tasks (``hybrid``: tasks of one group, image or video,
that share a bucket shape; see ``training/data/hybrid.py``).
Data is ``catalog://NAME@VERSION`` (+ a filter on
index columns) or shard paths/globs, each with a held-out split (``holdout``: samples that only
evaluation reads; ``training/data/holdout.py``).

Validation reports every cross-field problem at once (``core.config.ConfigProblems``, one line
each): task data keys, video frame counts, ``trainable`` globs against the family's module
groups (``FAMILIES``, no model is built), ``optimizer.groups`` globs against the groups the
stage trains, tasks the family cannot train and, at production sizes, freshly initialised
groups left frozen where a stage trains through them (``training.fresh``). Whether the data
itself can feed the stages (samples per bucket, captions) needs the data: ``training.preflight``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from catalog.names import DatasetRef, is_catalog_uri
from core.config import StrictModel, raise_problems, warn_ineffective
from training.data.holdout import HoldoutConfig
from training.fresh import fresh_problems
from training.tasks import (
    EDIT_TASKS,
    GENERATION_TASKS,
    TASK_GROUPS,
    TASKS,
    UNDERSTANDING_TASKS,
    TaskName,
    task_spec,
)

Family = Literal["omni_video", "haplo_omni", "vino"]


@dataclass(frozen=True)
class FamilySpec:
    """What a recipe may ask of a family, known without building it (torch-free): its module
    groups in order, the frozen ones (never trainable) and the tasks it trains. Every size of a
    family has the same groups; ``tests/training/test_recipe.py`` checks this table against the
    built models."""

    groups: tuple[str, ...]
    frozen: tuple[str, ...]
    tasks: tuple[str, ...]


FAMILIES: dict[str, FamilySpec] = {
    "omni_video": FamilySpec(
        ("mllm", "text_head", "vision_head", "adapter", "dit", "vae", "vision_encoder"),
        ("vae", "vision_encoder"),
        TASKS,
    ),
    "haplo_omni": FamilySpec(
        ("pre_decoder", "pre_connector", "base_decoder", "post_connector", "post_decoder", "vae"),
        ("vae",),
        TASKS,
    ),
    "vino": FamilySpec(
        (
            "vlm",
            "learnable_queries",
            "connector",
            "mmdit",
            "boundary_connector",
            "vae",
            "vision_encoder",
        ),
        ("vae", "vision_encoder"),
        GENERATION_TASKS,
    ),
}


# Groups a warmup stage may distil a teacher into, per family (``training/models/distill.py``).
DISTILL_TARGETS: dict[str, tuple[str, ...]] = {"haplo_omni": ("pre_decoder", "post_decoder")}


def trainable_problems(family: str, patterns: list[str]) -> list[str]:
    """Why ``patterns`` (a stage's ``trainable`` globs) cannot select trainable groups of
    ``family``: a glob matching no group, or only frozen ones (the rule of
    ``FamilyModel.set_trainable``)."""
    spec = FAMILIES[family]
    trainable = [g for g in spec.groups if g not in spec.frozen]
    out = []
    for pattern in patterns:
        hits = [g for g in spec.groups if fnmatch.fnmatchcase(g, pattern)]
        if not hits:
            out.append(
                f"{pattern!r} matches no module group of {family}; groups: {', '.join(spec.groups)}"
            )
        elif all(h in spec.frozen for h in hits):
            out.append(
                f"{pattern!r} matches only frozen group(s) {', '.join(hits)} of {family} "
                f"(fixed pretrained components); trainable groups: {', '.join(trainable)}"
            )
    return out


def selected_groups(family: str, patterns: list[str]) -> list[str]:
    """The trainable module groups of ``family`` that ``patterns`` select, in family order."""
    spec = FAMILIES[family]
    return [
        g
        for g in spec.groups
        if g not in spec.frozen and any(fnmatch.fnmatchcase(g, p) for p in patterns)
    ]


def optimizer_group_problems(family: str, stage: StageConfig) -> list[tuple[str, str]]:
    """(path under ``optimizer.groups``, message) for each glob of the stage's
    ``optimizer.groups`` that matches none of its trainable groups, and each group that two
    globs match (its settings would depend on their order)."""
    trains = selected_groups(family, stage.trainable)
    out, matched = [], {}
    for glob in stage.optimizer.groups:
        hits = [g for g in trains if fnmatch.fnmatchcase(g, glob)]
        if not hits:
            out.append(
                (
                    f".{glob}",
                    f"{glob!r} matches no module group this stage trains; it trains: "
                    f"{', '.join(trains) or 'nothing'}",
                )
            )
        for g in hits:
            matched.setdefault(g, []).append(glob)
    for g, globs in matched.items():
        if len(globs) > 1:
            out.append(("", f"module group {g!r} is matched by {globs}: give each group one glob"))
    return out


class ModelConfig(StrictModel):
    family: Family
    size: str = Field(
        "tiny", description="'tiny' builds in-process; others wrap pretrained backbones"
    )
    pretrained: dict[str, str] = Field(
        default_factory=dict, description="module group -> local weights dir (production sizes)"
    )
    adaln_layers: int | None = Field(
        None, ge=0, le=64, description="haplo_omni: multimodal AdaLN blocks (default 0: none)"
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.size == "tiny" and self.pretrained:
            warn_ineffective("model.pretrained", "size 'tiny' builds every module from scratch")
        if self.adaln_layers is not None and self.family != "haplo_omni":
            raise ValueError(
                f"model.adaln_layers: only haplo_omni has multimodal AdaLN, not {self.family}"
            )
        return self

    def options(self) -> dict[str, int]:
        """Family-specific build options (``registry.build_model(..., options=)``)."""
        return {} if self.adaln_layers is None else {"adaln_layers": self.adaln_layers}


class DataConfig(StrictModel):
    uri: str = Field(description="catalog://NAME@VERSION, or a shard path / glob / fsspec URI")
    filter: str | None = Field(None, description="expression on index columns, e.g. aesthetic > 5")
    holdout: HoldoutConfig | None = Field(
        HoldoutConfig(),
        description="held-out split for evaluation (training/data/holdout.py); null: none",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if is_catalog_uri(v):
            DatasetRef.parse(v)  # raises with the expected format
        elif not v.strip():
            raise ValueError("data uri is empty")
        return v

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.filter is not None and not is_catalog_uri(self.uri):
            warn_ineffective(
                "data.filter", "filters apply to catalog:// data (shard paths have no index)"
            )
        return self


def _check_betas(v: tuple[float, float] | None) -> tuple[float, float] | None:
    if v is not None and not all(0 <= b < 1 for b in v):
        raise ValueError(f"betas must each be in [0, 1), got {list(v)}")
    return v


class GroupOptimizerConfig(StrictModel):
    """Settings of the module groups one glob of ``optimizer.groups`` matches; a field left
    unset takes the stage optimizer's value (the schedule scales each group from its own lr)."""

    lr: float | None = Field(None, gt=0, le=1)
    betas: tuple[float, float] | None = None
    weight_decay: float | None = Field(None, ge=0, le=1)
    eps: float | None = Field(None, gt=0)

    _betas = field_validator("betas")(_check_betas)


class OptimizerConfig(StrictModel):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0, le=1)
    eps: float = Field(1e-8, gt=0)
    groups: dict[str, GroupOptimizerConfig] = Field(
        default_factory=dict,
        description="glob over the stage's trainable module groups -> lr / betas / "
        "weight_decay / eps of those groups (the rest keep the values above)",
    )

    _betas = field_validator("betas")(_check_betas)

    def settings(self, glob: str | None = None) -> dict[str, Any]:
        """lr, betas, weight_decay and eps of the groups ``glob`` matches (None: the others)."""
        own = {"lr": self.lr, "betas": self.betas, "weight_decay": self.weight_decay}
        own["eps"] = self.eps
        if glob is not None:
            own.update(self.groups[glob].model_dump(exclude_none=True))
        return own


class ScheduleConfig(StrictModel):
    kind: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / lr for cosine, linear")


class EmaConfig(StrictModel):
    decay: float = Field(0.9999, gt=0, lt=1)


class TaskConfig(StrictModel):
    weight: float = Field(gt=0, description="relative probability of drawing this task")
    data: str = Field(description="key of the recipe's data section")
    num_frames: int | None = Field(None, ge=1, description="video tasks: frames per sample")
    fps: float | None = Field(None, gt=0, description="video tasks: sampling rate")
    vlm_fps: float | None = Field(
        None, gt=0, description="video tasks of vino: the rate its VLM reads the clip at"
    )
    vlm_max_frames: int | None = Field(
        None, ge=1, description="video tasks of vino: at most this many frames to the VLM"
    )


class DistillConfig(StrictModel):
    teacher: str | None = Field(
        None,
        description="teacher checkpoint folder or hf-hub:ORG/NAME; unset: the teacher's "
        "repository name under the model roots",
    )
    weight: float = Field(1.0, gt=0, description="factor of the distillation loss")


class StageConfig(StrictModel):
    name: str = Field(min_length=1)
    trainable: list[str] = Field(min_length=1, description="globs over the family's module groups")
    optimizer: OptimizerConfig
    schedule: ScheduleConfig = ScheduleConfig()
    grad_clip: float = Field(1.0, gt=0)
    ema: EmaConfig | None = None
    zero_stage: Literal[0, 1, 2] = 1
    gradient_checkpointing: bool = False
    frame_area: int = Field(gt=0, description="pixels per frame, e.g. 102400 for 320x320")
    timestep_shift: float = Field(1.0, gt=0)
    condition_dropout: float = Field(0.1, ge=0, lt=1, description="per modality, independent")
    token_budget: int = Field(gt=0, description="latent tokens per local batch")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="samples per GPU per micro-batch: a cap on what token_budget packs "
        "(unset: the budget alone)",
    )
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    hybrid: bool = Field(
        False, description="batches mix the tasks of one group (image | video) sharing a shape"
    )
    tasks: dict[TaskName, TaskConfig] = Field(min_length=1)
    distill: dict[str, DistillConfig] = Field(
        default_factory=dict, description="module group -> frozen teacher distilled into it"
    )
    steps: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)

    def global_batch(self, workers: int) -> int | None:
        """Samples per optimizer step over every worker when ``batch_size`` is set (None: the
        token budget decides, per bucket)."""
        if self.batch_size is None:
            return None
        return self.batch_size * workers * self.grad_accumulation

    def problems(self) -> list[tuple[str, str]]:
        """(path relative to the stage, message) of each inconsistent setting."""
        out = []
        for name, task in self.tasks.items():
            group = task_spec(name).group
            if group == "video" and task.num_frames is None:
                out.append((f"tasks.{name}.num_frames", "required for a video task"))
            if group == "image" and task.num_frames not in (None, 1):
                out.append((f"tasks.{name}.num_frames", "must be 1 or unset for an image task"))
            if group == "video" and task.vlm_fps is not None and task.fps is None:
                out.append((f"tasks.{name}.fps", "required with vlm_fps (the rate of the frames)"))
            if task.vlm_max_frames is not None and task.vlm_fps is None:
                out.append((f"tasks.{name}.vlm_fps", "required with vlm_max_frames"))
        return out

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        """Warnings only: errors are collected by ``Recipe`` with every other stage's."""
        for name, task in self.tasks.items():
            if task_spec(name).group == "image" and task.fps is not None:
                warn_ineffective(f"stages.{self.name}.tasks.{name}.fps", "image task")
            vlm_video = task_spec(name).group == "video" and task_spec(name).edit
            if task.vlm_fps is not None and not vlm_video:
                warn_ineffective(
                    f"stages.{self.name}.tasks.{name}.vlm_fps",
                    "only a video edit shows the VLM a video (its source)",
                )
        if self.hybrid and all(
            sum(t in self.tasks for t in group) < 2 for group in TASK_GROUPS.values()
        ):
            warn_ineffective(
                f"stages.{self.name}.hybrid",
                "no image or video group has two tasks in this stage, so no batch can mix tasks",
            )
        for glob, own in self.optimizer.groups.items():
            if not own.model_dump(exclude_none=True):
                warn_ineffective(
                    f"stages.{self.name}.optimizer.groups.{glob}",
                    "it sets nothing, so its groups keep the stage optimizer's values",
                )
        if self.checkpoint_every > self.steps:
            warn_ineffective(
                f"stages.{self.name}.checkpoint_every",
                f"larger than steps ({self.steps}); only the final checkpoint is written",
            )
        return self


def distill_problems(family: str, stage: StageConfig, index: int) -> list[tuple[str, str]]:
    """A teacher for a group the family cannot distil into, or one the stage does not train;
    and in a warmup stage (one with teachers: the decoders train independently, see
    ``HaploOmni._warmup_loss``), a trainable group or a task the warmup cannot train."""
    targets = DISTILL_TARGETS.get(family, ())
    out = []
    for group in stage.distill:
        path = f"stages.{index}.distill.{group}"
        if group not in targets:
            allowed = ", ".join(targets) if targets else f"none ({family} has no teachers)"
            out.append((path, f"no teacher can be distilled into {group!r}; allowed: {allowed}"))
        elif not any(fnmatch.fnmatchcase(group, p) for p in stage.trainable):
            out.append((path, f"{group} does not train in this stage; add it to trainable"))
    if not stage.distill or not targets:
        return out
    groups = FAMILIES[family].groups
    outside = [
        g
        for g in groups
        if g not in targets and any(fnmatch.fnmatchcase(g, p) for p in stage.trainable)
    ]
    if outside:
        out.append(
            (
                f"stages.{index}.trainable",
                f"a warmup stage (one with distill teachers) trains the decoders independently "
                f"and never runs {', '.join(outside)}; trainable may hold {', '.join(targets)}",
            )
        )
    for task in stage.tasks:
        if task in UNDERSTANDING_TASKS and "pre_decoder" not in stage.distill:
            out.append(
                (
                    f"stages.{index}.tasks.{task}",
                    "in a warmup stage understanding tasks train only by distillation into the "
                    "pre-decoder: add a pre_decoder teacher to distill, or move the task",
                )
            )
        elif task in EDIT_TASKS:
            out.append(
                (
                    f"stages.{index}.tasks.{task}",
                    "a warmup stage cannot train edits (the source reaches the post-decoder "
                    "only through the connectors): move the task to a later stage",
                )
            )
    return out


class Recipe(StrictModel):
    name: str = Field(min_length=1)
    seed: int = 0
    model: ModelConfig
    data: dict[str, DataConfig] = Field(min_length=1)
    stages: list[StageConfig] = Field(min_length=1)
    workers: int = Field(2, ge=1, description="Ray Train workers (overridable by --workers)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        """Every cross-field problem of the recipe at once, one line each."""
        problems: list[tuple[str, str]] = []
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(("stages", f"stage names must be unique; repeated: {dup}"))
        family = self.model.family
        supported = FAMILIES[family].tasks
        for i, stage in enumerate(self.stages):
            problems += [(f"stages.{i}.{path}", msg) for path, msg in stage.problems()]
            for message in trainable_problems(family, stage.trainable):
                problems.append((f"stages.{i}.trainable", message))
            problems += [
                (f"stages.{i}.optimizer.groups{path}", message)
                for path, message in optimizer_group_problems(family, stage)
            ]
            problems += distill_problems(family, stage, i)
            for task_name, task in stage.tasks.items():
                if task.vlm_fps is not None and family != "vino":
                    warn_ineffective(
                        f"stages.{stage.name}.tasks.{task_name}.vlm_fps", "only vino reads it"
                    )
                if task_name not in supported:
                    problems.append(
                        (
                            f"stages.{i}.tasks.{task_name}",
                            f"{family} does not train {task_name}; its tasks: "
                            f"{', '.join(supported)}",
                        )
                    )
                if task.data not in self.data:
                    problems.append(
                        (
                            f"stages.{i}.tasks.{task_name}.data",
                            f"{task.data!r} is not a key of the data section; allowed: "
                            f"{', '.join(sorted(self.data))}",
                        )
                    )
        problems += fresh_problems(
            family,
            self.model.size,
            [(s.name, s.trainable) for s in self.stages],
            {i for i, s in enumerate(self.stages) if s.distill},  # warmups: no connected pass
        )
        raise_problems(problems)
        return self

    def stage_index(self, name_or_number: str | int) -> int:
        """Stage position from its name or its 1-based number."""
        if isinstance(name_or_number, int) or str(name_or_number).isdigit():
            i = int(name_or_number) - 1
            if not 0 <= i < len(self.stages):
                raise ValueError(f"stage {name_or_number} does not exist (1..{len(self.stages)})")
            return i
        for i, stage in enumerate(self.stages):
            if stage.name == name_or_number:
                return i
        raise ValueError(
            f"unknown stage {name_or_number!r}; stages: {[s.name for s in self.stages]}"
        )
