"""What curation logs to MLflow: params (secrets masked), the summary counts as metrics, tags,
the report and the summary as artifacts. Every MLflow call goes through ``core.tracking``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core import tracking
from core.secrets import MASK, SECRET_KEY, mask_urls, masked_params
from core.tracking import MLFLOW_TAG_LIMIT, mlflow_key, truncate
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
    and passwords in URLs (``scheme://user:pw@host``) are masked (``core.tracking``).
    Metrics are the summary counts (``inputs``, ``samples``, ``accepted``, ``rejected``,
    ``errors``, ``rejected.<reason>``, ``error.<reason>``, ``shards``, ``bytes``,
    ``elapsed_s``...). Artifacts: the report, ``summary.json``, ``params.json`` (masked, not
    truncated) and ``extra_artifacts`` (files, or directories logged under their name).

    A new experiment on a ``sqlite:///`` store keeps its artifacts next to the database
    (``mlartifacts/``) unless ``artifact_location`` says otherwise.
    """
    run_id = tracking.start_run(
        tracking_uri,
        experiment,
        run_name,
        params=params,
        tags=mlflow_tags(summary, tags),
        artifact_location=artifact_location,
    )
    try:
        tracking.log_metrics(tracking_uri, run_id, mlflow_metrics(summary))
        tracking.log_artifacts(tracking_uri, run_id, [report_path])
        tracking.log_dict(tracking_uri, run_id, summary, "summary.json")
        tracking.log_dict(tracking_uri, run_id, masked_params(params), "params.json")
        tracking.log_artifacts(tracking_uri, run_id, extra_artifacts)
    except BaseException:
        tracking.finish_run(tracking_uri, run_id, "FAILED")
        raise
    tracking.finish_run(tracking_uri, run_id)
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
