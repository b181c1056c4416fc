"""What curation logs to MLflow: params (secrets masked), the summary counts as metrics, tags,
the curated version as a dataset, the report and the summary as artifacts. Every MLflow call
goes through ``core.tracking``.

The run is written when the version is committed, with the start time of the work, so its
duration in the UI is the run's. Metric names group by their first ``/`` segment in the UI
(``samples/accepted``, ``rejected/low_aesthetic``, ``stage/ocr/seconds``); our tags are
namespaced ``omniforge.*`` as on training runs.
"""

from __future__ import annotations

import re
import time
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
    output: Any = None,
) -> str:
    """Log one finished MLflow run and return its run id.

    The run starts ``summary["elapsed_s"]`` before now (when the work began) and ends now.
    Params are flattened (``a.b.c``), stringified, cut to 500 characters (keys to 250);
    any param or tag whose key contains key / secret / password / token is logged as ``***``
    and passwords in URLs (``scheme://user:pw@host``) are masked (``core.tracking``).
    Metrics: ``mlflow_metrics``. Tags: ``mlflow_tags``, the source tags (command, user, git)
    and a description. ``output`` (the committed ``catalog.records.VersionInfo``) is logged
    as a dataset in context ``output``: ``catalog://NAME@VERSION``, its index as source.
    Artifacts: the report, ``summary.json``, ``params.json`` (masked, not truncated) and
    ``extra_artifacts`` (files, or directories logged under their name).

    A new experiment on a ``sqlite:///`` store keeps its artifacts next to the database
    (``mlartifacts/``) unless ``artifact_location`` says otherwise.
    """
    elapsed = summary.get("elapsed_s")
    started = time.time() - float(elapsed) if isinstance(elapsed, (int, float)) else None
    datasets = [] if output is None else [tracking.catalog_dataset(output, context="output")]
    run_tags = {**tracking.source_tags(), **mlflow_tags(summary, tags)}
    run_id = tracking.start_run(
        tracking_uri,
        experiment,
        run_name,
        params=params,
        tags=run_tags,
        inputs=datasets,
        description=describe(summary, report_path),
        artifact_location=artifact_location,
        start_time=started,
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


# summary key -> metric name; numbers only
SUMMARY_METRICS = {
    "inputs": "inputs/total",
    "inputs_in_index": "inputs/in_index",
    "samples": "samples/total",
    "clips": "samples/clips",
    "accepted": "samples/accepted",
    "rejected": "samples/rejected",
    "errors": "samples/errors",
    "multi_reason_rejected": "samples/multi_reason_rejected",
    "shards": "output/shards",
    "bytes": "output/bytes",
    "shard_samples": "output/samples",
    "elapsed_s": "time/elapsed_s",
    "samples_per_s": "time/samples_per_s",
}
# summary["run"] key (what the engine measured) -> metric name
RUN_METRICS = {
    "inputs_this_run": "inputs/this_run",
    "inputs_skipped": "inputs/skipped",
    "startup_s": "time/startup_s",
    "blocks": "run/blocks",
    "retries": "run/retries",
    "failed_inputs": "run/failed_inputs",
}


def mlflow_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Summary counts as MLflow metrics, grouped by their first ``/`` segment: ``inputs/``,
    ``samples/`` (accepted, rejected, errors...), ``rejected/REASON``, ``errors/REASON``,
    ``kind/KIND/STATUS``, ``stage/STAGE/rows_in|rows_out|seconds``, ``bucket/BUCKET/samples|
    shards|bytes``, ``output/`` (shards, bytes, samples), ``time/``, ``run/`` (blocks,
    retries, failed inputs). Reason, stage and bucket names are made valid metric names."""
    metrics: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            name = mlflow_key(name, {})
            metrics[name] = metrics.get(name, 0.0) + float(value)

    run = summary.get("run") or {}
    for key, name in SUMMARY_METRICS.items():
        put(name, summary.get(key))
    for key, name in RUN_METRICS.items():
        put(name, run.get(key))
    for prefix, key in (("rejected", "rejected_by_reason"), ("errors", "errors_by_reason")):
        for tag, count in (summary.get(key) or {}).items():
            put(f"{prefix}/{_metric_safe(tag)}", count)
    for kind, counts in (summary.get("by_kind") or {}).items():
        for status, count in counts.items():
            put(f"kind/{_metric_safe(kind)}/{_metric_safe(status)}", count)
    for stage, values in (run.get("stages") or {}).items():
        for name, value in zip(("rows_in", "rows_out", "seconds"), values, strict=False):
            put(f"stage/{_metric_safe(stage)}/{name}", value)
    for bucket, counts in (summary.get("shards_by_bucket") or {}).items():
        for name in ("samples", "shards", "bytes"):
            put(f"bucket/{_metric_safe(bucket)}/{name}", counts.get(name))
    return metrics


def mlflow_tags(summary: Mapping[str, Any], tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Run tags: ``omniforge.kind`` (``curation``), ``omniforge.stages_run``,
    ``omniforge.stage_skipped.STAGE`` (why) and ``tags`` (None dropped, secrets masked)."""
    out: dict[str, str] = {"omniforge.kind": "curation"}
    if summary.get("stages_run"):
        out["omniforge.stages_run"] = ", ".join(summary["stages_run"])
    for stage, why in (summary.get("stages_skipped") or {}).items():
        out[f"omniforge.stage_skipped.{_metric_safe(stage)}"] = str(why)
    for key, value in (tags or {}).items():
        if value is None:
            continue
        key = str(key)
        if SECRET_KEY.search(key) and not key.startswith("mlflow."):
            value = MASK
        out[key] = mask_urls(str(value))
    return {mlflow_key(k, {}): truncate(v, MLFLOW_TAG_LIMIT) for k, v in out.items()}


def describe(summary: Mapping[str, Any], report_path: Path) -> str:
    """The run's description (Markdown): what went in, what came out, where to look."""
    s = summary
    lines = [
        f"Curation of {s.get('inputs', 0)} inputs into `{s.get('catalog', '-')}`: "
        f"{s.get('samples', 0)} samples, {s.get('accepted', 0)} accepted, "
        f"{s.get('rejected', 0)} rejected, {s.get('errors', 0)} errors; "
        f"{s.get('shards', 0)} shards.",
        "",
        f"Stages: {', '.join(s.get('stages_run') or []) or '-'}.",
    ]
    for stage, why in (s.get("stages_skipped") or {}).items():
        lines.append(f"Skipped {stage}: {why}.")
    top = list((s.get("rejected_by_reason") or {}).items())[:5]
    if top:
        lines.append("Top reject reasons: " + ", ".join(f"{t} {n}" for t, n in top) + ".")
    lines += [
        "",
        f"Artifacts: `{report_path.name}` (score histograms, rejects per reason), "
        "`summary.json`, `params.json`, the resolved config. Output folder: "
        f"`{report_path.parent}`.",
    ]
    return "\n".join(lines)


def _metric_safe(text: str) -> str:
    return re.sub(r"[^\w\-]", "_", str(text)) or UNSPECIFIED_REASON
