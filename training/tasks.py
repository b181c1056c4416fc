"""The task vocabulary: every training task, the sample kind it reads and what it produces.

A task reads one sample kind of the catalog (``catalog.schema.KINDS``) and either generates
pixels (``t2i``, ``t2v``; the edits also condition on a source medium) or understands a medium
(produces text about it). Its medium group (image or video, from the kind) decides the frame
count (image tasks: one frame) and which tasks a hybrid batch may mix. Recipes, loaders, model
families and the planner ask this module; no other module lists tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from catalog.schema import EDIT_KINDS, KINDS, VIDEO_KINDS

__all__ = [
    "EDIT_TASKS",
    "SPECS",
    "GENERATION_TASKS",
    "IMAGE_TASKS",
    "TASKS",
    "TASK_GROUPS",
    "TEXT_TO_MEDIA_TASKS",
    "UNDERSTANDING_TASKS",
    "VIDEO_TASKS",
    "TaskName",
    "TaskSpec",
    "task_spec",
]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # the sample kind it reads (catalog.schema.KINDS)
    output: Literal["pixels", "text"]  # generation | understanding
    doc: str

    @property
    def generation(self) -> bool:
        return self.output == "pixels"

    @property
    def edit(self) -> bool:
        """Conditions on a source medium (``src.*``) besides the text."""
        return self.kind in EDIT_KINDS

    @property
    def group(self) -> str:
        """``"image"`` or ``"video"``: one frame or many; hybrid batches mix within one."""
        return "video" if self.kind in VIDEO_KINDS else "image"

    @property
    def num_media(self) -> int:
        """Media per sample (edit: source and target), for token budgets."""
        return 2 if self.edit else 1


# The order is part of the data stream: a task's position seeds its loaders' shard shuffles
# (``TaskLoader``), so a new task goes at the end.
_SPECS = (
    TaskSpec("t2i", "image", "pixels", "text -> image generation"),
    TaskSpec("t2v", "video", "pixels", "text -> video generation"),
    TaskSpec("i2i_edit", "image_edit", "pixels", "image + instruction -> edited image"),
    TaskSpec("v2v_edit", "video_edit", "pixels", "video + instruction -> edited video"),
    TaskSpec("image_understanding", "image", "text", "image -> text"),
    TaskSpec("video_understanding", "video", "text", "video -> text"),
)
SPECS: dict[str, TaskSpec] = {s.name: s for s in _SPECS}
assert len(SPECS) == len(_SPECS) and all(s.kind in KINDS for s in _SPECS)

TASKS: tuple[str, ...] = tuple(SPECS)
# A recipe's task names are validated against this (pydantic reads the Literal's values).
TaskName = Literal[TASKS]  # type: ignore[valid-type]

GENERATION_TASKS = tuple(n for n, s in SPECS.items() if s.generation)
UNDERSTANDING_TASKS = tuple(n for n, s in SPECS.items() if not s.generation)
EDIT_TASKS = tuple(n for n, s in SPECS.items() if s.edit)
IMAGE_TASKS = tuple(n for n, s in SPECS.items() if s.group == "image")
VIDEO_TASKS = tuple(n for n, s in SPECS.items() if s.group == "video")
TASK_GROUPS = {"image": IMAGE_TASKS, "video": VIDEO_TASKS}
# Generation from text alone: what stage-end samples and ``can_generate`` need.
TEXT_TO_MEDIA_TASKS = tuple(n for n, s in SPECS.items() if s.generation and not s.edit)


def task_spec(name: str) -> TaskSpec:
    spec = SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return spec
