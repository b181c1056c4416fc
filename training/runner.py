"""The driver of ``train run``: each stage is one Ray Train ``TorchTrainer`` run.

Output layout::

    OUTPUT/recipe.yaml                     the resolved recipe (data pinned to versions)
    OUTPUT/stages/N-NAME/final.safetensors the stage's final weights (next stage starts here)
    OUTPUT/stages/N-NAME/done.json         written last: the stage is complete
    OUTPUT/ray/                            Ray Train storage: checkpoints, run state

A stage boundary builds a new engine (the trainable set changes) from the previous stage's
final weights. Rerunning with ``--resume`` skips finished stages and resumes the first
unfinished one from its latest checkpoint (Ray Train restores it by run name + storage path).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from catalog.config import dump_yaml
from catalog.names import DatasetRef, is_catalog_uri
from catalog.records import Node
from training.recipe import Recipe
from training.trainer import StageSpec, Trainer, process_group


class RayTrainContext:
    """What a Trainer needs from Ray Train: report metrics + checkpoint, latest checkpoint."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory


def stage_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    with process_group():
        Trainer(StageSpec(**config), RayTrainContext()).train()


def stage_dir(output: Path, recipe: Recipe, index: int) -> Path:
    return output / "stages" / f"{index + 1}-{recipe.stages[index].name}"


def pin_data(recipe: Recipe, catalog) -> tuple[Recipe, list[str]]:
    """Replace ``@latest`` by the concrete committed version, so every rank and every resume
    reads the same data; returns the recipe and the dataset references it reads."""
    data, refs = {}, []
    for name, source in recipe.data.items():
        uri = source.uri
        if is_catalog_uri(uri):
            if catalog is None:
                raise ValueError(f"data.{name}.uri is {uri!r} but no catalog is configured")
            ref = DatasetRef.parse(uri)
            version = catalog.get_version(ref.name, ref.version)
            uri = version.ref
            refs.append(uri)
        data[name] = {**source.model_dump(mode="json"), "uri": uri}
    pinned = Recipe.model_validate({**recipe.model_dump(mode="json"), "data": data})
    return pinned, refs


