"""``omniforge config validate|show``: check a curation config or a training recipe."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import typer

from core.config import ConfigWarning, load_config, load_yaml
from orchestration.common import console, err_console

app = typer.Typer(help="Validate and print configs (curation configs and training recipes).")

ConfigType = Literal["auto", "curation", "recipe"]


def model_for(path: Path | None, kind: str):
    """The config model for ``path``: a file with ``model`` and ``stages`` is a recipe."""
    from curation.config import CurationConfig
    from training.recipe import Recipe

    if kind == "curation":
        return CurationConfig
    if kind == "recipe":
        return Recipe
    if kind != "auto":
        raise ValueError(f"--type must be auto, curation or recipe, got {kind!r}")
    if path is not None:
        data = load_yaml(path)
        if "stages" in data or "model" in data:
            return Recipe
    return CurationConfig


@app.command()
def validate(
    file: Path = typer.Argument(..., help="YAML config or recipe"),
    type: str = typer.Option("auto", "--type", help="auto | curation | recipe"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
) -> None:
    """Validate FILE; print every problem (field path, bad value, what is allowed). A recipe's
    trainable globs and tasks are checked against its model family's groups and tasks."""
    model = model_for(file, type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        load_config(model, file, set_)
    for w in caught:
        if issubclass(w.category, ConfigWarning):
            err_console.print(f"[yellow]warning:[/] {w.message}")
    hint = ""
    if model.__name__ == "Recipe":  # the settings are checked; the data needs the catalog
        hint = " (its data against it: `omniforge train plan`)"
    console.print(f"[green]ok[/]: {file} is a valid {model.__name__}{hint}")


@app.command()
def show(
    file: Path | None = typer.Argument(None, help="YAML file (omit for the curation defaults)"),
    type: str = typer.Option("auto", "--type", help="auto | curation | recipe"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
) -> None:
    """Print the resolved config (defaults + file + overrides) as YAML, secrets masked."""
    import yaml

    from core.config import to_plain
    from core.secrets import masked

    model = model_for(file, type)
    plain = masked(to_plain(load_config(model, file, set_)))
    console.print(yaml.safe_dump(plain, sort_keys=False), end="", markup=False)
