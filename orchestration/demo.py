"""``omniforge demo`` / ``make demo``: the main job on embedded defaults, as one stage plan.

sample corpus -> ground-truth registration (``sample-corpus``) -> ``OUTPUT/plan.yaml``:
curation on a local Ray (``sample-curated``) -> the omni_video tiny recipe, 3 stages on Ray
Train (2 workers) with DeepSpeed -> MLflow runs (a SQLite store in the output folder).
Rerunning resumes (the plan skips finished steps).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from catalog.db import sqlite_file
from catalog.records import Node
from catalog.store import Catalog
from orchestration.common import catalog_url as as_url
from orchestration.common import command_prefix, console, shown_path

# The synthetic corpus is small on purpose (fast on 2 CPUs): lower the size floor so the
# other filters decide; everything else is the default profile.
DEMO_CURATION = ["name=sample-curated", "select.min_short_side=128"]


def demo_plan(output: Path, catalog_url: str, tracking_uri: str) -> dict:
    return {
        "name": "demo",
        "output": str(output),
        "catalog": catalog_url,
        "tracking_uri": tracking_uri,
        "curation": {"input": str(output / "corpus"), "set": DEMO_CURATION},
        "training": {
            "recipe": "omni_video_tiny",
            "workers": 2,
            "set": ["data.curated.uri=catalog://sample-curated@latest"],
        },
    }


def run_demo(output: Path, catalog_url: str | None = None, tracking_uri: str | None = None) -> None:
    from curation.sample_data import generate
    from curation.sample_data.register import register_sample_corpus
    from orchestration.plan import load_plan, run_plan
    from orchestration.plan_cmd import print_status

    start = time.monotonic()
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    catalog_url = as_url(catalog_url) or f"sqlite:///{output / 'catalog.db'}"
    tracking_uri = tracking_uri or f"sqlite:///{output / 'mlflow.db'}"
    cat = Catalog(catalog_url)

    console.rule("sample corpus")
    corpus = output / "corpus"
    labels = generate(corpus, seed=0)
    console.print(f"{len(labels)} labelled items in {corpus}")
    raw = register_sample_corpus(corpus, cat, name="sample-corpus", root=output / "registered")
    console.print(f"registered {raw.ref}: {raw.num_samples} items from the generator's labels")

    plan_file = output / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(demo_plan(output, catalog_url, tracking_uri)))
    console.print(f"plan: {plan_file} (curate -> 3 training stages)")
    plan, plan_output = load_plan(plan_file)
    state = run_plan(plan, plan_output, cat, console=console)
    for run_id in state["steps"]["curate"].get("catalog_runs", []):
        cat.add_edge(Node("version", raw.id), Node("run", run_id), "input")

    console.rule("done")
    print_status(plan_file, [], catalog_url)
    version = state["steps"]["curate"]["version"].removeprefix("catalog://")
    console.print(f"finished in {time.monotonic() - start:.1f} s. Look around with:")
    for cmd in look_around(output, plan_file, catalog_url, tracking_uri, version):
        console.print(f"  {cmd}", markup=False)


def look_around(
    output: Path, plan_file: Path, catalog_url: str, tracking_uri: str, version: str
) -> list[str]:
    """The commands printed after the demo, runnable as printed: this installation's
    ``omniforge`` (``.venv/bin/omniforge`` when the venv is not activated) and the demo's own
    catalog on every command that reads one (the demo keeps its catalog inside its output
    folder so that ``make clean`` removes it with the shards it describes)."""
    omniforge, mlflow = command_prefix("omniforge"), command_prefix("mlflow")
    cat = f"--catalog {_catalog_arg(catalog_url)}"
    name = version.split("@")[0]
    return [
        f"{omniforge} plan status {shown_path(plan_file)}",
        f"{omniforge} catalog ls {cat}",
        f"{omniforge} catalog show {name} {cat}",
        f"{omniforge} catalog show {version} {cat}",
        f"{omniforge} catalog lineage {version} {cat}",
        f"{omniforge} train plan omni_video_tiny {cat}",
        f"{omniforge} train run omni_video_tiny --stages 1 {cat} "
        f"--output {shown_path(output / 'train-again')}",
        f"open {shown_path(output / 'curation' / 'report.html')}",
        f"{mlflow} ui --backend-store-uri {tracking_uri} --host 127.0.0.1"
        "  # then http://127.0.0.1:5000",
    ]


def _catalog_arg(url: str) -> str:
    """The demo's SQLite catalog as a path (``--catalog`` takes one), shorter to copy."""
    path = sqlite_file(url)
    return shown_path(path) if path is not None else url
