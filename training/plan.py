"""``train plan``: what each stage of a recipe will do, without training anything: module
groups and parameters (with each group's own optimizer settings), the global batch, tasks and
bucket shapes (``describe``), and the data check against the real data
(``training.preflight``; ``data_tables``: each task's buckets, samples and batch)."""

from __future__ import annotations

import fnmatch

from rich.table import Table
from rich.text import Text

from catalog.shards import ASPECT_CLASSES
from training.data.buckets import batch_size_for, bucket_for
from training.data.hybrid import group_of
from training.preflight import DataCheck
from training.recipe import FAMILIES, Recipe, StageConfig
from training.tasks import IMAGE_TASKS, task_spec


def build(recipe: Recipe, config_only: bool = False):
    """The recipe's model as the first stage builds it (``describe`` and the data check's
    geometry both need it). ``config_only``: from the backbones' configs alone, on the ``meta``
    device (no weights read, no memory taken; the same shapes and parameter counts)."""
    import contextlib

    import torch

    from core import weights
    from training.models.registry import build_model

    m = recipe.model
    meta = contextlib.ExitStack()
    if config_only:
        meta.enter_context(weights.config_only())
        meta.enter_context(torch.device("meta"))
    with meta:
        return build_model(
            m.family, m.size, m.pretrained, recipe.stages[0].timestep_shift, options=m.options()
        )


def widest_batches(stage: StageConfig, geo) -> dict[str, int]:
    """Task -> samples per GPU at its widest bucket (the smallest batch the stage packs)."""
    out = {}
    for name, task in stage.tasks.items():
        frames = 1 if name in IMAGE_TASKS else task.num_frames
        shapes = [
            bucket_for(w, h, frames, stage.frame_area, geo.spatial_factor, geo.temporal_factor)
            for w, h in ASPECT_CLASSES
        ]
        out[name] = min(
            batch_size_for(
                shape,
                stage.token_budget,
                geo.spatial_factor,
                geo.temporal_factor,
                task_spec(name).num_media,
                stage.batch_size,
            )
            for shape in shapes
        )
    return out


def batch_line(stage: StageConfig, workers: int, geo) -> str:
    """The stage's global batch: batch_size x workers x grad_accumulation, or with no
    batch_size what the token budget packs per GPU at each task's widest bucket."""
    widest = widest_batches(stage, geo)
    times = f"{workers} worker(s) x {stage.grad_accumulation} accumulation step(s)"
    if stage.batch_size is None:
        per_gpu = ", ".join(f"{t} {b}" for t, b in widest.items())
        return (
            f"global batch: the token budget's per-GPU batch x {times}; per GPU at the widest "
            f"bucket: {per_gpu}"
        )
    line = f"global batch {stage.global_batch(workers)} = {stage.batch_size} per GPU x {times}"
    short = {t: b for t, b in widest.items() if b < stage.batch_size}
    if short:
        fewer = ", ".join(f"{t} {b}" for t, b in short.items())
        line += f" [yellow](the token budget packs fewer at the widest bucket: {fewer})[/]"
    return line


def group_settings(stage: StageConfig, group: str) -> str:
    """``trains`` cell: a module group's own optimizer settings (``optimizer.groups``)."""
    for glob, own in stage.optimizer.groups.items():
        if fnmatch.fnmatchcase(group, glob):
            values = own.model_dump(exclude_none=True)
            shown = ", ".join(
                f"{k} {'/'.join(f'{x:g}' for x in v) if k == 'betas' else f'{v:g}'}"
                for k, v in values.items()
            )
            return f"yes ({shown})" if shown else "yes"
    return "yes"


