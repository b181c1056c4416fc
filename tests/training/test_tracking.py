"""The training MLflow runs (training.tracking): the parent run a reviewer opens first, its
stage runs and the summary of finished stages, against a real SQLite store and catalog."""

from __future__ import annotations

import copy
import json
import re

import pytest
from helpers import TINY_RECIPE

from core.config import validate
from core.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    SOURCE_ROOT,
    MetricLogger,
    finish_run,
    git_tags,
)
from training import tracking
from training.recipe import Recipe


@pytest.fixture
def uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("OMNIFORGE_JOB_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def two_stage_recipe(data_uri: str) -> Recipe:
    spec = copy.deepcopy(TINY_RECIPE)
    spec["data"]["main"] = {"uri": data_uri}
    second = copy.deepcopy(spec["stages"][0])
    second.update(name="unified", trainable=["dit"], steps=6)
    spec["stages"].append(second)
    return validate(Recipe, spec)


def test_the_parent_run_says_what_ran_where_from_and_on_which_data(
    uri, tmp_path, cat, committed_version
):
    from mlflow.tracking import MlflowClient

    version, _ = committed_version()
    recipe = two_stage_recipe(version.ref)
    out = tmp_path / "run"
    first = tracking.start_parent(uri, recipe, catalog=cat, output=out)
    second = tracking.start_parent(uri, recipe, catalog=cat, output=out)

    client = MlflowClient(uri)
    parent = client.get_run(first)
    names = {parent.info.run_name, client.get_run(second).info.run_name}
    assert len(names) == 2 and all(n.startswith(f"{recipe.name}-") for n in names)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    tags = parent.data.tags
    assert tags["omniforge.kind"] == "training" and tags["omniforge.recipe"] == recipe.name
    assert tags["omniforge.output"] == str(out) and tags["omniforge.inputs"] == version.ref
    # the git tags of the code that runs (none from a copy without .git)
    source = git_tags(SOURCE_ROOT)
    assert {k: tags.get(k) for k in source} == source
    if source:
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] and tags["omniforge.command"]
    note = tags["mlflow.note.content"]
    for text in ("1/2 align", "2/2 unified", version.ref, "--resume", f"{out}/recipe.yaml"):
        assert text in note, text

    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == version.ref
    assert dataset.dataset.digest == version.config_hash[:12]
    assert dataset.dataset.source_type == "local"
    assert json.loads(dataset.dataset.source) == {"uri": version.index_uri}
    assert json.loads(dataset.dataset.profile)["samples"] == version.num_samples
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "training")]

    stages = [tracking.start_stage(uri, first, recipe, i, [version.ref]) for i in (0, 1)]
    runs = [client.get_run(s) for s in stages]
    assert [r.info.run_name for r in runs] == [
        f"stage 1/2: align ({parent.info.run_name})",
        f"stage 2/2: unified ({parent.info.run_name})",
    ]
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == first
        assert run.data.tags["omniforge.kind"] == "training_stage"
        assert run.data.tags["mlflow.source.git.commit"] == tags["mlflow.source.git.commit"]
        assert parent.info.run_name in run.data.tags["mlflow.note.content"]
        (used,) = run.inputs.dataset_inputs  # the parent's dataset, the same digest and source
        assert (used.dataset.name, used.dataset.digest, used.dataset.source) == (
            dataset.dataset.name,
            dataset.dataset.digest,
            dataset.dataset.source,
        )
    assert runs[1].data.tags["omniforge.stage_index"] == "2/2"


def log_stage(uri: str, run_id: str, losses: list[float], tasks: list[str]) -> None:
    """What rank 0 logs for a stage (``Trainer``): held-out loss at the start (step 0) and end,
    then per step the loss and the loss of the step's task."""
    logger = MetricLogger(uri, run_id)
    logger.log({f"eval_loss/{t}": 2.0 for t in tasks}, 0)
    for step, loss in enumerate(losses, 1):
        task = tasks[step % len(tasks)]
        logger.log({"loss": loss, f"loss/{task}": loss, "lr": 1e-4}, step)
    logger.log({f"eval_loss/{t}": 1.0 + i / 10 for i, t in enumerate(tasks)}, len(losses))
    logger.close()


