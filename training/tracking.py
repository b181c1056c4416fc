"""MLflow for training: a parent run per ``train run``, a nested run per stage; rank 0 logs.

The driver creates the runs (so a stage run exists even if every worker dies) and hands the
stage run id to the workers; rank 0 logs metrics to it in batches through ``MlflowClient``.
Experiments, params and secret masking go through ``catalog.tracking`` (shared with curation).

Each step appears once in a stage run's metric history, also when the stage resumes (from a
checkpoint older than the last logged step, after a worker restart, a kill or ``--resume``):
the tracker starts by reading the newest step the run holds and drops metrics at or before
it (resume is exact, so those steps were logged with the same values). A batch sent to MLflow
holds whole steps, so a step is never half logged.
"""

from __future__ import annotations

import time

from catalog.tracking import MLFLOW_BATCH_METRICS, experiment_id, log_params


def start_parent(tracking_uri: str, recipe, experiment: str = "training") -> str:
    """Create the parent run of a ``train run`` (params: the whole recipe, masked).

    A new experiment on a ``sqlite:///`` store keeps its artifacts in ``mlartifacts/`` next to
    the database, never in ``./mlruns`` of the working directory.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment, tracking_uri)
    run = client.create_run(exp_id, run_name=recipe.name, tags={"omniforge.kind": "training"})
    log_params(client, run.info.run_id, recipe)
    return run.info.run_id


def start_stage(
    tracking_uri: str, parent_id: str, recipe, stage_index: int, inputs: list[str]
) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    stage = recipe.stages[stage_index]
    run = client.create_run(
        parent.info.experiment_id,
        run_name=f"{stage_index + 1}. {stage.name}",
        tags={
            "mlflow.parentRunId": parent_id,
            "omniforge.stage": stage.name,
            "omniforge.inputs": ",".join(inputs),
        },
    )
    params = {"stage": stage.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    log_params(client, run.info.run_id, params)  # flattened: stage.*, model.*
    _log_inputs(client, run.info.run_id, inputs)
    return run.info.run_id


def _log_inputs(client, run_id: str, inputs: list[str]) -> None:
    """Dataset versions as MLflow run inputs (name = catalog reference)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = [
        DatasetInput(
            Dataset(name=ref, digest=ref[-36:], source_type="omniforge-catalog", source=ref),
            tags=[InputTag("mlflow.data.context", "training")],
        )
        for ref in inputs
    ]
    if datasets:
        client.log_inputs(run_id, datasets=datasets)


def finish(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status)


class StageTracker:
    """Buffered metric logging from rank 0 (no-op on other ranks or without a tracking URI)."""

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        enabled: bool = True,
        flush_every: int = 20,
    ):
        self.enabled = bool(enabled and tracking_uri and run_id)
        self.run_id = run_id
        self.buffer: list = []
        self.flush_every = flush_every
        self.client = None
        self.logged_through = -1  # the newest step the run holds: later ones are logged
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
            self.logged_through = last_logged_step(self.client, run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or step <= self.logged_through:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.buffer) >= self.flush_every * 8:
            self.flush()

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def flush(self) -> None:
        if self.enabled and self.buffer:
            for chunk in whole_steps(self.buffer, MLFLOW_BATCH_METRICS):
                self.client.log_batch(self.run_id, metrics=chunk)
            self.buffer = []

    def close(self) -> None:
        self.flush()


def last_logged_step(client, run_id: str) -> int:
    """The newest step of any metric in the run (-1: none): MLflow keeps each metric's latest
    value with its step, so this is one query however long the history is."""
    run = client.get_run(run_id)
    steps = [m.step for m in run.data.to_proto().metrics]
    return max(steps, default=-1)


def whole_steps(metrics: list, limit: int) -> list[list]:
    """``metrics`` in batches of at most ``limit`` that never split a step (a step with more
    than ``limit`` metrics alone is split): each batch is one atomic ``log_batch``."""
    by_step: dict[int, list] = {}
    for m in metrics:
        by_step.setdefault(m.step, []).append(m)
    batches: list[list] = [[]]
    for group in by_step.values():
        if batches[-1] and len(batches[-1]) + len(group) > limit:
            batches.append([])
        while len(group) > limit:
            batches[-1:] = [group[:limit], []]
            group = group[limit:]
        batches[-1].extend(group)
    return [b for b in batches if b]
