"""``train plan``: what each stage of a recipe will do, without training anything: module
groups and parameters, tasks and bucket shapes (``describe``), and the data check against the
real data (``training.preflight``; ``data_tables``: each task's buckets, samples and batch)."""

from __future__ import annotations

from rich.table import Table

from catalog.shards import ASPECT_CLASSES
from training.data.buckets import batch_size_for, bucket_for
from training.data.hybrid import group_of
from training.preflight import DataCheck
from training.recipe import FAMILIES, Recipe
from training.tasks import IMAGE_TASKS, task_spec


def build(recipe: Recipe):
    """The recipe's model as the first stage builds it (``describe`` and the data check's
    geometry both need it)."""
    from training.models.registry import build_model

    m = recipe.model
    return build_model(
        m.family, m.size, m.pretrained, recipe.stages[0].timestep_shift, options=m.options()
    )


def describe(recipe: Recipe, model=None) -> list[Table]:
    model = build(recipe) if model is None else model
    frozen = FAMILIES[recipe.model.family].frozen
    counts = {name: sum(p.numel() for p in g.parameters()) for name, g in model.groups.items()}
    geo = model.geometry
    tables = []
    for i, stage in enumerate(recipe.stages):
        trainable = [g for g in model.select_groups(stage.trainable) if g not in frozen]
        t = Table(
            title=f"stage {i + 1}: {stage.name}  ({stage.steps} steps, ZeRO-{stage.zero_stage}, "
            f"lr {stage.optimizer.lr:g} {stage.schedule.kind}"
            + (f", EMA {stage.ema.decay}" if stage.ema else "")
            + ")"
        )
        t.add_column("module group")
        t.add_column("parameters", justify="right")
        t.add_column("trains")
        for name, n in counts.items():
            t.add_row(name, f"{n:,}", "yes" if name in trainable else "frozen")
        total = sum(counts[n] for n in trainable)
        t.add_row("[bold]trainable[/]", f"[bold]{total:,}[/]", f"of {sum(counts.values()):,}")
        tables.append(t)
        tasks = Table(
            title=f"stage {i + 1} tasks (frame area {stage.frame_area} px, "
            f"token budget {stage.token_budget}, shift {stage.timestep_shift}"
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
    """One table per stage: each task's training buckets in the real data, their samples, the
    per-rank batch, what a full batch on every worker needs, and the bucket's warning."""
    tables: dict[str, Table] = {}
    ws = check.world_size
    for b in check.buckets:
        t = tables.get(b.stage)
        if t is None:
            t = tables[b.stage] = Table(title=f"stage {b.stage} data on {ws} worker(s)")
            for col in ("task", "bucket", "samples", "batch / rank", f"full batch x {ws}"):
                t.add_column(col, justify="left" if col == "task" else "right")
            t.add_column("note")
        full = ws * b.batch
        note = ""
        if not b.drawable:
            note = f"[yellow]left out: fewer samples than the {ws} workers[/]"
        elif b.samples < full:
            note = "[yellow]smaller than a full batch: samples repeat[/]"
        t.add_row(b.task, b.bucket, str(b.samples), str(b.batch), str(full), note)
    return list(tables.values())