def test_finished_stages_are_summarized_on_the_parent(uri, tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = two_stage_recipe("/data/shards/*.tar")
    parent = tracking.start_parent(uri, recipe, output=tmp_path / "run")
    stage0 = tracking.start_stage(uri, parent, recipe, 0, [])
    losses0 = [3.0, 2.0, 2.5, 1.5, 1.75, 1.25, 1.4, 1.3, 1.1, 1.2]  # best 1.1, final 1.2
    log_stage(uri, stage0, losses0, ["t2i", "t2v"])
    finish_run(uri, stage0)
    logged = tracking.log_stage_summary(uri, parent, stage0, recipe, 0, wall_time_s=12.5)

    client = MlflowClient(uri)
    m = client.get_run(parent).data.metrics
    assert logged == {k: v for k, v in m.items() if k.startswith("1-align/")}
    assert m["1-align/loss/final"] == 1.2 and m["1-align/loss/best"] == 1.1
    t2i = [v for s, v in enumerate(losses0, 1) if s % 2 == 0]
    t2v = [v for s, v in enumerate(losses0, 1) if s % 2 == 1]
    assert m["1-align/loss/t2i/final"] == t2i[-1] and m["1-align/loss/t2i/best"] == min(t2i)
    assert m["1-align/loss/t2v/final"] == t2v[-1] and m["1-align/loss/t2v/best"] == min(t2v)
    assert m["1-align/eval_loss/t2v/start"] == 2.0 and m["1-align/eval_loss/t2v/end"] == 1.1
    assert m["1-align/steps"] == 10 and m["1-align/wall_time_s"] == 12.5
    assert (m["steps"], m["wall_time_s"], m["stages_done"]) == (10, 12.5, 1)
    assert not any(k.startswith("1-align/lr") for k in m)  # loss only
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "| 1/2 align | adapter, vision_head | t2i (1), t2v (2) | 10 | 1.2 | 1.1 | 12 s |" in note
    assert "| 2/2 unified | dit | t2i (1), t2v (2) | 6 | - | - | - |" in note
    # the dataset outside the catalog is logged by its URI
    (dataset,) = client.get_run(parent).inputs.dataset_inputs
    assert dataset.dataset.name == "/data/shards/*.tar" and dataset.dataset.source_type == "local"

    stage1 = tracking.start_stage(uri, parent, recipe, 1, [])
    log_stage(uri, stage1, [0.9, 0.8, 0.7, 0.75, 0.6, 0.65], ["t2v"])
    finish_run(uri, stage1)
    tracking.log_stage_summary(uri, parent, stage1, recipe, 1, wall_time_s=7.5)
    m = client.get_run(parent).data.metrics
    assert m["2-unified/loss/final"] == 0.65 and m["2-unified/loss/best"] == 0.6
    assert m["2-unified/loss/t2v/best"] == 0.6 and "2-unified/loss/t2i/final" not in m
    assert (m["steps"], m["wall_time_s"], m["stages_done"]) == (16, 20.0, 2)
    assert [h.value for h in client.get_metric_history(parent, "stages_done")] == [1, 2]


def test_a_stage_logs_its_global_batch_when_it_sets_a_batch_size(uri, tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = two_stage_recipe("/data/shards/*.tar")
    first = recipe.stages[0].model_copy(update={"batch_size": 3, "grad_accumulation": 2})
    recipe = recipe.model_copy(update={"stages": [first, recipe.stages[1]]})
    parent = tracking.start_parent(uri, recipe, output=tmp_path / "run")
    runs = [tracking.start_stage(uri, parent, recipe, i, [], workers=4) for i in (0, 1)]
    params = [MlflowClient(uri).get_run(r).data.params for r in runs]
    assert params[0]["stage.global_batch"] == "24"  # 3 per GPU x 4 workers x 2 micro-batches
    assert params[0]["stage.batch_size"] == "3" and params[0]["stage.grad_accumulation"] == "2"
    assert "stage.global_batch" not in params[1]  # no batch_size: the token budget decides
