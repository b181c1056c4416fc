"""``omniforge plan run|status PLAN.yaml``: curation and training stages as one resumable plan."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from orchestration.common import CatalogOption, console, open_catalog

app = typer.Typer(help="Stage plans: curate -> stage 1 -> stage 2 ... resumable, with lineage.")


def _catalog(plan, option: str | None):
    return open_catalog(option or plan.catalog)


@app.command("run")
def run(
    plan_file: Path = typer.Argument(..., help="plan YAML"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
    catalog: str | None = CatalogOption,
) -> None:
    """Run the plan's unfinished steps; rerun the same command to resume after a stop."""
    from orchestration.plan import load_plan, run_plan

    plan, output = load_plan(plan_file, set_)
    run_plan(plan, output, _catalog(plan, catalog), console=console)
    print_status(plan_file, set_, catalog)


@app.command("status")
def status(
    plan_file: Path = typer.Argument(..., help="plan YAML"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
    catalog: str | None = CatalogOption,
) -> None:
    """A table of the plan's steps: status, catalog run, dataset version, MLflow run."""
    print_status(plan_file, set_, catalog)


def print_status(plan_file: Path, set_: list[str], catalog: str | None) -> None:
    from orchestration.plan import load_plan, status_rows

    plan, output = load_plan(plan_file, set_)
    started = (output / "plan.json").exists()  # before the first run there is nothing to read
    rows = status_rows(plan, output, _catalog(plan, catalog) if started else None)
    table = Table(title=f"plan {plan.name} ({output})")
    cols = ("step", "what", "status", "result", "catalog run", "dataset version", "MLflow run")
    for col in cols:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["step"],
            r["what"],
            r["status"],
            r["result"],
            r["catalog_run"],
            r["version"],
            r["mlflow"],
        )
    console.print(table)
    if plan.tracking_uri and not plan.tracking_uri.startswith(("http://", "https://")):
        console.print(
            f"MLflow UI: mlflow ui --backend-store-uri {plan.tracking_uri} --host 127.0.0.1"
        )
