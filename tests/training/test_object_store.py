"""Training reads its shards from object storage: a catalog version whose shards live on the
local S3 server (``omniforge s3 up``), streamed through the real s3fs client, gives the same
steps as the same data on disk, and a stopped stage resumes at the exact sample."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import stage_trace

from catalog.store import Catalog
from core.config import load_config
from core.storage import StorageError
from curation.sample_data import generate
from curation.sample_data.register import register_sample_corpus
from training.recipe import Recipe
from training.runner import run_training

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
SHORT = ["stages.0.steps=12", "stages.0.checkpoint_every=4"]


@pytest.mark.slow
def test_a_stage_trains_from_s3_shards_and_resumes_exactly(s3_bucket, tmp_path, ray_session):
    generate(tmp_path / "corpus", seed=0)
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    local = register_sample_corpus(tmp_path / "corpus", cat, "on-disk", root=tmp_path / "disk")
    remote = register_sample_corpus(tmp_path / "corpus", cat, "in-s3", root=f"{s3_bucket}/data")
    shards = cat.shards(remote.id)
    assert shards and all(s.uri.startswith(f"{s3_bucket}/data/shards/") for s in shards)

    def recipe(name: str) -> Recipe:
        uri = [f"data.curated.uri=catalog://{name}@1"]
        return load_config(Recipe, RECIPES / "omni_video_tiny.yaml", [*uri, *SHORT])

    a, b = tmp_path / "a", tmp_path / "b"
    stopped = run_training(recipe("in-s3"), a, stages=[0], workers=2, catalog=cat,
                           stop_after=6, trace=True)  # fmt: skip
    assert stopped["stages"][0]["stopped_at"] == 6
    run_training(recipe("in-s3"), a, stages=[0], workers=2, catalog=cat, resume=True, trace=True)
    run_training(recipe("on-disk"), b, stages=[0], workers=2, catalog=cat, trace=True)

    for rank in (0, 1):
        resumed, clean = stage_trace(a, "align", rank), stage_trace(b, "align", rank)
        assert [t["step"] for t in resumed] == list(range(1, 13)) == [t["step"] for t in clean]
        for x, y in zip(resumed, clean, strict=True):
            assert [x[k] for k in ("task", "bucket", "keys")] == [
                y[k] for k in ("task", "bucket", "keys")
            ]
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    assert local.counts == remote.counts


def test_a_training_output_in_a_bucket_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_config(Recipe, RECIPES / "omni_video_tiny.yaml", [])
    with pytest.raises(StorageError, match=r"--output s3://b/run: a training run writes"):
        run_training(recipe, "s3://b/run")
    assert list(tmp_path.iterdir()) == []
