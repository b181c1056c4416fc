"""``omniforge submit curate|train`` and ``omniforge jobs ls|status|logs|cancel``."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import typer

from catalog.store import NotFound
from core.config import load_config
from core.secrets import mask_urls
from orchestration import jobs
from orchestration.common import (
    CatalogOption,
    Column,
    OutputFormat,
    OutputOption,
    TrackingUriOption,
    command_prefix,
    console,
    fitted_table,
    open_catalog,
    print_json,
)

submit_app = typer.Typer(help="Run curation or training on a Ray cluster (Ray Jobs API).")
jobs_app = typer.Typer(help="List, inspect, follow and cancel cluster jobs.")

AddressOption = typer.Option(
    None,
    "--address",
    help="Jobs API of the cluster, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, "
    "else the head from `omniforge cluster up`)",
)
# On the cluster the catalog URL and tracking URI come from the nodes' environment unless
# given here (without a password).
JobCatalogOption = typer.Option(
    None,
    "--catalog",
    help="catalog URL the job uses, or the absolute path of a SQLite file as the cluster sees "
    "it; default: the cluster's environment",
)


def _finish(job_id: str, address: str | None, wait: bool, follow: bool) -> None:
    console.print(f"submitted job {job_id}")
    if follow:
        jobs.follow_logs(job_id, address, lambda text: console.out(text, end=""))
    if wait or follow:
        status = jobs.wait(job_id, address, on_status=lambda s: console.print(f"job {s}"))
        if status != "SUCCEEDED":
            raise typer.Exit(1)
    else:
        console.print(f"follow with: {command_prefix()} jobs logs {job_id} --follow")


def job_catalog(value: str | None) -> str | None:
    """``--catalog`` of a job: a URL, or a SQLite file's absolute path as the cluster sees it
    (taken as written: resolving it here would follow this machine's links). A relative path
    would be resolved against this machine's folder, which names nothing on a cluster."""
    if not value or "://" in value:
        return value
    if not Path(value).is_absolute():
        raise ValueError(
            f"--catalog {value}: a relative path names no file on the cluster; give the "
            "SQLite file's absolute path as the cluster sees it, or a database URL"
        )
    return f"sqlite:///{value}"


@submit_app.command("curate")
def submit_curate(
    config: Path | None = typer.Argument(None, help="curation config YAML (default profile)"),
    input: str = typer.Option(..., "--input", help="corpus URI as the cluster sees it"),
    output: str = typer.Option(..., "--output", help="output folder/URI on the cluster"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
    allow_input: list[str] = typer.Option(
        [], "--allow-input", help="a folder or URI prefix outside --input inputs may come from"
    ),
    address: str | None = AddressOption,
    catalog: str | None = JobCatalogOption,
    tracking_uri: str | None = TrackingUriOption,
    package: bool = typer.Option(True, help="ship this checkout's code (else the image's)"),
    wait: bool = typer.Option(False, "--wait", help="wait for the job to end"),
    follow: bool = typer.Option(False, "--follow", help="stream the job's log until it ends"),
) -> None:
    """Submit ``omniforge curate run`` with CONFIG (validated here, shipped resolved)."""
    from curation.config import CurationConfig

    cfg = load_config(CurationConfig, config, set_)
    if allow_input:
        cfg = cfg.model_copy(update={"allow_inputs": [*cfg.allow_inputs, *allow_input]})
    catalog = job_catalog(catalog)
    spec = jobs.curate_spec(cfg, input, output, catalog=catalog, tracking_uri=tracking_uri)
    job_id = jobs.submit(spec, address, package=package)
    _finish(job_id, address, wait, follow)


@submit_app.command("train")
def submit_train(
    recipe: str = typer.Argument(..., help="recipe YAML or built-in name"),
    output: str = typer.Option(
        ..., "--output", help="output folder on the cluster's storage, or s3:// | gs://"
    ),
    stages: str | None = typer.Option(None, "--stages", help="e.g. 1-3 (default: all)"),
    workers: int | None = typer.Option(None, "--workers", help="Ray Train workers"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --output"),
    placement: str | None = typer.Option(
        None, "--placement", help="PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (train run's)"
    ),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
    address: str | None = AddressOption,
    catalog: str | None = JobCatalogOption,
    tracking_uri: str | None = TrackingUriOption,
    package: bool = typer.Option(True, help="ship this checkout's code (else the image's)"),
    num_gpus: float | None = typer.Option(None, "--driver-gpus", help="GPUs for the driver"),
    wait: bool = typer.Option(False, "--wait", help="wait for the job to end"),
    follow: bool = typer.Option(False, "--follow", help="stream the job's log until it ends"),
) -> None:
    """Submit ``omniforge train run`` with RECIPE (validated here, shipped resolved)."""
    from orchestration.train_cmd import parse_stages, recipe_path
    from training.ray_stage import PLACEMENTS
    from training.recipe import Recipe

    r = load_config(Recipe, recipe_path(recipe), set_)
    parse_stages(stages, len(r.stages))  # fail here, not on the cluster
    if placement is not None and placement.upper() not in PLACEMENTS:
        raise ValueError(f"--placement {placement}: choose one of {', '.join(PLACEMENTS)}")
    spec = jobs.train_spec(
        r,
        output,
        stages=stages,
        workers=workers,
        resume=resume,
        catalog=job_catalog(catalog),
        tracking_uri=tracking_uri,
        placement=placement.upper() if placement else None,
    )
    job_id = jobs.submit(spec, address, package=package, num_gpus=num_gpus)
    _finish(job_id, address, wait, follow)


def _when(ms: int | None, short: bool = False) -> str:
    if not ms:
        return "-"
    when = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return when.strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat() if ms else None


def _job_json(d) -> dict:
    return {
        "id": d.submission_id or d.job_id,
        "status": str(d.status.value),
        "message": mask_urls(d.message or "") or None,
        "started": _iso(d.start_time),
        "ended": _iso(d.end_time),
        "entrypoint": mask_urls(d.entrypoint or ""),
        "metadata": dict(d.metadata or {}),
    }


LS_COLUMNS = (
    Column("id", copy=True),
    Column("status", copy=True),
    Column("kind", drop=2),
    Column("name"),
    Column("started (UTC)", drop=3),
    Column("entrypoint", drop=4),
)


@jobs_app.command("ls")
def ls(address: str | None = AddressOption, output: OutputFormat = OutputOption) -> None:
    """The cluster's jobs, newest first."""
    jobs_client = jobs.client(address)
    details = jobs_client.list_jobs()
    details.sort(key=lambda d: d.start_time or 0, reverse=True)
    if output == OutputFormat.json:
        print_json([_job_json(d) for d in details])
        return
    rows = []
    for d in details:
        meta = d.metadata or {}
        entry = mask_urls(d.entrypoint or "")
        rows.append(
            (
                d.submission_id or d.job_id or "-",
                str(d.status.value),
                meta.get("omniforge.kind", "-"),
                meta.get("omniforge.name", "-"),
                _when(d.start_time, short=True),
                entry if len(entry) < 80 else entry[:77] + "...",
            )
        )
    console.print(fitted_table(f"jobs on {jobs_client.get_address()}", LS_COLUMNS, rows))


@jobs_app.command("status")
def status(
    job_id: str = typer.Argument(..., help="submission id"),
    address: str | None = AddressOption,
    catalog: str | None = CatalogOption,
    output: OutputFormat = OutputOption,
) -> None:
    """A job's state, timing, entrypoint and the catalog runs it recorded."""
    d = jobs.job_info(jobs.client(address), job_id)
    try:
        runs = open_catalog(catalog, create=False).list_runs(job_id=job_id)
        no_catalog = None
    except NotFound as e:  # no catalog here: the job's runs are recorded elsewhere
        runs, no_catalog = [], str(e)
    if output == OutputFormat.json:
        info = _job_json(d)
        info["catalog_runs"] = [
            {
                "id": r.id,
                "kind": r.kind,
                "name": r.name,
                "status": r.status,
                "mlflow_run_id": r.mlflow_run_id,
            }
            for r in reversed(runs)
        ]
        print_json(info)
        return
    console.print(f"job {job_id}: [bold]{d.status.value}[/]")
    if d.message:
        console.print(f"  {mask_urls(d.message)}", markup=False)
    console.print(f"  started {_when(d.start_time)}, ended {_when(d.end_time)}")
    console.print(f"  entrypoint: {mask_urls(d.entrypoint or '')}", markup=False)
    for key, value in sorted((d.metadata or {}).items()):
        console.print(f"  {key}: {value}", markup=False)
    for run in reversed(runs):
        link = f", MLflow run {run.mlflow_run_id}" if run.mlflow_run_id else ""
        console.print(
            f"  catalog run {run.id} ({run.kind}) {run.name}: {run.status}{link}", markup=False
        )
    if no_catalog:
        console.print(f"  catalog runs: not shown, {no_catalog}", markup=False)


@jobs_app.command("logs")
def logs(
    job_id: str = typer.Argument(..., help="submission id"),
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends"),
    address: str | None = AddressOption,
) -> None:
    """The job's driver log (URL passwords masked)."""
    if follow:
        jobs.follow_logs(job_id, address, lambda text: console.out(text, end=""))
    else:
        jobs_client = jobs.client(address)
        jobs.job_info(jobs_client, job_id)
        console.out(mask_urls(jobs_client.get_job_logs(job_id)), end="")


@jobs_app.command("cancel")
def cancel(
    job_id: str = typer.Argument(..., help="submission id"), address: str | None = AddressOption
) -> None:
    """Stop a running job (Ray sends SIGTERM; the job marks its catalog runs failed)."""
    jobs_client = jobs.client(address)
    jobs.job_info(jobs_client, job_id)
    stopped = jobs_client.stop_job(job_id)
    console.print(f"job {job_id}: {'stop requested' if stopped else 'was not running'}")
