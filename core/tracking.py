"""MLflow, in one place: every call to an MLflow client in omniforge goes through here.
Curation and training say what to log (``curation.tracking``, ``training.tracking``); this
module creates, fills and ends the runs.

- ``start_run`` / ``finish_run``: a run in an experiment (optionally nested under a parent),
  with masked params, tags, a description and dataset inputs, started and ended at the times
  the work did; ``set_tags``, ``log_metrics``, ``log_artifacts``, ``log_dict``,
  ``log_datasets`` fill it; ``run_link`` is the UI address of a run; ``metric_histories``
  and ``read_run`` read back what a run holds.
- What every run says about where it came from (``source_tags``): MLflow's own source tags
  (``mlflow.source.name`` / ``type`` / ``git.commit`` / ``git.branch``, ``mlflow.user``) and
  ``omniforge.command`` (the command line, secrets masked); ``unique_run_name`` names a run
  so that two runs of one recipe never share a name.
- ``DatasetRecord``: a dataset version as MLflow shows it on a run (name ``catalog://NAME@V``,
  digest, the location of its index as source, counts as profile, the context it is used in);
  ``catalog_dataset`` makes one from a catalog version.
- ``MetricLogger``: buffered metrics of a long job (training's rank 0), in batches that never
  split a step, skipping the steps the run already holds (so a resumed job logs each step once).
- ``experiment_id`` gets or creates an experiment; a new experiment on a ``sqlite:///`` store
  keeps its artifacts in ``mlartifacts/`` next to the database (``default_artifact_location``)
  instead of MLflow's default ``./mlruns`` in whatever the working directory happens to be.
  Our experiments carry the tag ``mlflow.experimentKind`` (``EXPERIMENT_KIND_TAG``) so the
  MLflow 3 UI opens them in its model-training layout.
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

import contextlib
import getpass
import hashlib
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from core.secrets import MASK, SECRET_KEY, mask_urls, masked_params

# MLflow limits (validation.py): entity keys 250 chars; param values are capped at 500 chars
# here so runs also log to older servers / database schemas; tag values at 5000.
MLFLOW_KEY_LIMIT = 250
MLFLOW_PARAM_LIMIT = 500
MLFLOW_TAG_LIMIT = 5000
MLFLOW_BATCH_PARAMS = 100
MLFLOW_BATCH_METRICS = 1000
MLFLOW_DIGEST_LIMIT = 36  # characters of a dataset digest (the datasets table)

# The experiment tag the MLflow 3 UI reads to pick its layout (mlflow/server/js: the
# ExperimentKind values; "custom_model_development" is "Machine learning": runs, charts,
# datasets; "genai_development" opens on traces). Without it the UI guesses from the runs
# and writes its guess into this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the omniforge code that runs
ENV_JOB_ID = "OMNIFORGE_JOB_ID"  # set in a submitted job (catalog.runs): source type JOB
GIT_TIMEOUT_S = 5


def experiment_id(
    client: Any, name: str, tracking_uri: str, artifact_location: str | None = None
) -> str:
    """The id of experiment ``name``, created if missing.

    A new experiment gets ``artifact_location``, or by default (``default_artifact_location``)
    ``mlartifacts/`` next to a ``sqlite:///`` database. An existing experiment keeps the
    location it was created with. Either way it carries ``EXPERIMENT_KIND_TAG`` (one that a
    user set to another kind is left as it is).
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    if artifact_location is None:
        artifact_location = default_artifact_location(tracking_uri)
    return client.create_experiment(
        name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


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
    inputs: Iterable[DatasetRecord] = (),
    description: str | None = None,
    artifact_location: str | None = None,
    start_time: float | None = None,
) -> str:
    """Create a RUNNING run and return its id. Under ``parent_id`` it goes into the parent's
    experiment, nested; else into ``experiment`` (created if missing, see ``experiment_id``).
    ``params`` are logged masked (``mlflow_params``), ``inputs`` as dataset inputs,
    ``description`` as the run's note (``mlflow.note.content``, Markdown in the UI).
    ``start_time`` (seconds since the epoch; default now) is when the work began: a run
    written after its work passes it so the UI shows the duration the work took."""
    c = client(tracking_uri)
    run_tags = {str(k): truncate(str(v), MLFLOW_TAG_LIMIT) for k, v in (tags or {}).items()}
    if parent_id:
        exp_id = c.get_run(parent_id).info.experiment_id
        run_tags["mlflow.parentRunId"] = parent_id
    else:
        exp_id = experiment_id(c, experiment, tracking_uri, artifact_location)
    if description:
        run_tags["mlflow.note.content"] = truncate(description, MLFLOW_TAG_LIMIT)
    start_ms = None if start_time is None else int(start_time * 1000)
    run_id = c.create_run(exp_id, start_time=start_ms, run_name=name, tags=run_tags).info.run_id
    try:
        if params is not None:
            log_params(c, run_id, params)
        log_datasets(tracking_uri, run_id, inputs)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    return run_id


