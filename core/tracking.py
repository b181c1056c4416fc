"""MLflow, in one place: every call to an MLflow client in omniforge goes through here.
Curation and training say what to log (``curation.tracking``, ``training.tracking``); this
module creates, fills and ends the runs.

- ``start_run`` / ``finish_run``: a run in an experiment (optionally nested under a parent),
  with masked params, tags and dataset inputs; ``set_tags``, ``log_metrics``,
  ``log_artifacts``, ``log_dict`` fill it; ``run_link`` is the UI address of a run.
- ``MetricLogger``: buffered metrics of a long job (training's rank 0), in batches that never
  split a step, skipping the steps the run already holds (so a resumed job logs each step once).
- ``experiment_id`` gets or creates an experiment; a new experiment on a ``sqlite:///`` store
  keeps its artifacts in ``mlartifacts/`` next to the database (``default_artifact_location``)
  instead of MLflow's default ``./mlruns`` in whatever the working directory happens to be.
- ``mlflow_params`` turns a config (mapping or pydantic model) into MLflow params: flattened
  (``a.b.c``), secrets masked, stringified, cut to MLflow's limits, keys made valid.
  Masking lives in ``core.secrets`` (``masked_params``: the same without stringifying).
- ``log_params`` logs them in batches.

A key containing key / secret / password / token is masked as ``***``; passwords in URLs
(``scheme://user:pw@host``) are masked in every value. mlflow itself is imported inside the
functions: ``core`` is imported at CLI start-up and must stay cheap. Each function takes the
tracking URI and makes its own ``MlflowClient``: the process-wide tracking URI and active run
are left alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from core.secrets import masked_params

# MLflow limits (validation.py): entity keys 250 chars; param values are capped at 500 chars
# here so runs also log to older servers / database schemas; tag values at 5000.
MLFLOW_KEY_LIMIT = 250
MLFLOW_PARAM_LIMIT = 500
MLFLOW_TAG_LIMIT = 5000
MLFLOW_BATCH_PARAMS = 100
MLFLOW_BATCH_METRICS = 1000


def experiment_id(
    client: Any, name: str, tracking_uri: str, artifact_location: str | None = None
) -> str:
    """The id of experiment ``name``, created if missing.

    A new experiment gets ``artifact_location``, or by default (``default_artifact_location``)
    ``mlartifacts/`` next to a ``sqlite:///`` database. An existing experiment keeps the
    location it was created with.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if artifact_location is None:
        artifact_location = default_artifact_location(tracking_uri)
    return client.create_experiment(name, artifact_location=artifact_location)


