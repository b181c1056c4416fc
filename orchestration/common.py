"""Shared CLI pieces: consoles, the --catalog and --output options, tables that fit the
terminal, runnable command lines, human-readable sizes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from catalog.store import ENV_URL, Catalog
from core.fmt import human_bytes as human_bytes  # the CLI's commands import it here
from orchestration import services

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

CatalogOption = typer.Option(
    None,
    "--catalog",
    envvar=ENV_URL,
    help="catalog: sqlite:///FILE, postgresql://..., or the path of a SQLite file "
    "(default ~/.omniforge/catalog.db)",
)
AddressOption = typer.Option(None, "--address", help="Ray cluster (default: local)")
TrackingUriOption = typer.Option(None, "--tracking-uri", help="MLflow tracking URI")
RayVerboseOption = typer.Option(
    False, "--verbose", help="also show Ray's own logs (as omniforge --verbose)"
)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


OutputOption = typer.Option(
    OutputFormat.table, "--output", "-o", help="table for people, json for scripts"
)


def catalog_url(value: str | None) -> str | None:
    """A ``--catalog`` value as a database URL. A value without ``scheme://`` is the path of a
    SQLite file (``--catalog demo_out/catalog.db``: what a user who types a path means); it
    becomes ``sqlite:///ABSOLUTE_PATH`` so the URL means the same file from any folder."""
    if not value or "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def open_catalog(url: str | None, *, create: bool = True) -> Catalog:
    """The catalog at ``url`` (default: the environment's). ``create=False`` for read-only
    commands: a catalog that does not exist is an error, never created."""
    return Catalog(catalog_url(url), create=create)


def stop_service(name: str, what: str, *, sig: int = signal.SIGTERM, article: str = "the ",
                 note: str = "") -> None:  # fmt: skip
    """``NAME down``: stop a service started by ``NAME up`` and say so (or that none runs)."""
    service = services.stop(name, sig=sig)
    if service is None:
        console.print(f"no {what} is running")
    else:
        console.print(f"stopped {article}{what} (pid {service.pid}, {service.url}){note}")


def show_service(name: str, what: str, command: str) -> services.Service:
    """``NAME status``: where the service runs; exit status 1 when it does not."""
    service = services.running(name)
    if service is None:
        console.print(f"no {what} is running (start one with: omniforge {command} up)")
        raise typer.Exit(1)
    console.print(f"{what} running (pid {service.pid}) at {service.url}")
    return service


def print_json(data: Any) -> None:
    """Machine-readable output on stdout (dates as ISO text), nothing else on stdout."""
    sys.stdout.write(json.dumps(data, indent=1, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


@dataclass
class Column:
    """A column of a fitted table. ``copy``: an id users paste into other commands, never
    wrapped or cut; ``drop``: when the terminal is too narrow, columns with the highest
    ``drop`` go first (0: always shown); other text columns wrap."""

    header: str
    copy: bool = False
    drop: int = 0


WRAP_MIN = 10  # a wrapped text column keeps at least this many characters per line


def fitted_table(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None = None
) -> Table:
    """A table that fits ``width`` (the terminal's): ids whole on one line, optional columns
    dropped until the rest fits, text columns wrapped."""
    width = width or console.width
    shown = list(range(len(columns)))

    def need(i: int) -> int:
        natural = max([len(columns[i].header), *(len(str(r[i])) for r in rows)])
        return natural if columns[i].copy else min(natural, WRAP_MIN)

    def total(idx: list[int]) -> int:
        return sum(need(i) for i in idx) + 3 * len(idx) + 1  # borders and padding

    for i in sorted((i for i in shown if columns[i].drop), key=lambda i: -columns[i].drop):
        if total(shown) <= width:
            break
        shown.remove(i)
    hidden = [columns[i].header for i in range(len(columns)) if i not in shown]
    caption = None
    if hidden:
        caption = f"not shown in {width} columns: {', '.join(hidden)} (see --output json)"
    table = Table(title=title, caption=caption)
    for i in shown:
        col = columns[i]
        if col.copy:
            table.add_column(col.header, no_wrap=True, min_width=need(i))
        else:
            table.add_column(col.header, overflow="fold")
    for r in rows:
        table.add_row(*(str(r[i]) for i in shown))
    return table


def command_prefix(name: str = "omniforge") -> str:
    """How to run this installation's ``name`` script as typed in this shell: the bare name
    when it is on PATH and is this installation's, else its path (``.venv/bin/omniforge``)."""
    mine = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found and (not mine.exists() or _same_file(found, mine)):
        return name
    if not mine.exists():
        return name
    try:
        return str(mine.relative_to(Path.cwd()))
    except ValueError:
        return str(mine)


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def shown_path(path: Path) -> str:
    """``path`` relative to the current folder when inside it (shorter to copy), else whole."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
