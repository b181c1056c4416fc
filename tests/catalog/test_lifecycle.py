"""One run lifecycle for curation, training stages and plans: a real SQLite catalog and a real
MLflow store."""

from __future__ import annotations

import pytest

from catalog.lifecycle import MESSAGE_LIMIT, failure_message, run_lifecycle


@pytest.fixture
def mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    return uri, run_id, client


def test_a_run_that_ends_normally_succeeds_with_its_mlflow_run(cat, mlflow_run):
    uri, mlflow_id, client = mlflow_run
    with run_lifecycle(
        cat, "curation", "curate a -> b", params={"input": "a"}, config_hash="h"
    ) as run:
        assert cat.get_run(run.id).status == "running"
        run.tracking_uri, run.mlflow_run_id = uri, mlflow_id
    info = cat.get_run(run.id)
    assert (info.kind, info.name, info.status, info.params) == (
        "curation",
        "curate a -> b",
        "succeeded",
        {"input": "a"},
    )
    assert info.mlflow_run_id == mlflow_id
    assert client.get_run(mlflow_id).info.status == "FINISHED"


def test_a_failure_marks_both_runs_failed_with_one_message_and_is_raised(cat, mlflow_run):
    uri, mlflow_id, client = mlflow_run
    with (
        pytest.raises(ValueError, match="no training data"),
        run_lifecycle(cat, "training_stage", "s", tracking_uri=uri, mlflow_run_id=mlflow_id) as run,
    ):
        raise ValueError("task 't2i' has no training data")
    info = cat.get_run(run.id)
    assert (info.status, info.message) == ("failed", "task 't2i' has no training data")
    assert client.get_run(mlflow_id).info.status == "FAILED"


def test_failure_messages_are_one_rule():
    assert failure_message(ValueError("bad recipe")) == "bad recipe"
    assert failure_message(OSError(28, "No space left")) == "OSError: [Errno 28] No space left"
    assert failure_message(RuntimeError()) == "RuntimeError"
    assert failure_message(KeyboardInterrupt()) == "interrupted"
    long = failure_message(ValueError("x" * 5000))
    assert len(long) == MESSAGE_LIMIT and long.endswith("...")


def test_resume_puts_the_same_run_back_to_running(cat):
    with pytest.raises(OSError), run_lifecycle(cat, "plan", "p") as first:
        raise OSError("disk")
    assert cat.get_run(first.id).status == "failed"
    with run_lifecycle(cat, "plan", "p", resume=first.id) as again:
        assert again.id == first.id
        info = cat.get_run(first.id)
        assert (info.status, info.message) == ("running", "resumed")
        again.note("resuming from checkpoint_000001 (step 4)")
    info = cat.get_run(first.id)
    assert (info.status, info.message) == ("succeeded", "resuming from checkpoint_000001 (step 4)")
    assert len(cat.list_runs(kind="plan")) == 1


def test_a_run_stopped_on_purpose_stays_running(cat, mlflow_run):
    uri, mlflow_id, client = mlflow_run
    with run_lifecycle(
        cat, "training_stage", "s", tracking_uri=uri, mlflow_run_id=mlflow_id
    ) as run:
        run.stay_running()
    assert cat.get_run(run.id).status == "running"
    assert client.get_run(mlflow_id).info.status == "RUNNING"


def test_without_a_catalog_only_the_mlflow_run_is_ended(mlflow_run):
    uri, mlflow_id, client = mlflow_run
    lifecycle = run_lifecycle(None, "training", "r", tracking_uri=uri, mlflow_run_id=mlflow_id)
    with pytest.raises(KeyError), lifecycle as run:
        assert run.id is None
        raise KeyError("x")
    assert client.get_run(mlflow_id).info.status == "FAILED"


def test_a_failure_to_record_the_failure_does_not_hide_the_error(cat, caplog):
    with pytest.raises(ZeroDivisionError), run_lifecycle(cat, "plan", "p") as run:
        run.catalog = None  # recording the failure itself fails (AttributeError)
        1 / 0  # noqa: B018
    assert f"could not mark run {run.id} failed" in caplog.text