def describe(recipe: Recipe, model=None, workers: int | None = None) -> list[Table | Text]:
    """Per stage: a table of module groups (parameters, trains, own optimizer settings) titled
    with steps, ZeRO and lr; a line with the global batch on ``workers`` (default: the
    recipe's); a table of tasks and their bucket shapes with the per-GPU batch of each."""
    model = build(recipe) if model is None else model
    workers = recipe.workers if workers is None else workers
    frozen = FAMILIES[recipe.model.family].frozen
    counts = {name: sum(p.numel() for p in g.parameters()) for name, g in model.groups.items()}
    geo = model.geometry
    tables = []
    for i, stage in enumerate(recipe.stages):
        trainable = [g for g in model.select_groups(stage.trainable) if g not in frozen]
        t = Table(
            title=f"stage {i + 1}: {stage.name}  ({stage.steps} steps, ZeRO-{stage.zero_stage}, "
            f"lr {stage.optimizer.lr:g} {stage.schedule.kind}"
            + (f", warmup {stage.schedule.warmup_steps}" if stage.schedule.warmup_steps else "")
            + (f", EMA {stage.ema.decay}" if stage.ema else "")
            + ")"
        )
        t.add_column("module group")
        t.add_column("parameters", justify="right")
        t.add_column("trains")
        for name, n in counts.items():
            trains = group_settings(stage, name) if name in trainable else "frozen"
            t.add_row(name, f"{n:,}", trains)
        total = sum(counts[n] for n in trainable)
        t.add_row("[bold]trainable[/]", f"[bold]{total:,}[/]", f"of {sum(counts.values()):,}")
        tables += [t, Text.from_markup(f"stage {i + 1} {batch_line(stage, workers, geo)}")]
        tasks = Table(
            title=f"stage {i + 1} tasks (frame area {stage.frame_area} px, "
            f"token budget {stage.token_budget}"
            + (f", at most {stage.batch_size} per batch" if stage.batch_size else "")
            + f", shift {stage.timestep_shift}"
            + (
                ", hybrid: a batch mixes one group's tasks of one shape, budget shared"
                if stage.hybrid
                else ""
            )
            + ")"
        )
        columns = ["task", "weight", "data", "frames", "fps", "buckets (F x H x W : batch)"]
        if stage.hybrid:
            columns.insert(1, "group")
        for col in columns:
            tasks.add_column(col)
        for name, task in stage.tasks.items():
            frames = 1 if name in IMAGE_TASKS else task.num_frames
            media = task_spec(name).num_media
            shapes = []
            for w, h in ASPECT_CLASSES:
                shape = bucket_for(
                    w, h, frames, stage.frame_area, geo.spatial_factor, geo.temporal_factor
                )
                b = batch_size_for(
                    shape,
                    stage.token_budget,
                    geo.spatial_factor,
                    geo.temporal_factor,
                    media_per_sample=media,
                    max_batch=stage.batch_size,
                )
                shapes.append(f"{shape}:{b}")
            tasks.add_row(
                name,
                *([group_of(name)] if stage.hybrid else []),
                f"{task.weight:g}",
                recipe.data[task.data].uri,
                str(frames),
                str(task.fps or "-"),
                " ".join(dict.fromkeys(shapes)),
            )
        tables.append(tasks)
    return tables


def data_tables(check: DataCheck) -> list[Table]:
    """One table per stage: each task's training buckets in the real data, their training
    samples, the samples held out for evaluation (``training/data/holdout.py``), the per-rank
    batch, what a full batch on every worker needs, and the bucket's warning."""
    tables: dict[str, Table] = {}
    ws = check.world_size
    for b in check.buckets:
        t = tables.get(b.stage)
        if t is None:
            t = tables[b.stage] = Table(title=f"stage {b.stage} data on {ws} worker(s)")
            full_col = f"full batch x {ws}"
            for col in ("task", "bucket", "samples", "held out", "batch / rank", full_col):
                t.add_column(col, justify="left" if col == "task" else "right")
            t.add_column("note")
        full = ws * b.batch
        note = ""
        if not b.drawable and b.samples == 0:
            note = "[yellow]every sample held out[/]"
        elif not b.drawable:
            note = f"[yellow]left out: fewer samples than the {ws} workers[/]"
        elif b.samples < full:
            note = "[yellow]smaller than a full batch: samples repeat[/]"
        t.add_row(b.task, b.bucket, str(b.samples), str(b.held_out), str(b.batch), str(full), note)
    return list(tables.values())


def memory_table(recipe: Recipe, shape, world_size: int, gpus) -> tuple[Table, list[str]]:
    """Per stage, the estimated memory per GPU rank on ``world_size`` ranks
    (``training.memory``), and a warning for each stage whose total exceeds ``gpus``' memory
    (a ``GpuInfo``; None: no GPU to compare with) naming the settings to change."""
    from training.memory import gib, knobs, run_dtype_bytes, stage_memory

    dtype = "bf16" if run_dtype_bytes(recipe.precision, on_gpu=True) == 2 else "fp32"
    against = (
        f"{gpus.count} x {gpus.name}, {gib(gpus.memory)} each ({gpus.source})"
        if gpus
        else "no GPU found to compare against"
    )
    t = Table(
        title=f"memory per GPU rank on {world_size} worker(s), {dtype} weights "
        f"(activations: a rough estimate, see training/memory.py); {against}"
    )
    for col in ("stage", "ZeRO", "ckpt", "weights", "grads", "optimizer", "EMA", "activations"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    t.add_column("total", justify="right")
    warnings = []
    for i, stage in enumerate(recipe.stages):
        m = stage_memory(recipe, i, shape, world_size, on_gpu=True)
        over = gpus is not None and m.total > gpus.memory
        total = f"[bold red]{gib(m.total)}[/]" if over else gib(m.total)
        parts = (m.weights, m.grads, m.optimizer, m.ema, m.activations)
        ckpt = "yes" if stage.gradient_checkpointing else "no"
        t.add_row(f"{i + 1} {stage.name}", str(stage.zero_stage), ckpt, *map(gib, parts), total)
        if over:
            warnings.append(
                f"stage {i + 1} ({stage.name}): about {gib(m.total)} per rank does not fit the "
                f"{gib(gpus.memory)} of a {gpus.name}; try {knobs(stage)}"
            )
    return t, warnings
