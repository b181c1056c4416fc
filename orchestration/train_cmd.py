"""``omniforge train run|plan``: multi-stage training of a recipe on curated shards."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from catalog.names import is_catalog_uri
from core.config import load_config
from core.weights import MissingWeights
from orchestration.common import (
    AddressOption,
    CatalogOption,
    TrackingUriOption,
    console,
    err_console,
    open_catalog,
)

app = typer.Typer(help="Training: multi-stage recipes on Ray Train + DeepSpeed, tracked in MLflow.")

RECIPES = Path(__file__).resolve().parent.parent / "training" / "recipes"


def recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the name of a built-in recipe (``omni_video_tiny``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    builtin = RECIPES / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if builtin.exists():
        return builtin
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise FileNotFoundError(f"recipe {name_or_path!r} not found; built-in recipes: {known}")


def parse_stages(text: str | None, count: int) -> list[int] | None:
    """``"1-3"``, ``"2"``, ``"1,3"`` -> 0-based indices (validated against the recipe)."""
    if not text:
        return None
    chosen: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
            raise ValueError(f"--stages {text!r}: use numbers like 1-3, 2 or 1,3")
        a, b = int(lo), int(hi or lo)
        if not 1 <= a <= b <= count:
            raise ValueError(f"--stages {text!r}: the recipe has stages 1..{count}")
        chosen += [i - 1 for i in range(a, b + 1) if i - 1 not in chosen]
    if chosen != sorted(chosen) or chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise ValueError(f"--stages {text!r}: stages run in order without gaps")
    return chosen


@app.command("run")
def run(
    recipe: str = typer.Argument(..., help="recipe YAML or built-in name (omni_video_tiny, ...)"),
    stages: str | None = typer.Option(None, "--stages", help="e.g. 1-3 (default: all)"),
    output: str = typer.Option(
        "runs/train", "--output", help="weights, checkpoints: a folder, s3:// or gs://"
    ),
    workers: int | None = typer.Option(None, "--workers", help="Ray Train workers (0: in-process)"),
    address: str | None = AddressOption,
    tracking_uri: str | None = TrackingUriOption,
    resume: bool = typer.Option(False, "--resume", help="continue the run in --output"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
    catalog: str | None = CatalogOption,
    progress_every: int = typer.Option(
        10, "--progress-every", min=1, help="off a terminal: a progress line every N steps"
    ),
    placement: str = typer.Option(
        "PACK",
        "--placement",
        help="workers on the nodes: PACK (fewest nodes), SPREAD (across nodes), STRICT_*",
        case_sensitive=False,
    ),
) -> None:
    """Train the recipe's stages; each stage starts from the previous stage's final weights.
    On a terminal a live line shows step, loss, task, bucket, samples/s, data wait and ETA."""
    from training.recipe import Recipe
    from training.runner import run_training

    r = load_config(Recipe, recipe_path(recipe), set_)
    summary = run_training(
        r,
        output,
        stages=parse_stages(stages, len(r.stages)),
        workers=workers,
        address=address,
        tracking_uri=tracking_uri,
        catalog=open_catalog(catalog),
        resume=resume,
        console=console,
        progress_every=progress_every,
        placement=placement.upper(),
    )
    table = Table(title=f"training {r.name}")
    for col in ("stage", "steps", "final loss", "time", "weights"):
        table.add_column(col)
    for s in summary["stages"]:
        if s.get("stopped_at") is not None:
            table.add_row(s["stage"], f"stopped at {s['stopped_at']}", "-", "-", "-")
            continue
        loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"
        when = "earlier" if s.get("skipped") else f"{s['elapsed_s']:.0f} s"
        table.add_row(s["stage"], str(s["steps"]), loss, when, s["weights"])
    console.print(table)
    if tracking_uri:
        console.print(f"MLflow: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1")


def print_memory(recipe, model, world_size: int, address: str | None) -> None:
    """The memory table of ``train plan`` and a warning per stage that does not fit."""
    from training.memory import find_gpus, model_shape
    from training.plan import memory_table

    try:
        gpus = find_gpus(address)
    except (ConnectionError, RuntimeError, TimeoutError) as e:  # the estimate still prints
        err_console.print(
            Text.assemble(("warning:", "bold yellow"), " memory: "),
            Text(f"cannot read the GPUs of the Ray cluster ({e}); nothing to compare against"),
        )
        gpus = None
    table, warnings = memory_table(recipe, model_shape(model), world_size, gpus)
    console.print(table)
    for warning in warnings:
        err_console.print(Text.assemble(("warning:", "bold yellow"), " memory: "), Text(warning))


@app.command("plan")
def plan(
    recipe: str = typer.Argument(..., help="recipe YAML or built-in name"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
    workers: int | None = typer.Option(
        None,
        "--workers",
        help="world size of the global batch and the data check (default: the recipe's)",
    ),
    catalog: str | None = CatalogOption,
    address: str | None = typer.Option(
        None,
        "--address",
        help="Ray cluster whose GPUs the memory estimate is checked against "
        "(default: RAY_ADDRESS, else this machine's GPUs)",
    ),
) -> None:
    """Per stage: trainable groups and parameter counts, the global batch, tasks, buckets,
    steps, ZeRO, and the estimated memory per GPU rank, with a warning for each stage that
    does not fit the GPUs found; then the data check against the real data (the one `train
    run` does before starting): each task's buckets and held-out counts, and every problem.
    Exit status 2 when the data has an error."""
    from training.data import holdout
    from training.plan import build, data_tables, describe
    from training.preflight import check_data
    from training.recipe import Recipe

    r = load_config(Recipe, recipe_path(recipe), set_)
    try:
        model = build(r)
    except MissingWeights as e:  # weights elsewhere (the cluster): plan from the configs
        try:
            model = build(r, config_only=True)
        except MissingWeights:
            raise e from None
        err_console.print(
            Text.assemble(("note:", "bold"), " "),
            Text(
                "the backbone weights are not on this machine, so the plan is built from their "
                f"configs alone (shapes and parameter counts; nothing loaded):\n{e}"
            ),
        )
    for part in describe(r, model, max(1, r.workers if workers is None else workers)):
        console.print(part)
    uses_catalog = any(is_catalog_uri(d.uri) for d in r.data.values())
    # the memory per GPU rank of each stage, a warning for each that does not fit
    print_memory(r, model, max(1, r.workers if workers is None else workers), address)
    check = check_data(
        r,
        world_size=max(1, r.workers if workers is None else workers),
        geometry=model.geometry,
        catalog=open_catalog(catalog, create=False) if uses_catalog else None,
    )
    for table in data_tables(check):
        console.print(table)
    if check.splits:  # the held-out split of each data entry (training/data/holdout.py)
        console.print("held-out split (evaluation only, never trained on):", highlight=False)
        for line in holdout.describe(check.splits).splitlines():
            console.print(f"  {line}", highlight=False)
    for note in check.notes:
        console.print(f"note: {note}", highlight=False)
    for problem in check.problems:  # bucket warnings: the tables' note column, counted below
        if problem.severity == "warning" and problem.bucket is not None:
            continue
        colour = "red" if problem.severity == "error" else "yellow"
        err_console.print(
            Text.assemble((f"{problem.severity}:", f"bold {colour}"), f" {problem.where()}: "),
            Text(problem.message),
            sep="",
        )
    if check.bucket_summary():
        err_console.print(
            Text.assemble(
                ("warning:", "bold yellow"), f" {check.bucket_summary()}: see the note column above"
            )
        )
    if check.errors:
        err_console.print(
            f"data check: {len(check.errors)} error(s), {len(check.warnings)} warning(s); "
            "`train run` refuses to start"
        )
        raise typer.Exit(2)
    console.print(
        f"data check: ok on {check.world_size} worker(s)"
        + (f", {len(check.warnings)} warning(s)" if check.warnings else "")
    )
