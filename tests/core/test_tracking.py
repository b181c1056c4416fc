"""Shared MLflow helpers (core.tracking) and the training runs built on them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import TINY_RECIPE

from core.config import validate
from core.secrets import mask_urls, masked_params
from core.tracking import (
    MLFLOW_BATCH_PARAMS,
    default_artifact_location,
    experiment_id,
    log_params,
    mlflow_params,
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A separate, empty working directory: nothing may land in it."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_importing_catalog_tracking_does_not_import_mlflow():
    code = "import sys, core.tracking; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_default_artifact_location(tmp_path):
    db = tmp_path / "my dir" / "mlflow.db"
    expected = (tmp_path / "my dir" / "mlartifacts").as_uri()
    assert default_artifact_location(f"sqlite:///{db}") == expected
    assert default_artifact_location(f"sqlite:///{db}?timeout=5") == expected
    assert default_artifact_location(f"sqlite:///{str(db).replace(' ', '%20')}") == expected
    assert default_artifact_location("sqlite:///:memory:") is None
    assert default_artifact_location("http://mlflow:5000") is None
    assert default_artifact_location("databricks") is None


def test_experiment_id_gets_or_creates_with_artifacts_next_to_the_database(tmp_path, workdir):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    first = experiment_id(client, "exp", uri)
    assert experiment_id(client, "exp", uri) == first  # existing: same id
    location = client.get_experiment(first).artifact_location
    assert location.startswith((tmp_path / "mlartifacts").as_uri())
    explicit = (tmp_path / "elsewhere").as_uri()
    other = experiment_id(client, "other", uri, artifact_location=explicit)
    assert client.get_experiment(other).artifact_location == explicit
    assert list(workdir.iterdir()) == []


def test_masking_and_param_values():
    params = {"db": {"url": "postgresql://me:pw@host/db", "api_key": "k"}, "lst": [1, "a"]}
    assert (
        mask_urls("see https://u:p%40ss@h/x and s3://h/y") == "see https://u:***@h/x and s3://h/y"
    )
    assert masked_params(params) == {"db.url": "postgresql://me:***@host/db", "db.api_key": "***",
                                     "lst": [1, "a"]}  # fmt: skip
    assert mlflow_params(params)["lst"] == '[1, "a"]'


def test_log_params_logs_in_batches():
    class Client:
        def __init__(self):
            self.batches = []

        def log_batch(self, run_id, params=()):
            self.batches.append((run_id, {p.key: p.value for p in params}))

    client = Client()
    params = {f"p{i}": i for i in range(2 * MLFLOW_BATCH_PARAMS + 1)} | {"token": "t0k"}
    log_params(client, "r1", params)
    assert [len(b) for _, b in client.batches] == [MLFLOW_BATCH_PARAMS] * 2 + [2]
    logged = {k: v for _, b in client.batches for k, v in b.items()}
    assert logged == mlflow_params(params) and logged["token"] == "***"


def test_training_runs_keep_artifacts_next_to_a_sqlite_store(tmp_path, workdir):
    from mlflow.tracking import MlflowClient

    from core.tracking import MetricLogger, finish_run
    from training import tracking
    from training.recipe import Recipe

    recipe = validate(Recipe, TINY_RECIPE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_id = tracking.start_parent(uri, recipe)
    stage_id = tracking.start_stage(uri, parent_id, recipe, 0, ["catalog://demo@1"])
    note = tmp_path / "note.txt"
    note.write_text("hello\n")
    tracker = MetricLogger(uri, stage_id)
    tracker.log({"loss": 1.0}, step=0)
    tracker.log_artifact(str(note))
    tracker.close()
    finish_run(uri, stage_id)
    finish_run(uri, parent_id)

    assert list(workdir.iterdir()) == []  # no ./mlruns
    client = MlflowClient(uri)
    parent, stage = client.get_run(parent_id), client.get_run(stage_id)
    artifacts = (tmp_path / "mlartifacts").as_uri()
    assert parent.info.artifact_uri.startswith(artifacts)
    assert stage.info.artifact_uri.startswith(artifacts)
    assert list((tmp_path / "mlartifacts").rglob("note.txt"))
    assert parent.info.status == stage.info.status == "FINISHED"
    assert parent.data.params["stages.0.optimizer.lr"] == str(recipe.stages[0].optimizer.lr)
    assert stage.data.params["stage.name"] == "align"
    assert stage.data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_metric_history(stage_id, "loss")[0].value == 1.0


def test_metric_logger_logs_each_step_once_across_resumes(tmp_path):
    """A logger resumed from an older step than MLflow holds logs only the newer steps; a
    batch never splits a step (each log_batch is atomic, so a kill leaves whole steps)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from core.tracking import MetricLogger, whole_steps

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    first = MetricLogger(uri, run_id, flush_every=1)
    for step in range(0, 9):  # steps 1-8 (0: the eval at the start), flushed
        first.log({"loss": float(step), "lr": 0.1}, step)
    first.close()
    again = MetricLogger(uri, run_id)  # resumed from the checkpoint of step 4
    assert again.logged_through == 8
    for step in range(5, 13):
        again.log({"loss": float(step), "lr": 0.1}, step)
    again.close()
    for key in ("loss", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(13))

    late = MetricLogger(uri, run_id, flush_every=1)  # each step sent as it is logged
    client.delete_run(run_id)  # MLflow refuses metrics of a deleted run
    late.log({"loss": 0.5}, 13)  # handed to MLflow's logging thread: returns at once
    with pytest.raises(MlflowException, match="active"):
        late.close()  # the store's refusal surfaces at the next flush

    metrics = [Metric(f"m{i}", 1.0, 0, step) for step in range(4) for i in range(3)]
    assert [[m.step for m in b] for b in whole_steps(metrics, 7)] == [[0, 0, 0, 1, 1, 1],
                                                                      [2, 2, 2, 3, 3, 3]]  # fmt: skip
    assert [len(b) for b in whole_steps(metrics[:3] * 3, 4)] == [4, 4, 1]