def run_stage(
    spec: StageSpec,
    workers: int,
    run_name: str,
    storage: Path,
    use_gpu: bool,
    max_failures: int = 3,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        stage_loop,
        train_loop_config=asdict(spec),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def close_orphans(catalog, folder: Path) -> None:
    """A driver killed between creating a stage's catalog run and recording it in run.json
    leaves that run "running" forever: mark it failed before the stage starts again."""
    for run in catalog.list_runs(kind="training_stage", limit=10_000):
        if run.status == "running" and run.params.get("output") == str(folder):
            catalog.update_run(
                run.id, status="failed", message="interrupted before it was recorded; rerun"
            )


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
) -> dict[str, Any]:
    """Run the recipe's stages (0-based indices; default all) and return a summary."""
    import ray

    from training import tracking

    out = Path(output).resolve()
    state_file = out / "run.json"
    if state_file.exists() and not resume:
        raise ValueError(
            f"{out} holds a previous training run: pass --resume to continue it, "
            "or choose another --output"
        )
    out.mkdir(parents=True, exist_ok=True)
    recipe, refs = pin_data(recipe, catalog)
    state = json.loads(state_file.read_text()) if state_file.exists() else {"stages": {}}
    if state.get("recipe") and state["recipe"] != recipe.model_dump(mode="json"):
        raise ValueError(f"{out} was trained with a different recipe; resume needs the same one")
    state["recipe"] = recipe.model_dump(mode="json")
    (out / "recipe.yaml").write_text(dump_yaml(recipe))
    if tracking_uri and not state.get("mlflow_parent"):
        state["mlflow_parent"] = tracking.start_parent(tracking_uri, recipe)
    state_file.write_text(json.dumps(state, indent=1))

    if not ray.is_initialized():
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    num_workers = recipe.workers if workers is None else workers
    chosen = list(range(len(recipe.stages))) if stages is None else stages
    previous = None
    if chosen and chosen[0] > 0:
        previous = stage_dir(out, recipe, chosen[0] - 1) / "final.safetensors"
        if not previous.exists():
            raise ValueError(
                f"stage {chosen[0]} starts from stage {chosen[0]}'s weights: {previous} "
                "is missing (run the earlier stages first)"
            )
    summary: dict[str, Any] = {"output": str(out), "inputs": refs, "stages": []}
    for index in chosen:
        stage = recipe.stages[index]
        folder = stage_dir(out, recipe, index)
        if (folder / "done.json").exists():
            done = json.loads((folder / "done.json").read_text())
            summary["stages"].append({**done, "skipped": True})
            if console:
                console.print(f"stage {index + 1} ({stage.name}): finished earlier, skipped")
            previous = folder / "final.safetensors"
            continue
        folder.mkdir(parents=True, exist_ok=True)
        key = str(index)
        info = state["stages"].setdefault(key, {})
        if tracking_uri and not info.get("mlflow_run"):
            info["mlflow_run"] = tracking.start_stage(
                tracking_uri, state["mlflow_parent"], recipe, index, refs
            )
        if catalog is not None and not info.get("catalog_run"):
            close_orphans(catalog, folder)
            info["catalog_run"] = catalog.start_run(
                "training_stage",
                f"{recipe.name} stage {index + 1} ({stage.name})",
                params={"output": str(folder)},
                mlflow_run_id=info.get("mlflow_run"),
            )
            for ref in refs:
                parsed = DatasetRef.parse(ref)
                v = catalog.get_version(parsed.name, parsed.version)
                catalog.add_edge(Node("version", v.id), Node("run", info["catalog_run"]), "input")
            if previous is not None and state["stages"].get(str(index - 1), {}).get("checkpoint"):
                prev_ckpt = state["stages"][str(index - 1)]["checkpoint"]
                catalog.add_edge(
                    Node("checkpoint", prev_ckpt), Node("run", info["catalog_run"]), "init"
                )
            if tracking_uri and info.get("mlflow_run"):  # the MLflow run links back to the catalog
                from mlflow.tracking import MlflowClient

                MlflowClient(tracking_uri).set_tag(
                    info["mlflow_run"], "omniforge.catalog_run", str(info["catalog_run"])
                )
        state_file.write_text(json.dumps(state, indent=1))
        spec = StageSpec(
            recipe=recipe.model_dump(mode="json"),
            stage_index=index,
            output=str(folder),
            init_weights=str(previous) if previous else None,
            catalog_url=str(catalog.url) if catalog is not None else None,
            tracking_uri=tracking_uri,
            mlflow_run_id=info.get("mlflow_run"),
            stop_after=stop_after,
            extra={"trace": trace},
        )
        if console:
            console.print(
                f"stage {index + 1} ({stage.name}): {stage.steps} steps on "
                f"{max(num_workers, 1)} worker(s), trains {', '.join(stage.trainable)}"
            )
        start = time.monotonic()
        try:
            result = run_stage(
                spec, num_workers, f"{recipe.name}-{index + 1}-{stage.name}", out / "ray", use_gpu
            )
        except BaseException:
            if tracking_uri and info.get("mlflow_run"):
                tracking.finish(tracking_uri, info["mlflow_run"], "FAILED")
            if catalog is not None and info.get("catalog_run"):
                catalog.update_run(info["catalog_run"], status="failed")
            raise
        metrics = dict(result.metrics or {})
        final = folder / "final.safetensors"
        if not final.exists():  # stopped early on purpose (stop_after): resumable
            summary["stages"].append({"stage": stage.name, "stopped_at": metrics.get("step")})
            break
        if catalog is not None:
            info["checkpoint"] = catalog.add_checkpoint(
                info["catalog_run"], str(final), step=stage.steps
            )
            catalog.update_run(info["catalog_run"], status="succeeded")
        if tracking_uri and info.get("mlflow_run"):
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).log_artifact(info["mlflow_run"], str(out / "recipe.yaml"))
            tracking.finish(tracking_uri, info["mlflow_run"])
        done = {
            "stage": stage.name,
            "index": index,
            "steps": stage.steps,
            "final_loss": metrics.get("loss"),
            "elapsed_s": time.monotonic() - start,
            "weights": str(final),
        }
        (folder / "done.json").write_text(json.dumps(done, indent=1))
        state_file.write_text(json.dumps(state, indent=1))
        summary["stages"].append(done)
        previous = final
    if tracking_uri and all(
        (stage_dir(out, recipe, i) / "done.json").exists() for i in range(len(recipe.stages))
    ):
        tracking.finish(tracking_uri, state["mlflow_parent"])
    summary["mlflow_parent"] = state.get("mlflow_parent")
    return summary
