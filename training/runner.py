"""The driver of ``train run``: each stage is one Ray Train ``TorchTrainer`` run.

Output layout (``OUTPUT`` a local or shared folder, or an object-store prefix ``s3://`` /
``gs://``)::

    OUTPUT/recipe.yaml                     the resolved recipe (data pinned to versions)
    OUTPUT/stages/N-NAME/final.safetensors the stage's final weights (next stage starts here)
    OUTPUT/stages/N-NAME/done.json         written last: the stage is complete
    OUTPUT/ray/                            Ray Train storage: checkpoints, run state
    OUTPUT/run.json                        the driver's state: MLflow and catalog runs per stage

With ``OUTPUT`` in object storage the nodes share nothing but the bucket: Ray Train uploads
each checkpoint there (its ``storage_path``); each rank writes the stage's files to a local
stand-in and uploads them when it ends, rank 0's final weights last
(``trainer.Trainer.publish``); the next stage's workers read those weights from the bucket.
Every object is put whole, so ``final.safetensors`` and ``done.json`` mark a stage's end once
they exist.

Before anything is written or started, ``training.preflight`` checks the chosen stages' data
on the driver (samples per bucket against the world size and batch, captions) and refuses with
every problem in one message. The check also plans each data entry's held-out split
(``training/data/holdout.py``); a stage records the split of the entries it reads (rule, cutoff
and train / held-out counts per kind) as ``holdout`` in its catalog run's params and as
``holdout.DATA.*`` params of its MLflow run.

A stage boundary builds a new engine (the trainable set changes) from the previous stage's
final weights. Rerunning with ``--resume`` skips finished stages and resumes the first
unfinished one from the newest valid checkpoint Ray Train kept for it (Ray Train restores its
list by run name + storage path). A damaged or incomplete checkpoint (``checkpoint.verify``) is
skipped for the one before it: the driver says so on the console and in the stage's catalog
run message before the stage starts, rank 0 in the worker log and as the MLflow tag
``omniforge.resume`` (also after a worker restart within a run). When none is usable the stage
stops with one message naming each and why, without Ray Train's retries.

While a stage runs, rank 0 reports every step to the driver (``training.progress``: a live
line on a terminal, a plain line every ``progress_every`` steps off one), and Ray Train's
controller reports a failed worker and whether it restarts the workers; the restarted rank 0
says which checkpoint it resumed from.

Workers stop with the driver: every worker on the driver's node watches the driver process
(``trainer.DriverWatch``) and exits when it is gone, checking again before each checkpoint,
so a killed driver leaves no worker training and no checkpoint beyond ``num_to_keep``. (With
``ray.init()`` started by the driver, its raylet and GCS die with it but the workers notice
only seconds later; on a cluster Ray ends a dead driver's actors itself.)
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.db import CatalogError
from catalog.lifecycle import run_lifecycle
from catalog.names import is_catalog_uri
from catalog.records import Node
from core import storage
from core.cluster import init_ray
from core.config import dump_yaml
from core.storage import Location
from core.tracking import log_artifacts, reopen_run, set_tags
from training import checkpoint as ckpt
from training import preflight
from training.progress import PLAIN_EVERY_STEPS, StageFeed, StageProgress
from training.ray_stage import (
    PLACEMENTS,
    checkpoint_failure,
    driver_identity,
    hold_request,
    resume_point,
    run_stage,
)
from training.recipe import Recipe
from training.trainer import FINAL, StageSpec

log = logging.getLogger(__name__)


def stage_dir(output: Location, recipe: Recipe, index: int) -> str:
    """The stage's folder: a local path or an object-store URI."""
    return output.join("stages", f"{index + 1}-{recipe.stages[index].name}")


