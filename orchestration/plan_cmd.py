"""``omniforge plan run|status PLAN.yaml``: curation and training stages as one resumable plan."""

from __future__ import annotations

from pathlib import Path

import typer

from core import storage
from orchestration.common import (
    CatalogOption,
    Column,
    OutputFormat,
    OutputOption,
    command_prefix,
    console,
    fitted_table,
    open_catalog,
    print_json,
)

app = typer.Typer(help="Stage plans: curate -> stage 1 -> stage 2 ... resumable, with lineage.")


def _catalog(plan, option: str | None, create: bool = True):
    return open_catalog(option or plan.catalog, create=create)


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
    output: OutputFormat = OutputOption,
) -> None:
    """A table of the plan's steps: status, catalog run, dataset version, MLflow run."""
    print_status(plan_file, set_, catalog, output)


# step, status and the ids are copied into other commands: whole, on one line
STATUS_COLUMNS = (
    ("step", Column("step", copy=True)),
    ("what", Column("what", drop=1)),
    ("status", Column("status", copy=True)),
    ("result", Column("result")),
    ("catalog_run", Column("catalog run", copy=True)),
    ("version", Column("dataset version", copy=True)),
    ("mlflow", Column("MLflow run", copy=True, drop=2)),
)


def print_status(
    plan_file: Path,
    set_: list[str],
    catalog: str | None,
    output: OutputFormat = OutputFormat.table,
) -> None:
    from orchestration.plan import load_plan, status_rows

    plan, folder = load_plan(plan_file, set_)
    started = storage.exists(folder.join("plan.json"))  # before the first run: nothing to read
    rows = status_rows(plan, folder, _catalog(plan, catalog, create=False) if started else None)
    if output == OutputFormat.json:
        print_json({"plan": plan.name, "output": str(folder), "steps": rows})
        return
    table = fitted_table(
        f"plan {plan.name} ({folder})",
        [col for _, col in STATUS_COLUMNS],
        [[r[key] for key, _ in STATUS_COLUMNS] for r in rows],
    )
    console.print(table)
    if plan.tracking_uri and not plan.tracking_uri.startswith(("http://", "https://")):
        mlflow = command_prefix("mlflow")
        console.print(
            f"MLflow UI: {mlflow} ui --backend-store-uri {plan.tracking_uri} --host 127.0.0.1",
            markup=False,
        )
