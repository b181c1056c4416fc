"""Labelled grids (training.grids) from media the tests paint: one cell per distinct sample,
labels drawn and matching their sample, edits as source beside target, videos as frames,
tiny frames enlarged with sharp pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.batch import TaskBatch
from training.data.buckets import BucketShape
from training.grids import (
    BACKGROUND,
    MAX_ROW_PANELS,
    PANEL_MAX,
    PANEL_MIN,
    TEXT_LINES,
    Cell,
    distinct,
    frame_indices,
    input_cells,
    render_grid,
)

RED, GREEN, BLUE, GRAY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (100, 100, 100)


def paint(colour: tuple[int, int, int], frames: int = 1, h: int = 16, w: int = 24) -> torch.Tensor:
    """(T, 3, H, W) in [-1, 1] of one colour (back to exactly ``colour`` when rendered)."""
    rgb = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    return rgb.expand(frames, 3, h, w).clone()


def video(levels: list[int], h: int = 16, w: int = 24) -> torch.Tensor:
    """(T, 3, H, W): frame i is flat gray ``levels[i]``."""
    return torch.cat([paint((v, v, v), 1, h, w) for v in levels])


def make_batch(task, keys, pixels, texts, source=None) -> TaskBatch:
    n = len(keys)
    return TaskBatch(
        task=task,
        keys=list(keys),
        pixels=torch.stack(pixels),
        input_ids=torch.zeros(n, 4, dtype=torch.int64),
        attention_mask=torch.ones(n, 4, dtype=torch.int64),
        source_pixels=None if source is None else torch.stack(source),
        texts=list(texts),
    )


def colours(grid, box) -> set[tuple[int, ...]]:
    return {tuple(p) for p in np.asarray(grid.image.crop(box)).reshape(-1, 3)}


def drawn(grid, box) -> bool:
    """Whether anything but the background is drawn in ``box`` (text is)."""
    return colours(grid, box) != {BACKGROUND}


def test_a_one_sample_bucket_shows_one_cell():
    bucket = BucketShape(1, 16, 24)
    batch = make_batch("t2i", ["only"] * 11, [paint(RED)] * 11, ["a red card"] * 11)
    grid = render_grid(input_cells(batch, bucket, 8), "inputs · t2i")
    assert len(grid.cells) == 1
    (cell,) = grid.cells
    assert len(cell.panels) == 1 and colours(grid, cell.panels[0].box) == {RED}
    # the grid is one cell wide, not eleven
    assert grid.image.width < 2 * (cell.label_box[2] - cell.label_box[0])


def test_cells_are_the_distinct_samples_in_order_with_their_own_labels():
    bucket = BucketShape(1, 16, 24)
    keys = ["a", "b", "a", "c", "b", "a"]
    paints = {"a": RED, "b": GREEN, "c": BLUE}
    batch = make_batch("t2i", keys, [paint(paints[k]) for k in keys], [f"prompt {k}" for k in keys])
    assert distinct(keys) == [0, 1, 3] and distinct(keys, 2) == [0, 1]
    grid = render_grid(input_cells(batch, bucket, 8))
    assert [c.label[1] for c in grid.cells] == ["a", "b", "c"]
    for cell, key in zip(grid.cells, "abc", strict=True):
        assert cell.label == ("t2i · 1x16x24", key, f"prompt: prompt {key}")
        assert drawn(grid, cell.label_box)
        assert colours(grid, cell.panels[0].box) == {paints[key]}
    assert len(render_grid(input_cells(batch, bucket, 2)).cells) == 2  # the limit


def test_label_regions_carry_text_and_blank_labels_do_not():
    """The label box is where the text is: an empty label leaves it blank, a label does not."""
    pixels = {"medium": paint(GRAY)}
    grid = render_grid([Cell(("x",), "", pixels), Cell((" ",), "", pixels)])
    assert drawn(grid, grid.cells[0].label_box)
    assert not drawn(grid, grid.cells[1].label_box)


def test_edit_cells_show_source_beside_target():
    bucket = BucketShape(1, 16, 24)
    batch = make_batch("i2i_edit", ["e0", "e1"], [paint(BLUE), paint(GREEN)],
                       ["make it blue", "make it green"], source=[paint(RED), paint(GRAY)])  # fmt: skip
    grid = render_grid(input_cells(batch, bucket, 8))
    assert len(grid.cells) == 2
    for cell, (src, tgt) in zip(grid.cells, [(RED, BLUE), (GRAY, GREEN)], strict=True):
        source, target = cell.panels
        assert (source.role, target.role) == ("source", "target")
        assert source.box[1] == target.box[1] and source.box[2] <= target.box[0]  # side by side
        assert colours(grid, source.box) == {src} and colours(grid, target.box) == {tgt}
    assert grid.cells[0].label[2] == "instruction: make it blue"


def test_video_cells_show_frames_from_first_to_last():
    bucket = BucketShape(9, 16, 24)
    levels = [10 * i for i in range(9)]
    batch = make_batch("t2v", ["v0"], [video(levels)], ["a fade"])
    (cell,) = render_grid(input_cells(batch, bucket, 4)).cells
    assert frame_indices(9) == [0, 3, 5, 8]
    assert [(p.role, p.frame) for p in cell.panels] == [("video", i) for i in (0, 3, 5, 8)]
    tops = {p.box[1] for p in cell.panels}
    assert len(tops) == 1  # a row of frames
    grid = render_grid(input_cells(batch, bucket, 4))
    for panel in grid.cells[0].panels:
        v = levels[panel.frame]
        assert colours(grid, panel.box) == {(v, v, v)}


def test_video_edit_cells_have_a_row_of_frames_per_medium():
    bucket = BucketShape(5, 16, 24)
    batch = make_batch("v2v_edit", ["ve"], [video([200] * 5)], ["brighten"],
                       source=[video([50] * 5)])  # fmt: skip
    grid = render_grid(input_cells(batch, bucket, 4))
    panels = grid.cells[0].panels
    rows = {}
    for p in panels:
        rows.setdefault(p.role, []).append(p)
    assert list(rows) == ["source", "target"] and [len(r) for r in rows.values()] == [4, 4]
    assert rows["source"][0].box[1] < rows["target"][0].box[1]  # source above target
    assert colours(grid, rows["source"][0].box) == {(50, 50, 50)}
    assert colours(grid, rows["target"][-1].box) == {(200, 200, 200)}


def test_tiny_frames_are_enlarged_with_sharp_pixels_and_large_ones_reduced():
    checker = torch.tensor([[(i + j) % 2 for j in range(8)] for i in range(8)], dtype=torch.float32)
    pixels = (checker * 2 - 1).expand(1, 3, 8, 8)  # black / white 8x8
    grid = render_grid([Cell(("tiny",), "", {"output": pixels})])
    box = grid.cells[0].panels[0].box
    assert (box[2] - box[0], box[3] - box[1]) == (PANEL_MIN, PANEL_MIN)  # x16, nearest
    assert colours(grid, box) == {(0, 0, 0), (255, 255, 255)}  # no blur between the blocks
    block = PANEL_MIN // 8
    assert colours(grid, (box[0], box[1], box[0] + block, box[1] + block)) == {(0, 0, 0)}

    big = render_grid([Cell(("big",), "", {"output": paint(RED, 1, 512, 1024)})])
    box = big.cells[0].panels[0].box
    assert (box[2] - box[0], box[3] - box[1]) == (2 * PANEL_MAX, PANEL_MAX)


def test_long_prompts_wrap_within_the_cell_and_are_cut():
    text = " ".join(f"word{i}" for i in range(200))
    grid = render_grid([Cell(("t2i · 1x16x24", "k" * 300), text, {"medium": paint(RED)})])
    (cell,) = grid.cells
    assert len(cell.label) == 2 + TEXT_LINES
    assert cell.label[1].endswith("…") and cell.label[-1].endswith("…")
    assert cell.label[2].startswith("word0 word1")
    assert drawn(grid, cell.label_box)


def test_many_cells_fill_rows_of_at_most_max_row_panels_frames():
    keys = [f"k{i}" for i in range(10)]
    batch = make_batch("t2i", keys, [paint(RED)] * 10, keys)
    grid = render_grid(input_cells(batch, BucketShape(1, 16, 24), 10))
    lefts = sorted({c.label_box[0] for c in grid.cells})
    tops = sorted({c.label_box[1] for c in grid.cells})
    assert len(lefts) == MAX_ROW_PANELS and len(tops) == 2  # 8 + 2 cells
    assert grid.image.height > 2 * PANEL_MIN


def test_bad_media_are_refused_with_the_cell_named():
    with pytest.raises(ValueError, match="needs at least one cell"):
        render_grid([])
    with pytest.raises(ValueError, match=r"output of \('x',\): expected \(T, C, H, W\)"):
        render_grid([Cell(("x",), "", {"output": torch.zeros(3, 8, 8)})])