def pin_data(recipe: Recipe, catalog, *, strict: bool = True) -> tuple[Recipe, list[str]]:
    """Replace ``@latest`` by the concrete committed version, so every rank and every resume
    reads the same data; returns the recipe and the dataset references it reads. Reads the
    catalog, writes nothing. ``strict=False`` leaves an entry that does not resolve (no
    catalog, unknown dataset or version) as it is, for the data check to report with every
    other problem."""
    data, refs = {}, []
    for name, source in recipe.data.items():
        uri = source.uri
        if is_catalog_uri(uri):
            try:
                if catalog is None:
                    raise ValueError(f"data.{name}.uri is {uri!r} but no catalog is configured")
                version = catalog.version_of(uri)
            except (ValueError, CatalogError):
                if strict:
                    raise
                data[name] = source.model_dump(mode="json")
                continue
            uri = version.ref
            refs.append(uri)
        data[name] = {**source.model_dump(mode="json"), "uri": uri}
    pinned = Recipe.model_validate({**recipe.model_dump(mode="json"), "data": data})
    return pinned, refs


def close_orphans(catalog, folder: str) -> None:
    """A driver killed between creating a stage's catalog run and recording it in run.json
    leaves that run "running" forever: mark it failed before the stage starts again."""
    for run in catalog.list_runs(kind="training_stage", limit=10_000):
        if run.status == "running" and run.params.get("output") == folder:
            catalog.update_run(
                run.id, status="failed", message="interrupted before it was recorded; rerun"
            )


@dataclass
class _Run:
    """What every stage of one ``run_training`` call shares."""

    recipe: Recipe
    out: Location
    refs: list[str]
    state: dict[str, Any]
    catalog: Any
    tracking_uri: str | None
    console: Any
    workers: int
    use_gpu: bool
    extra: dict[str, Any]  # StageSpec.extra: trace, driver identity, test hold
    stop_after: int | None
    splits: dict[str, Any]  # data key -> held-out split record (preflight.DataCheck.splits)
    progress_every: int = PLAIN_EVERY_STEPS  # off a terminal: a progress line every N steps
    placement: str = "PACK"  # ray_stage.PLACEMENTS

    def save_state(self) -> None:
        storage.write_text(self.out.join("run.json"), json.dumps(self.state, indent=1))

    def local_copy(self, name: str, text: str) -> Path:
        """A driver-side file also kept locally when the output is in object storage (what
        MLflow logs as an artifact)."""
        folder = storage.local_cache(self.out, "training") if self.out.remote else None
        path = (folder or self.out.local()) / name
        path.write_text(text)
        return path

    def say(self, text: str) -> None:
        if self.console:
            self.console.print(text, highlight=False)


