"""Shared CLI pieces: consoles, the --catalog option, human-readable sizes."""

from __future__ import annotations

import typer
from rich.console import Console

from catalog.store import ENV_URL, Catalog

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

CatalogOption = typer.Option(
    None,
    "--catalog",
    envvar=ENV_URL,
    help="catalog database URL (sqlite:///FILE or postgresql://...); default ~/.omniforge",
)


def open_catalog(url: str | None) -> Catalog:
    return Catalog(url)


def human_bytes(n: int | None) -> str:
    if not n:
        return "0 B"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
