"""``omniforge demo`` / ``make demo``: the main job on embedded defaults.

sample corpus -> ground-truth registration (``sample-corpus``) -> curation on a local Ray
(``sample-curated``) -> the omni_video tiny recipe, 3 stages on Ray Train (2 workers) with
DeepSpeed -> MLflow runs (a SQLite store in the output folder). Rerunning resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

from catalog.config import load_config
from catalog.records import Node
from catalog.store import Catalog
from orchestration.common import console

# The synthetic corpus is small on purpose (fast on 2 CPUs): lower the size floor so the
# other filters decide; everything else is the default profile.
DEMO_CURATION = ["name=sample-curated", "select.min_short_side=128", "partition_size=16"]


def run_demo(output: Path, catalog_url: str | None = None, tracking_uri: str | None = None) -> None:
    from curation.config import CurationConfig
    from curation.pipeline import run_curation
    from curation.sample_data import generate
    from curation.sample_data.register import register_sample_corpus

    start = time.monotonic()
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    catalog_url = catalog_url or f"sqlite:///{output / 'catalog.db'}"
    tracking_uri = tracking_uri or f"sqlite:///{output / 'mlflow.db'}"
    cat = Catalog(catalog_url)

    console.rule("1. sample corpus")
    corpus = output / "corpus"
    labels = generate(corpus, seed=0)
    console.print(f"{len(labels)} labelled items in {corpus}")
    raw = register_sample_corpus(corpus, cat, name="sample-corpus")
    console.print(f"registered {raw.ref}: {raw.num_samples} items from the generator's labels")

    console.rule("2. curation")
    cfg = load_config(CurationConfig, None, DEMO_CURATION)
    console.print(f"settings: {' '.join('--set ' + s for s in DEMO_CURATION)}")
    result = run_curation(
        str(corpus),
        output / "curated",
        cfg,
        catalog=cat,
        tracking_uri=tracking_uri,
        console=console,
    )
    version = result.version
    if version.run_id is not None:
        cat.add_edge(Node("version", raw.id), Node("run", version.run_id), "input")

    console.rule("3. training")
    from orchestration.train_cmd import recipe_path
    from training.recipe import Recipe
    from training.runner import run_training

    recipe = load_config(
        Recipe, recipe_path("omni_video_tiny"), [f"data.curated.uri={version.ref}"]
    )
    trained = run_training(
        recipe,
        output / "train",
        workers=2,
        catalog=cat,
        tracking_uri=tracking_uri,
        resume=True,
        console=console,
    )
    for s in trained["stages"]:
        loss = s.get("final_loss")
        console.print(f"  stage {s['stage']}: " + (f"final loss {loss:.4f}" if loss else "done"))
    console.rule("done")
    console.print(f"finished in {time.monotonic() - start:.1f} s. Look around with:")
    for cmd in (
        f"omniforge catalog ls --catalog {catalog_url}",
        f"omniforge catalog show {version.dataset}@{version.version} --catalog {catalog_url}",
        f"omniforge catalog lineage {version.dataset}@{version.version} --catalog {catalog_url}",
        "omniforge train plan omni_video_tiny",
        f"open {result.report}",
        f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1  # then http://127.0.0.1:5000",
    ):
        console.print(f"  {cmd}")