def test_experiments_open_in_the_model_training_layout(tmp_path, workdir):
    """The MLflow 3 UI reads ``mlflow.experimentKind``: ours are set on creation and on an
    existing experiment that has none; a kind a user chose stays."""
    from mlflow.tracking import MlflowClient

    from core.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    new = experiment_id(client, "new", uri)
    old = client.create_experiment("old")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id(client, "old", uri) == old
    assert experiment_id(client, "chosen", uri) == chosen
    kinds = [client.get_experiment(e).tags.get(EXPERIMENT_KIND_TAG) for e in (new, old, chosen)]
    assert kinds == [EXPERIMENT_KIND, EXPERIMENT_KIND, "genai_development"]


def test_a_run_spans_the_given_times_and_holds_its_datasets(tmp_path, workdir):
    from mlflow.tracking import MlflowClient

    from core.tracking import DatasetRecord, finish_run, read_run, run_datasets, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    index = DatasetRecord(
        "catalog://demo@3", "0123456789ab", str(tmp_path / "index"), {"samples": 5}, "output"
    )
    remote = DatasetRecord("catalog://other@1", "fedcba987654", "s3://bucket/other/index")
    run_id = start_run(
        uri,
        "exp",
        "a run",
        inputs=[index, remote],
        description="**what** ran",
        start_time=1_700_000_000.25,
    )
    finish_run(uri, run_id, end_time=1_700_000_090.5)
    run = MlflowClient(uri).get_run(run_id)
    assert (run.info.start_time, run.info.end_time) == (1_700_000_000_250, 1_700_000_090_500)
    assert run.data.tags["mlflow.note.content"] == "**what** ran"
    assert {d.dataset.name: d.dataset.source_type for d in run.inputs.dataset_inputs} == {
        "catalog://demo@3": "local",
        "catalog://other@1": "s3",
    }
    assert sorted(run_datasets(uri, run_id), key=lambda d: d.name) == [index, remote]
    view = read_run(uri, run_id)
    assert (view.name, view.status) == ("a run", "FINISHED")


def test_command_line_masks_secrets_and_names_the_cli():
    from core.tracking import command_argv, source_tags

    argv = ["/x/.venv/bin/omniforge", "train", "run", "omni_video_tiny", "--set",
            "recaption.api_key=sk-1", "--token", "t0k", "--tracking-uri", "http://u:pw@h:5000",
            "--set", "stages.0.token_budget=4096"]  # fmt: skip
    assert command_argv(argv) == ["omniforge", "train", "run", "omni_video_tiny", "--set",
                                  "recaption.api_key=***", "--token", "***", "--tracking-uri",
                                  "http://u:***@h:5000", "--set", "stages.0.token_budget=4096"]  # fmt: skip
    inline = ["omniforge", "train", "run", "--set=model.api_key=sk-2", "--api-key=k3",
              "--tracking-uri", "https://h/?token=t4&page=2"]  # fmt: skip
    assert command_argv(inline)[3:] == ["--set=model.api_key=***", "--api-key=***",
                                        "--tracking-uri", "https://h/?token=***&page=2"]  # fmt: skip
    module = ["/repo/orchestration/cli.py", "curate", "run", "in", "out"]
    assert command_argv(module)[:3] == ["omniforge", "curate", "run"]
    tags = source_tags(argv)
    assert tags["mlflow.source.name"] == "omniforge train run"
    assert "sk-1" not in tags["omniforge.command"] and "pw@" not in tags["omniforge.command"]
    assert source_tags(["/usr/bin/pytest", "-q"])["mlflow.source.name"] == "pytest"


def test_git_tags_name_the_commit_and_whether_the_tree_differs(tmp_path):
    from core.tracking import git_tags

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    assert git_tags(tmp_path) == {}  # not a checkout
    git("init", "-q", "-b", "main")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    git("remote", "add", "origin", "https://me:secret@example.com/r.git")
    tags = git_tags(tmp_path)
    assert tags == {
        "mlflow.source.git.commit": git("rev-parse", "HEAD"),
        "mlflow.source.git.branch": "main",
        "mlflow.source.git.repoURL": "https://me:***@example.com/r.git",
        "omniforge.git.dirty": "false",
    }
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert git_tags(tmp_path)["omniforge.git.dirty"] == "true"