def finish_run(
    tracking_uri: str, run_id: str, status: str = "FINISHED", end_time: float | None = None
) -> None:
    """End the run: ``FINISHED``, ``FAILED`` or ``KILLED``, at ``end_time`` (seconds since the
    epoch; default now)."""
    end_ms = None if end_time is None else int(end_time * 1000)
    client(tracking_uri).set_terminated(run_id, status, end_time=end_ms)


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


def set_description(tracking_uri: str, run_id: str, text: str) -> None:
    """The run's description (``mlflow.note.content``: the UI's "Description", Markdown)."""
    set_tags(tracking_uri, run_id, {"mlflow.note.content": text})


def metric_histories(
    tracking_uri: str, run_id: str, keep: Callable[[str], bool]
) -> dict[str, list[tuple[int, float]]]:
    """Every value of the run's metrics whose key ``keep`` accepts: key -> [(step, value)] in
    step order (the store holds each step once, also across resumes: ``MetricLogger``)."""
    c = client(tracking_uri)
    keys = sorted(k for k in c.get_run(run_id).data.metrics if keep(k))
    out = {}
    for key in keys:
        history = sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        out[key] = [(m.step, m.value) for m in history]
    return out


@dataclass(frozen=True)
class RunView:
    """What a run holds, as plain data: its name, status, tags and latest metric values."""

    name: str
    status: str
    tags: dict[str, str]
    metrics: dict[str, float]


def read_run(tracking_uri: str, run_id: str) -> RunView:
    run = client(tracking_uri).get_run(run_id)
    return RunView(run.info.run_name, run.info.status, dict(run.data.tags), dict(run.data.metrics))