def default_artifact_location(tracking_uri: str) -> str | None:
    """``sqlite:///DIR/mlflow.db`` -> ``file:///DIR/mlartifacts``; None (MLflow's default)
    for other stores and in-memory databases."""
    if tracking_uri.startswith("sqlite:///"):
        db = unquote(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
        if db and db != ":memory:":
            return (Path(db).resolve().parent / "mlartifacts").as_uri()
    return None


def mlflow_params(params: Mapping[str, Any] | Any) -> dict[str, str]:
    """What ``log_params`` logs: flattened, masked, stringified, size-limited, valid keys."""
    out: dict[str, str] = {}
    for key, value in masked_params(params).items():
        text = value if isinstance(value, str) else stringify(value)
        out[mlflow_key(key, out)] = truncate(text, MLFLOW_PARAM_LIMIT)
    return out


def log_params(client: Any, run_id: str, params: Mapping[str, Any] | Any) -> None:
    """Log ``mlflow_params(params)`` to run ``run_id`` in batches of ``MLFLOW_BATCH_PARAMS``."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in mlflow_params(params).items()]
    for chunk in chunks(items, MLFLOW_BATCH_PARAMS):
        client.log_batch(run_id, params=chunk)


def mlflow_key(key: str, taken: Mapping[str, Any]) -> str:
    """A valid MLflow param/metric/tag key: allowed characters, no path tricks, <= 250 chars.

    A key that had to change and now collides with one in ``taken`` (or is too long) gets a
    short hash of the original appended.
    """
    safe = re.sub(r"[^\w.\- /]", "_", key)
    safe = re.sub(r"/+", "/", safe).strip("/")
    safe = "/".join(p if p not in (".", "..") else "_" for p in safe.split("/")) or "_"
    if len(safe) > MLFLOW_KEY_LIMIT or (safe != key and safe in taken):
        digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        safe = f"{safe[: MLFLOW_KEY_LIMIT - 9]}_{digest}"
    return safe


def stringify(value: Any) -> str:
    """Strings as they are, lists / tuples / dicts as JSON, anything else through ``str``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with ``...``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def chunks(items: list, size: int) -> Iterable[list]:
    """``items`` in consecutive slices of at most ``size`` (MLflow batch limits)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- runs -----------------------------------------------------------------------------------------


def client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def start_run(
    tracking_uri: str,
    experiment: str,
    name: str,
    *,
    params: Mapping[str, Any] | Any = None,
    tags: Mapping[str, Any] | None = None,
    parent_id: str | None = None,
    inputs: Iterable[str] = (),
    description: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """Create a RUNNING run and return its id. Under ``parent_id`` it goes into the parent's
    experiment, nested; else into ``experiment`` (created if missing, see ``experiment_id``).
    ``params`` are logged masked (``mlflow_params``), ``inputs`` as catalog dataset inputs."""
    c = client(tracking_uri)
    run_tags = {str(k): truncate(str(v), MLFLOW_TAG_LIMIT) for k, v in (tags or {}).items()}
    if parent_id:
        exp_id = c.get_run(parent_id).info.experiment_id
        run_tags["mlflow.parentRunId"] = parent_id
    else:
        exp_id = experiment_id(c, experiment, tracking_uri, artifact_location)
    if description:
        run_tags["mlflow.note.content"] = truncate(description, MLFLOW_TAG_LIMIT)
    run_id = c.create_run(exp_id, run_name=name, tags=run_tags).info.run_id
    try:
        if params is not None:
            log_params(c, run_id, params)
        log_inputs(tracking_uri, run_id, list(inputs))
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    return run_id


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End the run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
    client(tracking_uri).set_terminated(run_id, status)


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """A run that ended (FAILED, say) and goes on again: back to RUNNING."""
    c = client(tracking_uri)
    if c.get_run(run_id).info.status != "RUNNING":
        c.update_run(run_id, status="RUNNING")


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(str(k), truncate(str(v), MLFLOW_TAG_LIMIT)) for k, v in tags.items()]
    c = client(tracking_uri)
    for chunk in chunks(items, MLFLOW_BATCH_PARAMS):
        c.log_batch(run_id, tags=chunk)


def log_metrics(
    tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    """One value per metric at ``step``, in batches."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    c = client(tracking_uri)
    for chunk in chunks(items, MLFLOW_BATCH_METRICS):
        c.log_batch(run_id, metrics=chunk)


def log_artifacts(tracking_uri: str, run_id: str, paths: Iterable[Path | str]) -> None:
    """Files as artifacts at the run's root; a directory is logged under its own name."""
    c = client(tracking_uri)
    for path in map(Path, paths):
        if path.is_dir():
            c.log_artifacts(run_id, str(path), artifact_path=path.name)
        else:
            c.log_artifact(run_id, str(path))


def log_dict(tracking_uri: str, run_id: str, data: Any, name: str) -> None:
    """``data`` as a JSON artifact ``name`` (values JSON cannot hold become strings)."""
    client(tracking_uri).log_dict(run_id, json.loads(json.dumps(data, default=str)), name)


def log_inputs(tracking_uri: str, run_id: str, refs: list[str], context: str = "training") -> None:
    """Catalog dataset versions (``catalog://name@version``) as the run's dataset inputs."""
    if not refs:
        return
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = [
        DatasetInput(
            Dataset(name=ref, digest=ref[-36:], source_type="omniforge-catalog", source=ref),
            tags=[InputTag("mlflow.data.context", context)],
        )
        for ref in refs
    ]
    client(tracking_uri).log_inputs(run_id, datasets=datasets)


def run_link(tracking_uri: str | None, run_id: str | None) -> str:
    """The run's page on an http(s) server, else its id ("-" without one)."""
    if not run_id:
        return "-"
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        try:
            exp = client(tracking_uri).get_run(run_id).info.experiment_id
            return f"{tracking_uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
        except Exception:  # server down: the id is still useful
            return run_id
    return run_id


class MetricLogger:
    """Buffered metrics of one run from one process (a no-op without a URI or run id, or when
    not ``enabled``: training's ranks other than 0).

    Each step appears once in the run's metric history, also when a job resumes from a point
    older than the last logged step: the logger starts by reading the newest step the run
    holds and drops metrics at or before it. A batch holds whole steps (``whole_steps``), so a
    step is never half logged.
    """

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
            self.client = client(str(tracking_uri))
            self.logged_through = last_logged_step(self.client, str(run_id))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
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


def last_logged_step(mlflow_client: Any, run_id: str) -> int:
    """The newest step of any metric in the run (-1: none): MLflow keeps each metric's latest
    value with its step, so this is one query however long the history is."""
    run = mlflow_client.get_run(run_id)
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


# -- images ---------------------------------------------------------------------------------------


def log_image(tracking_uri: str, run_id: str, image: Any, key: str, step: int) -> None:
    """A PIL image under ``key`` at ``step`` (MLflow's time-stepped images, stored as
    ``images/`` artifacts): the run's image view shows one card per key with a step slider, so
    the same grid can be compared across evaluations. Characters MLflow refuses in an image key
    become ``_``; logged synchronously, so the image is stored when this returns."""
    safe = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key) or "_"
    client(tracking_uri).log_image(run_id, image, key=safe, step=int(step), synchronous=True)
