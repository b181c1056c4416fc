"""What training logs to MLflow: a parent run per ``train run``, a nested run per stage; rank 0
logs the stage's metrics (``core.tracking.MetricLogger``).

The driver creates the runs (so a stage run exists even if every worker dies) and hands the
stage run id to the workers. Every MLflow call goes through ``core.tracking``.

What a reviewer finds on the parent run (named ``RECIPE-YYYYMMDD-HHMMSS-xxxx``):

- description: the recipe, its stages, the datasets, the results so far and how to resume;
- params: the whole recipe, flattened and masked;
- tags: ``omniforge.kind`` (``training``), ``omniforge.recipe``, ``omniforge.output``,
  ``omniforge.inputs``, the source tags (``core.tracking.source_tags``: command, user, git);
- datasets: every dataset version the recipe reads (``catalog://NAME@VERSION``, its index
  as source);
- metrics, per finished stage ``N-NAME/``: ``loss/final``, ``loss/best``, the same per task
  (``loss/TASK/final``...), held-out loss per task at the stage's start and end
  (``eval_loss/TASK/start``, ``/end``), ``steps`` and ``wall_time_s``; over the finished
  stages ``steps``, ``wall_time_s`` and ``stages_done``.

Stage runs are named ``stage N/COUNT: NAME (PARENT NAME)``, so their order shows in any list.
Their params include ``holdout.DATA.*``, the held-out split of each data entry the stage reads
(``training/data/holdout.py``), and their tags ``omniforge.eval_data.TASK``: whether a task's
``eval_loss`` is measured on held-out samples or, lacking any, on training samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from catalog.names import DatasetRef, is_catalog_uri
from core import tracking
from core.secrets import mask_urls
from core.tracking import DatasetRecord


def start_parent(
    tracking_uri: str,
    recipe,
    experiment: str = "training",
    *,
    catalog: Any = None,
    output: str | Path | None = None,
) -> str:
    """Create the parent run of a ``train run``: the recipe as params, the dataset versions
    it reads (resolved in ``catalog``) as inputs, a description, the source tags."""
    datasets = recipe_datasets(recipe, catalog)
    tags = {
        **tracking.source_tags(),
        "omniforge.kind": "training",
        "omniforge.recipe": recipe.name,
        "omniforge.inputs": ",".join(d.name for d in datasets),
    }
    if output is not None:
        tags["omniforge.output"] = str(output)
    return tracking.start_run(
        tracking_uri,
        experiment,
        tracking.unique_run_name(recipe.name),
        params=recipe,
        tags=tags,
        inputs=datasets,
        description=describe(recipe, datasets, tags.get("omniforge.output"), tracking_uri, {}),
    )


def start_stage(
    tracking_uri: str,
    parent_id: str,
    recipe,
    stage_index: int,
    inputs: Sequence[str],
    workers: int | None = None,
    holdout: Mapping[str, Any] | None = None,
) -> str:
    """A nested run for stage ``stage_index``: its params (``stage.*``, ``model.*``,
    ``stage.global_batch`` on ``workers``, default the recipe's, when the stage sets
    ``batch_size`` (otherwise the token budget decides it per bucket), and ``holdout.DATA.*``:
    each data entry's held-out split, ``Split.record()``: fraction, salt, min_samples, cutoff,
    train and held-out counts per kind; ``none`` for an entry without one), the datasets its
    tasks read, as the parent logged them (``inputs``: the catalog references of the run, for a
    parent that has none logged), a description and the source tags."""
    stage = recipe.stages[stage_index]
    parent = tracking.read_run(tracking_uri, parent_id)
    logged = {d.name: d for d in tracking.run_datasets(tracking_uri, parent_id)}
    # dataset names are masked URIs (uri_dataset): compare masked with masked
    reads = list(dict.fromkeys(mask_urls(recipe.data[t.data].uri) for t in stage.tasks.values()))
    datasets = [logged[u] for u in reads if u in logged]
    datasets += [uri_dataset(u) for u in inputs if mask_urls(u) in reads and u not in logged]
    count = len(recipe.stages)
    params = {"stage": stage.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    global_batch = stage.global_batch(max(1, recipe.workers if workers is None else workers))
    if global_batch is not None:
        params["stage"]["global_batch"] = global_batch
    if holdout:
        params["holdout"] = {k: "none" if v is None else v for k, v in holdout.items()}
    tags = {
        **tracking.source_tags(),
        "omniforge.kind": "training_stage",
        "omniforge.recipe": recipe.name,
        "omniforge.stage": stage.name,
        "omniforge.stage_index": f"{stage_index + 1}/{count}",
        "omniforge.inputs": ",".join(d.name for d in datasets),
    }
    tasks = ", ".join(
        f"{name} (weight {task.weight:g}, data `{mask_urls(recipe.data[task.data].uri)}`)"
        for name, task in stage.tasks.items()
    )
    description = (
        f"Stage {stage_index + 1} of {count} of recipe **{recipe.name}** (parent run "
        f"`{parent.name}`): trains {', '.join(stage.trainable)} for {stage.steps} steps "
        f"(lr {stage.optimizer.lr:g}, checkpoint every {stage.checkpoint_every}).\n\n"
        f"Tasks: {tasks}."
    )
    return tracking.start_run(
        tracking_uri,
        "",
        f"stage {stage_index + 1}/{count}: {stage.name} ({parent.name})",
        params=params,
        parent_id=parent_id,
        inputs=datasets,
        tags=tags,
        description=description,
    )


def log_stage_summary(
    tracking_uri: str,
    parent_id: str,
    stage_run_id: str,
    recipe,
    stage_index: int,
    wall_time_s: float,
) -> dict[str, float]:
    """A finished stage on the parent run: its final and best loss (overall and per task),
    its held-out loss per task at start and end, steps and wall time (``N-NAME/...``), read
    from the stage run's metric history (each step once, also across resumes); the totals
    over the finished stages; the description's results. Returns the stage's metrics."""
    prefix = stage_prefix(recipe, stage_index)
    histories = tracking.metric_histories(
        tracking_uri,
        stage_run_id,
        lambda k: k == "loss" or k.startswith(("loss/", "eval_loss/")),
    )
    metrics: dict[str, float] = {}
    for key, history in histories.items():
        values = [v for _, v in history]
        if not values:
            continue
        if key.startswith("eval_loss/"):
            metrics[f"{prefix}/{key}/start"] = values[0]
            metrics[f"{prefix}/{key}/end"] = values[-1]
        else:
            metrics[f"{prefix}/{key}/final"] = values[-1]
            metrics[f"{prefix}/{key}/best"] = min(values)
    metrics[f"{prefix}/steps"] = float(max((s for s, _ in histories.get("loss", [])), default=0))
    metrics[f"{prefix}/wall_time_s"] = float(wall_time_s)
    tracking.log_metrics(tracking_uri, parent_id, metrics)

    parent = tracking.read_run(tracking_uri, parent_id)
    done = [stage_prefix(recipe, i) for i in range(len(recipe.stages))]
    done = [p for p in done if f"{p}/steps" in parent.metrics]
    totals = {
        "steps": sum(parent.metrics[f"{p}/steps"] for p in done),
        "wall_time_s": sum(parent.metrics.get(f"{p}/wall_time_s", 0.0) for p in done),
        "stages_done": float(len(done)),
    }
    tracking.log_metrics(tracking_uri, parent_id, totals, step=len(done))
    datasets = tracking.run_datasets(tracking_uri, parent_id)
    output = parent.tags.get("omniforge.output")
    text = describe(recipe, datasets, output, tracking_uri, {**parent.metrics, **metrics})
    tracking.set_description(tracking_uri, parent_id, text)
    return metrics


def stage_prefix(recipe, index: int) -> str:
    """``1-align``: a stage's metric group on the parent (the stage folder's name too)."""
    return f"{index + 1}-{recipe.stages[index].name}"


def recipe_datasets(recipe, catalog: Any) -> list[DatasetRecord]:
    """The datasets the (pinned) recipe reads, once each: catalog versions from ``catalog``
    (their index as source, counts as profile), other URIs as they are."""
    out: dict[str, DatasetRecord] = {}
    for source in recipe.data.values():
        uri = source.uri
        if uri in out:
            continue
        if is_catalog_uri(uri) and catalog is not None:
            ref = DatasetRef.parse(uri)
            out[uri] = tracking.catalog_dataset(catalog.get_version(ref.name, ref.version))
        else:
            out[uri] = uri_dataset(uri)
    return list(out.values())


def uri_dataset(uri: str) -> DatasetRecord:
    """A dataset known only by its URI (shards outside the catalog): digest from the URI."""
    uri = mask_urls(uri)
    return DatasetRecord(uri, hashlib.sha256(uri.encode()).hexdigest()[:12], uri)


def describe(
    recipe,
    datasets: Sequence[DatasetRecord],
    output: str | None,
    tracking_uri: str | None,
    metrics: Mapping[str, float],
) -> str:
    """The parent run's description (Markdown): the recipe, a table of its stages with the
    results of the finished ones (from ``metrics``), the datasets and how to resume."""
    model = recipe.model
    lines = [
        f"**{recipe.name}**: {model.family} ({model.size}), {len(recipe.stages)} stage(s)"
        + (f", output `{output}`." if output else "."),
        "",
        "| stage | trains | tasks (weight) | steps | final loss | best loss | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, stage in enumerate(recipe.stages):
        p = stage_prefix(recipe, i)
        tasks = ", ".join(f"{name} ({t.weight:g})" for name, t in stage.tasks.items())
        final, best = metrics.get(f"{p}/loss/final"), metrics.get(f"{p}/loss/best")
        wall = metrics.get(f"{p}/wall_time_s")
        lines.append(
            f"| {i + 1}/{len(recipe.stages)} {stage.name} | {', '.join(stage.trainable)} | "
            f"{tasks} | {stage.steps} | {_number(final)} | {_number(best)} | "
            f"{'-' if wall is None else f'{wall:.0f} s'} |"
        )
    lines += ["", "Datasets:"]
    for d in datasets:
        samples = d.profile.get("samples")
        count = f", {samples} samples" if samples is not None else ""
        lines.append(f"- `{d.name}` (source `{d.source}`{count})")
    if output:
        resume = f"omniforge train run {output}/recipe.yaml --output {output} --resume"
        if tracking_uri:
            resume += f" --tracking-uri {mask_urls(tracking_uri)}"
        lines += [
            "",
            "Resume (finished stages are skipped; an unfinished one continues from its newest "
            "valid checkpoint; add the original command's `--catalog`, tag "
            "`omniforge.command`):",
            "",
            f"    {resume}",
        ]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
