"""Training recipe (YAML, validated): a model family + size, named data, and ordered stages.

Each stage names the module groups it trains (globs over the family's groups), its optimizer,
schedule, EMA, ZeRO stage, frame area, timestep shift, condition-dropout rate, a task
mixture (task -> weight + data + frames/fps) and whether batches mix tasks (``hybrid``: tasks
of one group, image or video, that share a bucket shape; see ``training/data/hybrid.py``).
Data is ``catalog://NAME@VERSION`` (+ a filter on
index columns) or shard paths/globs.

Validation reports every cross-field problem at once (``core.config.ConfigProblems``, one line
each): task data keys, video frame counts, ``trainable`` globs against the family's module
groups (``FAMILIES``, no model is built), tasks the family cannot train and, at production
sizes, freshly initialised groups left frozen where a stage trains through them
(``training.fresh``). Whether the data
itself can feed the stages (samples per bucket, captions) needs the data: ``training.preflight``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from catalog.names import DatasetRef, is_catalog_uri
from core.config import StrictModel, raise_problems, warn_ineffective
from training.fresh import fresh_problems
from training.tasks import GENERATION_TASKS, TASK_GROUPS, TASKS, TaskName, task_spec

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
        ("vlm", "learnable_queries", "connector", "mmdit", "vae", "vision_encoder"),
        ("vae", "vision_encoder"),
        GENERATION_TASKS,
    ),
}


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


class ModelConfig(StrictModel):
    family: Family
    size: str = Field(
        "tiny", description="'tiny' builds in-process; others wrap pretrained backbones"
    )
    pretrained: dict[str, str] = Field(
        default_factory=dict, description="module group -> local weights dir (production sizes)"
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.size == "tiny" and self.pretrained:
            warn_ineffective("model.pretrained", "size 'tiny' builds every module from scratch")
        return self


class DataConfig(StrictModel):
    uri: str = Field(description="catalog://NAME@VERSION, or a shard path / glob / fsspec URI")
    filter: str | None = Field(None, description="expression on index columns, e.g. aesthetic > 5")

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


class OptimizerConfig(StrictModel):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0, le=1)
    eps: float = Field(1e-8, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must each be in [0, 1), got {list(v)}")
        return v


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
    hybrid: bool = Field(
        False, description="batches mix the tasks of one group (image | video) sharing a shape"
    )
    tasks: dict[TaskName, TaskConfig] = Field(min_length=1)
    steps: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)

    def problems(self) -> list[tuple[str, str]]:
        """(path relative to the stage, message) of each inconsistent setting."""
        out = []
        for name, task in self.tasks.items():
            group = task_spec(name).group
            if group == "video" and task.num_frames is None:
                out.append((f"tasks.{name}.num_frames", "required for a video task"))
            if group == "image" and task.num_frames not in (None, 1):
                out.append((f"tasks.{name}.num_frames", "must be 1 or unset for an image task"))
        return out

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        """Warnings only: errors are collected by ``Recipe`` with every other stage's."""
        for name, task in self.tasks.items():
            if task_spec(name).group == "image" and task.fps is not None:
                warn_ineffective(f"stages.{self.name}.tasks.{name}.fps", "image task")
        if self.hybrid and all(
            sum(t in self.tasks for t in group) < 2 for group in TASK_GROUPS.values()
        ):
            warn_ineffective(
                f"stages.{self.name}.hybrid",
                "no image or video group has two tasks in this stage, so no batch can mix tasks",
            )
        if self.checkpoint_every > self.steps:
            warn_ineffective(
                f"stages.{self.name}.checkpoint_every",
                f"larger than steps ({self.steps}); only the final checkpoint is written",
            )
        return self


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
            for task_name, task in stage.tasks.items():
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
            family, self.model.size, [(s.name, s.trainable) for s in self.stages]
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