def run_training(
    recipe: Recipe,
    output: str | Path,
    *,
    stages: list[int] | None = None,
    workers: int | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    catalog=None,
    resume: bool = False,
    console: Any = None,
    stop_after: int | None = None,
    trace: bool = False,
    progress_every: int = PLAIN_EVERY_STEPS,
    placement: str = "PACK",
) -> dict[str, Any]:
    """Run the recipe's stages (0-based indices; default all) and return a summary. With a
    ``console``, each stage shows the workers' progress (``training.progress``); ``placement``:
    how Ray places each stage's workers on the nodes (``ray_stage.PLACEMENTS``)."""
    from training import tracking

    if placement not in PLACEMENTS:
        raise ValueError(f"--placement {placement}: choose one of {', '.join(PLACEMENTS)}")
    out = storage.location(output, "--output")  # never a local folder named "s3:"
    state_file = out.join("run.json")
    if storage.exists(state_file) and not resume:
        raise ValueError(
            f"{out} holds a previous training run: pass --resume to continue it, "
            "or choose another --output"
        )
    # the data pinned first (catalog://NAME@latest read once: the version checked is the one
    # trained on), then checked against the recipe, every problem at once, before anything is
    # written or started
    recipe, _ = pin_data(recipe, catalog, strict=False)
    from training.models.distill import check_teachers

    check_teachers(recipe, stages)  # distillation teachers on disk (MissingWeights), unloaded
    check = preflight.run_check(
        recipe,
        world_size=max(1, recipe.workers if workers is None else workers),
        catalog=catalog,
        stages=stages,
        say=lambda line: console.print(line, highlight=False) if console else log.warning(line),
    )
    # an entry no chosen stage reads is not checked: one that does not resolve fails here
    recipe, refs = pin_data(recipe, catalog)
    storage.makedirs(out.uri)
    state = json.loads(storage.read_text(state_file)) if storage.exists(state_file) else {}
    state.setdefault("stages", {})
    if state.get("recipe") and state["recipe"] != recipe.model_dump(mode="json"):
        raise ValueError(f"{out} was trained with a different recipe; resume needs the same one")
    state["recipe"] = recipe.model_dump(mode="json")
    storage.write_text(out.join("recipe.yaml"), dump_yaml(recipe))
    if tracking_uri and not state.get("mlflow_parent"):
        state["mlflow_parent"] = tracking.start_parent(
            tracking_uri, recipe, catalog=catalog, output=out
        )
    elif tracking_uri:
        reopen_run(tracking_uri, state["mlflow_parent"])  # FAILED by an earlier stage
    storage.write_text(state_file, json.dumps(state, indent=1))
    chosen = list(range(len(recipe.stages))) if stages is None else stages
    previous = None
    if chosen and chosen[0] > 0:
        previous = f"{stage_dir(out, recipe, chosen[0] - 1)}/{FINAL}"
        if not storage.exists(previous):
            raise ValueError(
                f"stage {chosen[0]} starts from stage {chosen[0]}'s weights: {previous} "
                "is missing (run the earlier stages first)"
            )
    # the parent MLflow run fails with any stage and finishes with the last one
    with run_lifecycle(
        None,
        "training",
        recipe.name,
        tracking_uri=tracking_uri,
        mlflow_run_id=state.get("mlflow_parent"),
    ) as parent:
        use_gpu = _connect_ray(address)
        run = _Run(
            recipe,
            out,
            refs,
            state,
            catalog,
            tracking_uri,
            console,
            recipe.workers if workers is None else workers,
            use_gpu,
            {"trace": trace, "driver": driver_identity(), "hold": hold_request()},
            stop_after,
            check.splits,
            progress_every,
            placement,
        )
        summary: dict[str, Any] = {"output": str(out), "inputs": refs, "stages": []}
        for index in chosen:
            done = _train_stage(run, index, previous)
            summary["stages"].append(done)
            if tracking_uri and "elapsed_s" in done and not done.get("skipped"):
                stage_run, took = state["stages"][str(index)]["mlflow_run"], done["elapsed_s"]
                tracking.log_stage_summary(
                    tracking_uri, state["mlflow_parent"], stage_run, recipe, index, took
                )
            if "stopped_at" in done:
                break
            previous = done["weights"]
        if not all(
            storage.exists(f"{stage_dir(out, recipe, i)}/done.json")
            for i in range(len(recipe.stages))
        ):
            parent.stay_running()
    summary["mlflow_parent"] = state.get("mlflow_parent")
    return summary


def _connect_ray(address: str | None) -> bool:
    """Ray (local, or the cluster at ``address``); True when it has GPUs."""
    import ray

    init_ray(address)
    return ray.cluster_resources().get("GPU", 0) > 0


