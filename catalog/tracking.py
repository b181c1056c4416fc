"""MLflow helpers shared by curation and training (both import ``catalog``, never each other).

- ``experiment_id`` gets or creates an experiment; a new experiment on a ``sqlite:///`` store
  keeps its artifacts in ``mlartifacts/`` next to the database (``default_artifact_location``)
  instead of MLflow's default ``./mlruns`` in whatever the working directory happens to be.
- ``mlflow_params`` turns a config (mapping or pydantic model) into MLflow params: flattened
  (``a.b.c``), secrets masked, stringified, cut to MLflow's limits, keys made valid.
  Masking lives in ``catalog.secrets`` (``masked_params``: the same without stringifying).
- ``log_params`` logs them in batches.

A key containing key / secret / password / token is masked as ``***``; passwords in URLs
(``scheme://user:pw@host``) are masked in every value. mlflow itself is imported inside the
functions: ``catalog`` is imported at CLI start-up and must stay cheap.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from catalog.secrets import masked_params

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
