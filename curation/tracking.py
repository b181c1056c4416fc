"""The curation run in MLflow: params (secrets masked), the summary counts as metrics, tags,
the report and the summary as artifacts, through the shared helpers in ``catalog.tracking``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catalog.secrets import MASK, SECRET_KEY, mask_urls, masked_params
from catalog.tracking import (
    MLFLOW_BATCH_METRICS,
    MLFLOW_BATCH_PARAMS,
    MLFLOW_TAG_LIMIT,
    chunks,
    experiment_id,
    log_params,
    mlflow_key,
    truncate,
)
from curation.summary import UNSPECIFIED_REASON


def log_to_mlflow(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any] | Any,
    summary: Mapping[str, Any],
    report_path: Path,
    extra_artifacts: Sequence[Path] = (),
    tags: Mapping[str, Any] | None = None,
    *,
    artifact_location: str | None = None,
) -> str:
    """Log one finished MLflow run and return its run id.

    Params are flattened (``a.b.c``), stringified, cut to 500 characters (keys to 250);
    any param or tag whose key contains key / secret / password / token is logged as ``***``
    and passwords in URLs (``scheme://user:pw@host``) are masked (``catalog.tracking``).
    Metrics are the summary counts (``inputs``, ``samples``, ``accepted``, ``rejected``,
    ``errors``, ``rejected.<reason>``, ``error.<reason>``, ``shards``, ``bytes``,
    ``elapsed_s``...). Artifacts: the report, ``summary.json``, ``params.json`` (masked, not
    truncated) and ``extra_artifacts`` (files, or directories logged under their name).

    Uses an explicit ``MlflowClient``: the process-wide tracking URI and active run are left
    alone. A new experiment on a ``sqlite:///`` store keeps its artifacts next to the database
    (``mlartifacts/``) unless ``artifact_location`` says otherwise.
    """
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment, tracking_uri, artifact_location)
    run = client.create_run(exp_id, run_name=run_name)
    run_id = run.info.run_id
    try:
        now = _now_ms()
        metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(summary).items()]
        run_tags = mlflow_tags(summary, tags)
        for chunk in chunks(metrics, MLFLOW_BATCH_METRICS):
            client.log_batch(run_id, metrics=chunk)
        log_params(client, run_id, params)
        for chunk in chunks([RunTag(k, v) for k, v in run_tags.items()], MLFLOW_BATCH_PARAMS):
            client.log_batch(run_id, tags=chunk)
        client.log_artifact(run_id, str(report_path))
        client.log_dict(run_id, _json_ready(summary), "summary.json")
        client.log_dict(run_id, masked_params(params), "params.json")
        for extra in extra_artifacts:
            extra = Path(extra)
            if extra.is_dir():
                client.log_artifacts(run_id, str(extra), artifact_path=extra.name)
            else:
                client.log_artifact(run_id, str(extra))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def mlflow_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Summary counts as MLflow metrics (reason tags sanitised to valid metric names)."""
    metrics: dict[str, float] = {}
    for key in (
        "inputs",
        "samples",
        "clips",
        "accepted",
        "rejected",
        "errors",
        "shards",
        "bytes",
        "elapsed_s",
        "samples_per_s",
        "multi_reason_rejected",
    ):
        value = summary.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
    for prefix, key in (("rejected", "rejected_by_reason"), ("error", "errors_by_reason")):
        for tag, count in (summary.get(key) or {}).items():
            name = mlflow_key(f"{prefix}.{_metric_safe(tag)}", {})
            metrics[name] = metrics.get(name, 0.0) + float(count)
    return metrics


def mlflow_tags(summary: Mapping[str, Any], tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Run tags: job kind, stages run / skipped and ``tags`` (None dropped, secrets masked)."""
    out: dict[str, str] = {"omniforge.job": "curation"}
    if summary.get("stages_run"):
        out["stages_run"] = ", ".join(summary["stages_run"])
    for stage, why in (summary.get("stages_skipped") or {}).items():
        out[f"stage_skipped.{_metric_safe(stage)}"] = str(why)
    for key, value in (tags or {}).items():
        if value is None:
            continue
        key = str(key)
        if SECRET_KEY.search(key) and not key.startswith("mlflow."):
            value = MASK
        out[key] = mask_urls(str(value))
    return {mlflow_key(k, {}): truncate(v, MLFLOW_TAG_LIMIT) for k, v in out.items()}


def _metric_safe(text: str) -> str:
    return re.sub(r"[^\w\-]", "_", str(text)) or UNSPECIFIED_REASON


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)
