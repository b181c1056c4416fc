"""Stage plans: curation -> training stage 1 -> stage 2 -> ... as one resumable programme.

A plan file names a curation config and a recipe's stages::

    name: omni-video-programme
    output: runs/programme            # relative paths are relative to the plan file
    tracking_uri: sqlite:///runs/programme/mlflow.db
    curation:
      input: data/raw                 # directory, manifest, tar(s) or fsspec URI
      config: curate.yaml             # optional; default profile
      set: [name=my-corpus]
    training:
      recipe: omni_video_tiny         # built-in name or YAML
      stages: 1-3
      workers: 2

Steps are ``curate`` and ``train-N`` (one per recipe stage). Each step records its run in the
catalog: the curation run produces a dataset version, the recipe's data entries that read the
curated dataset are pinned to that exact version, each stage run takes the version as input and
the previous stage's checkpoint as ``init``, and the plan's own catalog run (kind ``plan``)
links to every step run (``step``). ``OUTPUT/plan.json`` records progress; rerunning the plan
skips finished steps and resumes the first unfinished one (curation per partition, training from
the stage's last checkpoint). ``output`` may be an object-store prefix (``s3://``, ``gs://``):
the state, the curated version and the training run all go there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from catalog.lifecycle import failure_message, run_lifecycle
from catalog.names import DatasetRef, is_catalog_uri
from catalog.records import Node
from core import storage
from core.config import StrictModel, load_config
from core.secrets import has_secret
from core.storage import Location
from core.tracking import run_link
from orchestration.services import alive

STATE = "plan.json"


class PlanCuration(StrictModel):
    input: str = Field(..., description="corpus: directory, manifest, tar(s) or fsspec URI")
    config: str | None = Field(None, description="curation config YAML (default profile)")
    set: list[str] = Field(default_factory=list, description="overrides key.path=value")


class PlanTraining(StrictModel):
    recipe: str = Field(..., description="recipe YAML or built-in recipe name")
    stages: str | None = Field(None, description="e.g. 1-3 (default: all)")
    workers: int | None = Field(None, ge=0, description="Ray Train workers (default: recipe)")
    set: list[str] = Field(default_factory=list, description="overrides key.path=value")


class Plan(StrictModel):
    name: str = Field(..., min_length=1, description="the programme's name")
    output: str = Field(
        ..., description="folder or s3:// | gs:// prefix for every step's output and plan.json"
    )
    catalog: str | None = Field(None, description="catalog URL (default: environment)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI")
    address: str | None = Field(None, description="Ray cluster for the steps (default: local)")
    curation: PlanCuration | None = None
    training: PlanTraining | None = None


@dataclass
class Step:
    id: str  # "curate", "train-1", ...
    label: str
    stage_index: int | None = None


def load_plan(path: str | Path, overrides: list[str] | None = None) -> tuple[Plan, Location]:
    """The plan with its relative paths resolved against the plan file's folder."""
    path = Path(path)
    plan = load_config(Plan, path, overrides or [])
    base = path.resolve().parent

    def local(p: str | None) -> str | None:
        if p is None or "://" in p or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    output = storage.location(local(plan.output), f"{path}: output")
    changes: dict[str, Any] = {"output": output.uri}
    if plan.curation is not None:
        changes["curation"] = plan.curation.model_copy(
            update={"input": local(plan.curation.input), "config": local(plan.curation.config)}
        )
    if plan.training is not None and (base / plan.training.recipe).exists():
        changes["training"] = plan.training.model_copy(
            update={"recipe": local(plan.training.recipe)}
        )
    for field in ("catalog", "tracking_uri"):
        value = getattr(plan, field)
        if value and has_secret(value):
            raise ValueError(
                f"{path}: {field} holds a password; give it through the environment "
                "(OMNIFORGE_CATALOG_URL[_FILE], MLFLOW_TRACKING_PASSWORD) instead"
            )
        if value and value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
            changes[field] = "sqlite:///" + str((base / value[len("sqlite:///") :]).resolve())
    return plan.model_copy(update=changes), output


def load_recipe(plan: Plan):
    from orchestration.train_cmd import recipe_path
    from training.recipe import Recipe

    assert plan.training is not None
    return load_config(Recipe, recipe_path(plan.training.recipe), plan.training.set)


def steps(plan: Plan) -> list[Step]:
    from orchestration.train_cmd import parse_stages

    out = [Step("curate", "curation")] if plan.curation is not None else []
    if plan.training is not None:
        recipe = load_recipe(plan)
        chosen = parse_stages(plan.training.stages, len(recipe.stages))
        for i in chosen if chosen is not None else range(len(recipe.stages)):
            out.append(Step(f"train-{i + 1}", f"stage {i + 1} ({recipe.stages[i].name})", i))
    if not out:
        raise ValueError("the plan has neither a curation nor a training section")
    return out


def read_state(output: Location | Path | str) -> dict[str, Any]:
    """``OUTPUT/plan.json`` (a local folder or an object-store prefix)."""
    path = f"{output}/{STATE}"
    return json.loads(storage.read_text(path)) if storage.exists(path) else {"steps": {}}


def write_state(output: Location | Path | str, state: dict[str, Any]) -> None:
    storage.write_text(f"{output}/{STATE}", json.dumps(state, indent=1))


