"""The task vocabulary: one table, every list derived from it."""

from __future__ import annotations

import typing

import pytest

from catalog.schema import KINDS
from training.tasks import (
    EDIT_TASKS,
    GENERATION_TASKS,
    IMAGE_TASKS,
    SPECS,
    TASK_GROUPS,
    TASKS,
    TEXT_TO_MEDIA_TASKS,
    UNDERSTANDING_TASKS,
    VIDEO_TASKS,
    TaskName,
    task_spec,
)


def test_task_order_is_fixed():
    # A task's position seeds its loaders' shard shuffles: reordering changes every stream.
    assert TASKS == (
        "t2i",
        "t2v",
        "i2i_edit",
        "v2v_edit",
        "image_understanding",
        "video_understanding",
    )
    assert typing.get_args(TaskName) == TASKS


def test_lists_partition_the_tasks():
    assert set(GENERATION_TASKS) | set(UNDERSTANDING_TASKS) == set(TASKS)
    assert not set(GENERATION_TASKS) & set(UNDERSTANDING_TASKS)
    assert TASK_GROUPS == {"image": IMAGE_TASKS, "video": VIDEO_TASKS}
    assert sorted(IMAGE_TASKS + VIDEO_TASKS) == sorted(TASKS)
    assert EDIT_TASKS == ("i2i_edit", "v2v_edit")
    assert TEXT_TO_MEDIA_TASKS == ("t2i", "t2v")
    assert {s.kind for s in SPECS.values()} == set(KINDS)  # every sample kind has a task


def test_task_spec():
    edit = task_spec("v2v_edit")
    assert (edit.kind, edit.group, edit.num_media, edit.generation) == (
        "video_edit",
        "video",
        2,
        True,
    )
    assert task_spec("image_understanding").output == "text"
    with pytest.raises(ValueError, match="unknown task 't3d'; tasks: t2i, t2v"):
        task_spec("t3d")
