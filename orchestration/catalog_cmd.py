"""``omniforge catalog ...``: list datasets, show versions, lineage, resolve references,
verify shards."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from catalog.names import DatasetRef
from catalog.store import Catalog, Node, NotFound, VersionInfo, migrate
from core.secrets import mask_urls
from orchestration.common import (
    CatalogOption,
    OutputFormat,
    OutputOption,
    catalog_url,
    console,
    human_bytes,
    open_catalog,
    print_json,
)

app = typer.Typer(help="The catalog: datasets, versions, shards, runs, lineage.")


def _when(dt) -> str:
    return dt.strftime("%Y-%m-%d %H:%M") if dt else "-"


def _counts(counts: dict[str, int]) -> str:
    return " / ".join(str(counts.get(k, 0)) for k in ("accepted", "rejected", "error"))


@app.command("ls")
def ls(catalog: str | None = CatalogOption, output: OutputFormat = OutputOption) -> None:
    """Datasets with their latest committed version."""
    try:
        cat = open_catalog(catalog, create=False)
    except NotFound as e:  # no catalog yet: nothing to list (and nothing created)
        if output == OutputFormat.json:
            print_json([])
        else:
            console.print(str(e), markup=False)
        return
    rows = cat.list_datasets()
    if output == OutputFormat.json:
        print_json(rows)
        return
    if not rows:
        console.print(f"no datasets in {mask_urls(cat.url)}", markup=False)
        return
    table = Table(title=f"datasets in {escape(mask_urls(cat.url))}")
    table.add_column("name", overflow="fold")
    for col in ("versions", "latest", "samples", "accepted / rejected / error", "committed"):
        table.add_column(col)
    for r in rows:
        pending = f" (+{r['pending']} pending)" if r["pending"] else ""
        table.add_row(
            r["name"],
            f"{r['versions']}{pending}",
            str(r["latest"] or "-"),
            str(r["samples"]),
            _counts(r["counts"]),
            _when(r["committed_at"]),
        )
    console.print(table)


@app.command()
def show(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION (VERSION: number or latest)"),
    all_: bool = typer.Option(False, "--all", help="include pending and failed versions"),
    catalog: str | None = CatalogOption,
) -> None:
    """A dataset's versions, or one version with its shards per bucket."""
    cat = open_catalog(catalog, create=False)
    parsed = DatasetRef.parse(ref)
    if "@" not in ref:
        versions = cat.list_versions(parsed.name, include_pending=all_)
        table = Table(title=f"dataset {parsed.name}")
        for col in (
            "version",
            "status",
            "samples",
            "accepted / rejected / error",
            "shards",
            "bytes",
            "config",
            "code",
            "committed",
        ):
            table.add_column(col)
        for v in versions:
            table.add_row(
                str(v.version),
                v.status,
                str(v.num_samples),
                _counts(v.counts),
                str(v.num_shards),
                human_bytes(v.num_bytes),
                (v.config_hash or "-")[:12],
                v.code_version or "-",
                _when(v.committed_at),
            )
        console.print(table if versions else f"dataset {parsed.name} has no committed version")
        return
    v = cat.get_version(parsed.name, parsed.version, include_pending=all_)
    _print_version(cat, v)


def _print_version(cat: Catalog, v: VersionInfo) -> None:
    console.print(f"[bold]{v.ref}[/] ({v.status})")
    for label, value in [
        ("samples", f"{v.num_samples} ({_counts(v.counts)} accepted / rejected / error)"),
        ("shards", f"{v.num_shards}, {human_bytes(v.num_bytes)}"),
        ("root", v.root_uri or "-"),
        ("index", v.index_uri or "-"),
        ("config hash", v.config_hash or "-"),
        ("code version", v.code_version or "-"),
        ("parent", cat.version_by_id(v.parent_id).ref if v.parent_id else "-"),
        ("created", _when(v.created_at)),
        ("committed", _when(v.committed_at)),
    ]:
        console.print(f"  {label:13s} {value}")
    per_bucket: dict[str, list[int]] = {}
    for sh in cat.shards(v.id):
        b = per_bucket.setdefault(sh.bucket, [0, 0, 0])
        b[0] += 1
        b[1] += sh.num_samples
        b[2] += sh.num_bytes
    if per_bucket:
        table = Table(title="shards per bucket")
        for col in ("bucket", "shards", "samples", "bytes"):
            table.add_column(col)
        for bucket, (n, samples, size) in sorted(per_bucket.items()):
            table.add_row(bucket, str(n), str(samples), human_bytes(size))
        console.print(table)


@app.command()
def lineage(
    ref: str = typer.Argument(..., help="NAME@VERSION"),
    catalog: str | None = CatalogOption,
) -> None:
    """Where a version came from and what was made from it (runs, versions, checkpoints)."""
    cat = open_catalog(catalog, create=False)
    parsed = DatasetRef.parse(ref)
    v = cat.get_version(parsed.name, parsed.version, include_pending=True)
    up, down = cat.lineage(Node("version", v.id))
    # plain lines (not a rich Tree): labels hold paths that must not be cut at 80 columns
    console.print(f"[bold]{v.ref}[/] ({v.status})")
    for title, edges in (("upstream", up), ("downstream", down)):
        console.print(f"  {title}:")
        for e in edges:
            console.print(
                f"    {e.parent_label} --{e.relation or 'to'}--> {e.child_label}", markup=False
            )
        if not edges:
            console.print("    (none)")


@app.command()
def resolve(
    ref: str = typer.Argument(..., help="catalog://NAME@VERSION"),
    filter: str | None = typer.Option(None, "--filter", help='e.g. "aesthetic > 5"'),
    keys: bool = typer.Option(False, "--keys", help="print the matching sample keys"),
    catalog: str | None = CatalogOption,
) -> None:
    """Shards and accepted samples that a reference (+ filter) selects, as training sees them."""
    cat = open_catalog(catalog, create=False)
    res = cat.resolve(ref, filter)
    console.print(
        f"{res.version.ref}: {res.num_matched} accepted samples"
        + (f" matching {filter!r}" if filter else "")
        + f" in {len(res.shards)} shards"
    )
    for sh in res.shards:
        console.print(f"  {sh.uri}  [{sh.bucket}] {sh.num_samples} samples")
    if keys:
        for k in res.keys:
            console.print(k)


@app.command()
def verify(
    ref: str = typer.Argument(..., help="NAME@VERSION (VERSION: number or latest)"),
    catalog: str | None = CatalogOption,
) -> None:
    """Check every shard of a committed version: present, recorded size, recorded sha256.

    Exit status 1 when any shard is missing or corrupt (each one is listed).
    """
    cat = open_catalog(catalog, create=False)
    parsed = DatasetRef.parse(ref)
    v = cat.get_version(parsed.name, parsed.version)
    problems = cat.verify_shards(v.id)
    if problems:
        console.print(f"{v.ref}: {len(problems)} of {v.num_shards} shards are missing or corrupt")
        for p in problems:
            console.print(f"  {p}", markup=False)
        raise typer.Exit(1)
    console.print(f"{v.ref}: {v.num_shards} shards verified, {v.num_bytes} bytes")


@app.command("migrate")
def migrate_cmd(catalog: str | None = CatalogOption) -> None:
    """Create or upgrade the catalog schema (done automatically on open too)."""
    cat = Catalog(catalog_url(catalog), auto_migrate=False)
    rev = migrate(cat.engine)
    console.print(f"{mask_urls(cat.url)} at schema revision {rev}", markup=False)