def _train_stage(run: _Run, index: int, previous: str | None) -> dict[str, Any]:
    """Stage ``index`` from start, resume or as finished earlier: its summary entry
    (``stopped_at`` when it stopped on purpose before its last step)."""
    from training import tracking

    recipe, stage = run.recipe, run.recipe.stages[index]
    folder = stage_dir(run.out, recipe, index)
    label = f"stage {index + 1} ({stage.name})"
    if storage.exists(f"{folder}/done.json"):
        run.say(f"{label}: finished earlier, skipped")
        return {**json.loads(storage.read_text(f"{folder}/done.json")), "skipped": True}
    storage.makedirs(folder)
    info = run.state["stages"].setdefault(str(index), {})
    reads = sorted({tc.data for tc in stage.tasks.values()})
    holdout = {key: run.splits.get(key) for key in reads}
    if run.tracking_uri and not info.get("mlflow_run"):
        parent = run.state["mlflow_parent"]
        info["mlflow_run"] = tracking.start_stage(
            run.tracking_uri,
            parent,
            recipe,
            index,
            run.refs,
            max(run.workers, 1),
            holdout=holdout,
        )
    elif run.tracking_uri:
        reopen_run(run.tracking_uri, info["mlflow_run"])
    if run.catalog is not None and not info.get("catalog_run"):
        close_orphans(run.catalog, folder)
    with run_lifecycle(
        run.catalog,
        "training_stage",
        f"{recipe.name} {label}",
        resume=info.get("catalog_run"),
        params={"output": folder, "holdout": holdout},
        tracking_uri=run.tracking_uri,
        mlflow_run_id=info.get("mlflow_run"),
    ) as lifecycle:
        if lifecycle.id is not None and not info.get("catalog_run"):
            info["catalog_run"] = lifecycle.id
            _link_catalog(run, info, index)
        run.save_state()
        spec = StageSpec(
            recipe=recipe.model_dump(mode="json"),
            stage_index=index,
            output=folder,
            init_weights=previous,
            catalog_url=str(run.catalog.url) if run.catalog is not None else None,
            tracking_uri=run.tracking_uri,
            mlflow_run_id=info.get("mlflow_run"),
            stop_after=run.stop_after,
            extra=run.extra,
        )
        global_batch = stage.global_batch(max(run.workers, 1))
        run.say(
            f"{label}: {stage.steps} steps on {max(run.workers, 1)} worker(s), "
            + (f"global batch {global_batch}, " if global_batch else "")
            + f"trains {', '.join(stage.trainable)}"
        )
        start = time.monotonic()
        run_name = f"{recipe.name}-{index + 1}-{stage.name}"
        ray_storage = run.out.join("ray")
        experiment = f"{ray_storage}/{run_name}"
        point = resume_point(experiment if run.out.remote else Path(experiment), label)
        if point is not None and point[1]:
            run.say(f"{label}: {point[1]}")
            log.warning("%s: %s", label, point[1])
            lifecycle.note(point[1])
        try:
            with _progress(run, label, stage.steps) as progress:
                result = run_stage(
                    spec,
                    run.workers,
                    run_name,
                    ray_storage,
                    run.use_gpu,
                    progress=progress,
                    placement=run.placement,
                )
        except Exception as e:
            failure = checkpoint_failure(e)
            if failure is None:
                raise
            raise ckpt.CheckpointError(f"{label}: {failure}") from e
        metrics = dict(result.metrics or {})
        final = f"{folder}/{FINAL}"
        if not storage.exists(final):  # stopped early on purpose (stop_after): resumable
            lifecycle.stay_running()
            return {"stage": stage.name, "stopped_at": metrics.get("step")}
        if run.catalog is not None:
            info["checkpoint"] = run.catalog.add_checkpoint(
                info["catalog_run"], final, step=stage.steps
            )
        if run.tracking_uri and info.get("mlflow_run"):
            recipe_file = run.local_copy("recipe.yaml", dump_yaml(recipe))
            log_artifacts(run.tracking_uri, info["mlflow_run"], [recipe_file])
    done = {
        "stage": stage.name,
        "index": index,
        "steps": stage.steps,
        "final_loss": metrics.get("loss"),
        "elapsed_s": time.monotonic() - start,
        "weights": final,
    }
    storage.write_text(f"{folder}/done.json", json.dumps(done, indent=1))
    run.save_state()
    return done


@contextmanager
def _progress(run: _Run, label: str, steps: int):
    """The stage's progress display while Ray Train runs it: the channel's address for the
    workers, or None without a console."""
    if run.console is None:
        yield None
        return
    display = StageProgress(run.console, label, steps, every_steps=run.progress_every)
    with StageFeed(display) as feed:
        yield feed.address


def _link_catalog(run: _Run, info: dict[str, Any], index: int) -> None:
    """A new stage run's lineage: the dataset versions it reads, the previous stage's
    checkpoint it starts from; its MLflow run tagged with the catalog run."""
    catalog, run_id = run.catalog, info["catalog_run"]
    for ref in run.refs:
        v = catalog.version_of(ref)
        catalog.add_edge(Node("version", v.id), Node("run", run_id), "input")
    prev_ckpt = run.state["stages"].get(str(index - 1), {}).get("checkpoint")
    if index > 0 and prev_ckpt:
        catalog.add_edge(Node("checkpoint", prev_ckpt), Node("run", run_id), "init")
    if run.tracking_uri and info.get("mlflow_run"):  # the MLflow run links back to the catalog
        set_tags(run.tracking_uri, info["mlflow_run"], {"omniforge.catalog_run": run_id})
