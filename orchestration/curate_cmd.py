"""``omniforge curate run|select``: raw corpus -> curated shards, index, report, catalog version."""

from __future__ import annotations

from pathlib import Path

import typer

from catalog.names import is_catalog_uri
from core.config import load_config, to_plain
from orchestration import quiet
from orchestration.common import (
    AddressOption,
    CatalogOption,
    RayVerboseOption,
    TrackingUriOption,
    console,
    open_catalog,
)

app = typer.Typer(help="Curation: raw image/video/edit corpora -> curated, bucketed shards.")

KINDS = ("auto", "image", "video", "image_edit", "video_edit", "conversation")


@app.command("run")
def run(
    input: str = typer.Option(..., "--input", help="directory, manifest, tar(s) or fsspec URI"),
    output: str = typer.Option(
        ...,
        "--output",
        help="folder or object-store prefix (s3://BUCKET/PREFIX, gs://...): shards/, index/, "
        "report.html go here",
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML curation config"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
    kind: str | None = typer.Option(
        None,
        "--kind",
        help="auto|image|video|image_edit|video_edit|conversation (LLaVA-style QA JSON/JSONL)",
    ),
    address: str | None = AddressOption,
    models_dir: Path | None = typer.Option(
        None, "--models-dir", envvar="OMNIFORGE_MODELS", help="model weights directory"
    ),
    tracking_uri: str | None = TrackingUriOption,
    allow_input: list[str] = typer.Option(
        [],
        "--allow-input",
        help="a local folder or URI prefix (s3://bucket/raw/) outside --input that inputs may "
        "come from (repeatable; added to the config's allow_inputs)",
    ),
    catalog: str | None = CatalogOption,
    verbose: bool = RayVerboseOption,
) -> None:
    """Curate INPUT into OUTPUT and commit a dataset version. Rerun the same command to resume."""
    from curation.config import CurationConfig
    from curation.pipeline import run_curation

    if verbose:
        quiet.quiet_libraries(True)
    overrides = list(set_)
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
        overrides.append(f"kind={kind}")
    if models_dir is not None:
        overrides.append(f"models_dir={models_dir}")
    cfg = load_config(CurationConfig, config, overrides)
    if allow_input:
        cfg = cfg.model_copy(update={"allow_inputs": [*cfg.allow_inputs, *allow_input]})
    run_curation(
        input,
        output,
        cfg,
        catalog=open_catalog(catalog),
        address=address,
        tracking_uri=tracking_uri,
        console=console,
        verbose=verbose or quiet.verbose(),
    )


@app.command("dedup")
def dedup(
    source: str = typer.Argument(..., help="catalog://NAME@VERSION or a curation output"),
    output: str = typer.Option(
        ..., "--output", help="folder or s3:// / gs:// prefix of the new version"
    ),
    against: list[str] = typer.Option(
        [], "--against", help="catalog://NAME@VERSION whose samples are kept (repeatable)"
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML with new settings"),
    set_: list[str] = typer.Option(
        [], "--set", help="e.g. dedup.max_bits=6, dedup.cosine=0.97, dedup.cosine=null"
    ),
    address: str | None = AddressOption,
    tracking_uri: str | None = TrackingUriOption,
    catalog: str | None = CatalogOption,
    verbose: bool = RayVerboseOption,
) -> None:
    """Reject near-duplicates of an existing version (within it, and of the samples of
    --against versions) without recomputing scores: a new version whose parent is SOURCE.
    Signals: the frames' pHash within dedup.max_bits, and the stored CLIP embedding at
    cosine dedup.cosine or more (when the run had a CLIP scorer)."""
    from curation.pipeline import dedup as run_dedup

    if verbose:
        quiet.quiet_libraries(True)
    cat = open_catalog(catalog)
    root, parent, cfg = _rewrite_source(cat, source, config, set_)
    others = []
    for ref in against:
        if not is_catalog_uri(ref):
            raise ValueError(f"--against {ref}: name a version as catalog://NAME@VERSION")
        others.append(cat.version_of(ref))
    run_dedup(
        root,
        output,
        cfg,
        catalog=cat,
        parent=parent,
        against=others,
        address=address,
        tracking_uri=tracking_uri,
        console=console,
        verbose=verbose or quiet.verbose(),
    )


def _rewrite_source(cat, source: str, config: Path | None, set_: list[str]):
    """(root, parent version or None, config) of a ``select`` / ``dedup`` source: the run's
    own config with ``config`` and ``set_`` on top."""
    from curation.config import CurationConfig
    from curation.pipeline import load_run_config

    parent = None
    if is_catalog_uri(source):
        parent = cat.version_of(source)
        root = parent.root_uri
    else:
        root = source
    base = load_run_config(root)
    return root, parent, load_config(CurationConfig, config, set_, base=to_plain(base))


@app.command("select")
def select(
    source: str = typer.Argument(..., help="catalog://NAME@VERSION or a curation output"),
    output: str = typer.Option(
        ..., "--output", help="folder or s3:// / gs:// prefix of the new version"
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML with new thresholds"),
    set_: list[str] = typer.Option([], "--set", help="e.g. select.min_aesthetic=5.5"),
    address: str | None = AddressOption,
    tracking_uri: str | None = TrackingUriOption,
    catalog: str | None = CatalogOption,
    verbose: bool = RayVerboseOption,
) -> None:
    """Re-apply thresholds to an existing index without recomputing scores (a new version)."""
    from curation.pipeline import reselect

    if verbose:
        quiet.quiet_libraries(True)
    cat = open_catalog(catalog)
    root, parent, cfg = _rewrite_source(cat, source, config, set_)
    reselect(
        root,
        output,
        cfg,
        catalog=cat,
        parent=parent,
        address=address,
        tracking_uri=tracking_uri,
        console=console,
        verbose=verbose or quiet.verbose(),
    )