def run_plan(plan: Plan, output: Location, catalog, console=None) -> dict[str, Any]:
    """Run the plan's unfinished steps in order; returns the final state."""
    storage.makedirs(output.uri)
    state = read_state(output)
    if state.get("plan") and state["plan"] != plan.model_dump(mode="json"):
        raise ValueError(
            f"{output} holds a run of a different plan; restore the plan file or change output"
        )
    state["plan"] = plan.model_dump(mode="json")
    state["pid"] = os.getpid()
    todo = steps(plan)
    with run_lifecycle(
        catalog, "plan", plan.name, resume=state.get("catalog_run"), params={"output": str(output)}
    ) as run:
        state["catalog_run"] = run.id
        write_state(output, state)
        try:
            for step in todo:
                info = state["steps"].setdefault(step.id, {"status": "pending"})
                if info["status"] == "done":
                    _say(console, f"{step.id}: {step.label} finished earlier, skipped")
                    continue
                info.update(status="running", started=time.time())
                write_state(output, state)
                _say(console, f"{step.id}: {step.label}")
                if step.id == "curate":
                    _run_curation(plan, output, catalog, info, console)
                else:
                    _run_stage(plan, output, catalog, step, state, info, console)
                info.update(status="done", ended=time.time())
                for run_id in info.get("catalog_runs", []):
                    catalog.add_edge(Node("run", run.id), Node("run", run_id), "step")
                write_state(output, state)
        except BaseException as e:
            for info in state["steps"].values():
                if info.get("status") == "running":
                    info.update(status="failed", message=failure_message(e))
            write_state(output, state)
            raise
        if not all(state["steps"].get(s.id, {}).get("status") == "done" for s in todo):
            run.stay_running()
    return state


def _run_curation(plan: Plan, output: Location, catalog, info: dict, console) -> None:
    from curation.config import CurationConfig
    from curation.pipeline import run_curation

    assert plan.curation is not None
    cfg = load_config(CurationConfig, plan.curation.config, plan.curation.set)
    result = run_curation(
        plan.curation.input,
        output.join("curation"),
        cfg,
        catalog=catalog,
        address=plan.address,
        tracking_uri=plan.tracking_uri,
        console=console,
    )
    counts = result.version.counts
    info.update(
        result=", ".join(f"{counts.get(k, 0)} {k}" for k in ("accepted", "rejected", "error")),
        version=result.version.ref,
        catalog_runs=[result.version.run_id] if result.version.run_id else [],
        mlflow_run=result.mlflow_run_id,
    )


def _run_stage(plan: Plan, output: Location, catalog, step: Step, state: dict, info: dict, console):
    from training.runner import run_training

    assert plan.training is not None and step.stage_index is not None
    recipe = pin_to_curated(load_recipe(plan), state)
    folder = output.join("training")
    summary = run_training(
        recipe,
        folder,
        stages=[step.stage_index],
        workers=plan.training.workers,
        address=plan.address,
        tracking_uri=plan.tracking_uri,
        catalog=catalog,
        resume=storage.exists(f"{folder}/run.json"),
        console=console,
    )
    run_state = json.loads(storage.read_text(f"{folder}/run.json"))["stages"][str(step.stage_index)]
    loss = summary["stages"][-1].get("final_loss")
    info.update(
        result=f"final loss {loss:.4f}" if loss is not None else "done",
        catalog_runs=[run_state["catalog_run"]] if run_state.get("catalog_run") else [],
        mlflow_run=run_state.get("mlflow_run"),
        checkpoint=run_state.get("checkpoint"),
        version=",".join(summary.get("inputs", [])) or None,
    )


def pin_to_curated(recipe, state: dict[str, Any]):
    """Point the recipe's data entries that read the curated dataset at the exact version the
    plan's curation step committed (``catalog://NAME@latest`` -> ``catalog://NAME@3``)."""
    curated = state["steps"].get("curate", {}).get("version")
    if not curated:
        return recipe
    target = DatasetRef.parse(curated)
    data = {}
    for key, source in recipe.data.items():
        uri = source.uri
        if is_catalog_uri(uri) and DatasetRef.parse(uri).name == target.name:
            uri = curated
        data[key] = {**source.model_dump(mode="json"), "uri": uri}
    return type(recipe).model_validate({**recipe.model_dump(mode="json"), "data": data})


def status_rows(plan: Plan, output: Location, catalog) -> list[dict[str, Any]]:
    """One row per step: status (from plan.json, the catalog and whether the driver lives),
    result (sample counts / final loss), catalog run, version (``NAME@VERSION``, as ``catalog
    show`` takes it), MLflow run id and its page on an http(s) server."""
    state = read_state(output)
    driver_alive = bool(state.get("pid")) and alive(int(state["pid"]))
    rows = []
    for step in steps(plan):
        info = state["steps"].get(step.id, {})
        status = info.get("status", "pending")
        if status == "running" and not driver_alive:
            status = "interrupted"
        runs = info.get("catalog_runs") or []
        run_status = catalog.get_run(runs[-1]).status if runs and catalog else None
        version = info.get("version") or "-"
        mlflow_run = info.get("mlflow_run")
        link = run_link(plan.tracking_uri, mlflow_run)
        rows.append(
            {
                "step": step.id,
                "what": step.label,
                "status": status,
                "result": info.get("result") or "-",
                "catalog_run": f"{runs[-1]} ({run_status})" if runs else "-",
                "catalog_run_id": runs[-1] if runs else None,
                "catalog_run_status": run_status,
                "version": version.removeprefix("catalog://"),
                "mlflow": mlflow_run or "-",
                "mlflow_link": link if link.startswith(("http://", "https://")) else None,
            }
        )
    return rows


def _say(console, text: str) -> None:
    if console is not None:
        console.rule(text)