# -- datasets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset as a run's "Datasets" show it: ``name`` (a catalog version:
    ``catalog://NAME@VERSION``, what recipes name), ``digest`` (short; the same version logs
    the same digest everywhere, so MLflow keeps one dataset for it), ``source`` (where the
    data is: the version's index folder or URI), ``profile`` (counts) and the ``context`` it
    is used in (``training``, ``output``...)."""

    name: str
    digest: str
    source: str
    profile: Mapping[str, Any] = field(default_factory=dict)
    context: str = "training"

    def source_type(self) -> str:
        """``local`` for a path or ``file:`` URI, else the URI's scheme (``s3``, ``gs``...):
        the types of MLflow's own filesystem dataset sources, whose JSON is ``{"uri": ...}``."""
        scheme = urlparse(self.source).scheme
        return "local" if scheme in ("", "file") else scheme


def catalog_dataset(version: Any, context: str = "training") -> DatasetRecord:
    """The record of a committed catalog version (``catalog.records.VersionInfo``: read by its
    attributes, ``core`` does not import the catalog). Digest: the version's config hash
    (config + input listing), else a hash of its reference."""
    ref = str(version.ref)
    digest = version.config_hash or hashlib.sha256(ref.encode()).hexdigest()
    profile = {
        "samples": version.num_samples,
        "bytes": version.num_bytes,
        "shards": version.num_shards,
        **{f"status.{k}": v for k, v in sorted((version.counts or {}).items())},
    }
    source = version.index_uri or version.root_uri or ref
    return DatasetRecord(ref, digest[:12], mask_urls(str(source)), profile, context)


def log_datasets(tracking_uri: str, run_id: str, datasets: Iterable[DatasetRecord]) -> None:
    """``datasets`` as the run's dataset inputs, each tagged with its context (what
    ``mlflow.log_input`` logs, without the process-wide active run)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    items = [
        DatasetInput(
            Dataset(
                name=d.name,
                digest=truncate(d.digest, MLFLOW_DIGEST_LIMIT),
                source_type=d.source_type(),
                source=json.dumps({"uri": d.source}),
                profile=json.dumps(dict(d.profile), default=str) if d.profile else None,
            ),
            tags=[InputTag("mlflow.data.context", d.context)],
        )
        for d in datasets
    ]
    if items:
        client(tracking_uri).log_inputs(run_id, datasets=items)


def run_datasets(tracking_uri: str, run_id: str) -> list[DatasetRecord]:
    """The dataset inputs a run holds, as records (a stage run reuses its parent's)."""
    out = []
    for item in client(tracking_uri).get_run(run_id).inputs.dataset_inputs:
        d = item.dataset
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        source = json.loads(d.source).get("uri", d.source) if d.source.startswith("{") else d.source
        profile = json.loads(d.profile) if d.profile else {}
        out.append(DatasetRecord(d.name, d.digest, source, profile, context))
    return out


# -- where a run comes from -----------------------------------------------------------------------


def unique_run_name(base: str) -> str:
    """``base-YYYYMMDD-HHMMSS-xxxx``: MLflow allows one name for many runs; ours never share
    one (the UI lists runs by name)."""
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def command_argv(argv: list[str] | None = None) -> list[str]:
    """The command line that started this process, the CLI shown as ``omniforge`` (also when
    run as ``python -m orchestration.cli``), secrets masked: ``--set a.token=x`` and
    ``--api-key x`` become ``***``, passwords in URLs too."""
    argv = list(sys.argv if argv is None else argv) or ["python"]
    prog = Path(argv[0])
    cli = prog.name == "omniforge" or prog.parts[-2:] == ("orchestration", "cli.py")
    out = ["omniforge" if cli else prog.name]
    mask_next = False
    for arg in argv[1:]:
        if mask_next:
            arg, mask_next = MASK, False
        elif "=" not in arg and arg.startswith("--"):
            mask_next = bool(SECRET_KEY.search(arg[2:].replace("-", "_")))
        out.append(mask_urls(_mask_assignment(arg)))
    return out


def _mask_assignment(arg: str) -> str:
    """``a.token=x`` and ``--api-key=x`` -> ``...=***``; ``--set=a.token=x`` ->
    ``--set=a.token=***``."""
    key, eq, value = arg.partition("=")
    if not eq:
        return arg
    if SECRET_KEY.search(key.lstrip("-").replace("-", "_")):
        return f"{key}={MASK}"
    return f"{key}={_mask_assignment(value)}" if key.startswith("--") else arg


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """Where a run comes from, in MLflow's standard tags (the UI's "Source", "User" and git
    commit) and ours: ``mlflow.source.name`` (the command: ``omniforge train run``),
    ``mlflow.source.type`` (``JOB`` in a submitted job, else ``LOCAL``), ``mlflow.user``,
    ``mlflow.source.git.commit`` / ``git.branch`` / ``git.repoURL`` of the omniforge code
    that runs (``omniforge.git.dirty``: ``true`` when tracked files differ from the commit;
    no git tags outside a git checkout), ``omniforge.command`` (the whole command line)."""
    words = command_argv(argv)
    name = [words[0]]
    for word in words[1:3]:  # the program and its subcommands: "omniforge train run"
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        name.append(word)
    tags = {
        "mlflow.source.name": " ".join(name),
        "mlflow.source.type": "JOB" if os.environ.get(ENV_JOB_ID) else "LOCAL",
        "omniforge.command": shlex.join(words),
    }
    with contextlib.suppress(KeyError, OSError):  # a container user without a name
        tags["mlflow.user"] = getpass.getuser()
    return {**tags, **git_tags(SOURCE_ROOT)}


def git_tags(root: Path) -> dict[str, str]:
    """``mlflow.source.git.*`` and ``omniforge.git.dirty`` of the checkout at ``root`` ({}
    when it is not one, or git is missing)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {"mlflow.source.git.commit": commit}
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = git("config", "--get", "remote.origin.url")
    if remote:
        tags["mlflow.source.git.repoURL"] = mask_urls(remote)
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags["omniforge.git.dirty"] = "true" if status else "false"
    return tags


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
    step is never half logged. Batches are stored on MLflow's logging thread, not the job's
    (a flush cost a training step ~58 ms on SQLite here; more against a remote server).
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
        self.sending: list = []  # MLflow's handles of the batches being stored
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
            self.flush(wait=False)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def flush(self, wait: bool = True) -> None:
        """Send the buffered metrics. MLflow stores them on its own thread (its asynchronous
        logging) while the job goes on; ``wait``: until every batch sent so far is stored.
        A batch that failed raises here, at the next flush."""
        if not self.enabled:
            return
        self._settle()  # the previous flush's batches: done by now, unless the store is slow
        for chunk in whole_steps(self.buffer, MLFLOW_BATCH_METRICS):
            sent = self.client.log_batch(self.run_id, metrics=chunk, synchronous=False)
            self.sending.append(sent)
        self.buffer = []
        if wait:
            self._settle()

    def _settle(self) -> None:
        sending, self.sending = self.sending, []
        for sent in sending:
            sent.wait()

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
