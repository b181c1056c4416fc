"""``omniforge demo`` / ``make demo``: the main job on embedded defaults.

Today: generate the sample corpus, register it as a dataset version in a catalog inside the
output folder, and show how to inspect it. Curation and training extend this same command.
"""

from __future__ import annotations

import time
from pathlib import Path

from catalog.store import Catalog
from orchestration.common import console


def run_demo(output: Path, catalog_url: str | None = None) -> None:
    start = time.monotonic()
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    catalog_url = catalog_url or f"sqlite:///{output / 'catalog.db'}"
    cat = Catalog(catalog_url)

    from curation.sample_data import generate
    from curation.sample_data.register import register_sample_corpus

    corpus = output / "corpus"
    console.rule("1. sample corpus")
    labels = generate(corpus, seed=0)
    console.print(f"{len(labels)} labelled items in {corpus}")

    console.rule("2. catalog")
    version = register_sample_corpus(corpus, cat, name="sample-corpus")
    c = version.counts
    console.print(
        f"committed {version.ref}: {version.num_samples} samples "
        f"({c['accepted']} accepted, {c['rejected']} rejected, {c['error']} error) "
        f"in {version.num_shards} shards"
    )
    console.rule("done")
    console.print(f"finished in {time.monotonic() - start:.1f} s. Look around with:")
    for cmd in (
        "omniforge catalog ls",
        f"omniforge catalog show {version.dataset}@{version.version}",
        f"omniforge catalog resolve catalog://{version.dataset}@latest "
        "--filter \"kind == 'video'\"",
    ):
        console.print(f"  {cmd} --catalog {catalog_url}")
