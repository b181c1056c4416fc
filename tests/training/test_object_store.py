"""Training in object storage: a catalog version whose shards live on the local S3 server
(``omniforge s3 up``), streamed through the real s3fs client, gives the same steps as the same
data on disk; checkpoints (Ray Train's storage, through pyarrow's S3 client), run state and
final weights go to the bucket, and a stopped stage resumes at the exact sample."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest
import safetensors.torch
import torch
from helpers import stage_trace
from safetensors.torch import load_file

from catalog.store import Catalog
from core.config import load_config
from core.storage import StorageError
from curation.sample_data import generate
from curation.sample_data.register import register_sample_corpus
from training.recipe import Recipe
from training.runner import run_training

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
SHORT = [
    "stages.0.steps=12",
    "stages.0.checkpoint_every=4",
    "stages.1.steps=2",
    "stages.1.checkpoint_every=2",
]


@pytest.mark.slow
def test_a_stage_trains_from_s3_into_s3_and_resumes_exactly(
    s3_bucket, tmp_path, ray_session, monkeypatch
):
    """Data, checkpoints, run state and final weights all in the bucket: a stage stopped at
    step 6 resumes from Ray Train's checkpoint in S3 to the steps and weights of a run on
    disk, and the next stage starts from the weights in the bucket."""
    monkeypatch.chdir(tmp_path)  # nothing may land in a local folder named "s3:"
    generate(tmp_path / "corpus", seed=0)
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    local = register_sample_corpus(tmp_path / "corpus", cat, "on-disk", root=tmp_path / "disk")
    remote = register_sample_corpus(tmp_path / "corpus", cat, "in-s3", root=f"{s3_bucket}/data")
    shards = cat.shards(remote.id)
    assert shards and all(s.uri.startswith(f"{s3_bucket}/data/shards/") for s in shards)

    def recipe(name: str) -> Recipe:
        uri = [f"data.curated.uri=catalog://{name}@1"]
        return load_config(Recipe, RECIPES / "omni_video_tiny.yaml", [*uri, *SHORT])

    a, b = f"{s3_bucket}/run", tmp_path / "b"
    stopped = run_training(recipe("in-s3"), a, stages=[0], workers=2, catalog=cat,
                           stop_after=6, trace=True)  # fmt: skip
    assert stopped["stages"][0]["stopped_at"] == 6
    fs, _ = fsspec.core.url_to_fs(a)
    kept = fs.glob(f"{a[5:]}/ray/*/checkpoint_*/manifest-rank1.json")
    assert len(kept) == 2  # steps 4 and 6, both ranks' shares, in the bucket
    with pytest.raises(ValueError, match="holds a previous training run"):
        run_training(recipe("in-s3"), a, stages=[0], workers=2, catalog=cat)
    resumed = run_training(recipe("in-s3"), a, stages=[0], workers=2, catalog=cat,
                           resume=True, trace=True)  # fmt: skip
    run_training(recipe("on-disk"), b, stages=[0], workers=2, catalog=cat, trace=True)

    for rank in (0, 1):
        x_trace, y_trace = stage_trace(a, "align", rank), stage_trace(b, "align", rank)
        assert [t["step"] for t in x_trace] == list(range(1, 13)) == [t["step"] for t in y_trace]
        for x, y in zip(x_trace, y_trace, strict=True):
            assert [x[k] for k in ("task", "bucket", "keys")] == [
                y[k] for k in ("task", "bucket", "keys")
            ]
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    assert local.counts == remote.counts

    weights = resumed["stages"][0]["weights"]
    assert weights == f"{a}/stages/1-align/final.safetensors"
    x_w = safetensors.torch.load(fs.cat_file(weights[5:]))
    y_w = load_file(b / "stages" / "1-align" / "final.safetensors")
    assert x_w.keys() == y_w.keys()
    for key in y_w:
        torch.testing.assert_close(x_w[key], y_w[key], rtol=1e-5, atol=1e-6)
    stage_run = cat.get_run(
        json.loads(fs.cat_file(f"{a[5:]}/run.json"))["stages"]["0"]["catalog_run"]
    )
    assert stage_run.params["output"] == f"{a}/stages/1-align"

    # the next stage's workers start from the weights in the bucket
    nxt = run_training(recipe("in-s3"), a, stages=[1], workers=1, catalog=cat, resume=True)
    assert nxt["stages"][0]["weights"] == f"{a}/stages/2-generate/final.safetensors"
    assert fs.exists(f"{a[5:]}/stages/2-generate/done.json")
    assert not (tmp_path / "s3:").exists()


def test_an_unknown_output_scheme_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_config(Recipe, RECIPES / "omni_video_tiny.yaml", [])
    with pytest.raises(StorageError, match=r"--output hdfs://b/run: the scheme hdfs://"):
        run_training(recipe, "hdfs://b/run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_workers_spread_over_nodes_survive_the_loss_of_one(s3_bucket, tmp_path, ray_session):
    """A head with no CPUs for work and three 1-CPU worker nodes on this machine (``omniforge
    cluster up --workers 3``) sharing only the bucket. A 2-worker stage placed SPREAD holds
    after step 6 (checkpoints every 4 steps); rank 1's node is lost (its raylet and every
    process under it killed); Ray Train restarts the workers on the nodes left, they resume
    from step 4's checkpoint in S3, and the stage ends with the weights of an uninterrupted
    run."""
    import contextlib
    import subprocess
    import time
    import urllib.request

    import psutil
    from helpers import OMNIFORGE, cli, free_port, kill_tree

    from orchestration.cluster_cmd import auth_headers
    from training.trainer import HOLD_ENV

    generate(tmp_path / "corpus", seed=0)
    db = f"sqlite:///{tmp_path / 'catalog.db'}"
    register_sample_corpus(tmp_path / "corpus", Catalog(db), "in-s3", root=f"{s3_bucket}/data")
    settings = ["data.curated.uri=catalog://in-s3@1", *SHORT]
    reference = tmp_path / "reference"  # the same stage on one node, never interrupted
    run_training(load_config(Recipe, RECIPES / "omni_video_tiny.yaml", settings), reference,
                 stages=[0], workers=2, catalog=Catalog(db))  # fmt: skip

    port, dashboard, hold = free_port(), free_port(), tmp_path / "hold"
    up = cli("cluster", "up", "--port", str(port), "--dashboard-port", str(dashboard),
             "--num-cpus", "0", "--workers", "3", "--worker-cpus", "1")  # fmt: skip
    driver = None
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        out = f"{s3_bucket}/spread"
        argv = [OMNIFORGE, "train", "run", "omni_video_tiny", "--stages", "1", "--workers", "2",
                "--placement", "spread", "--output", out, "--address", f"127.0.0.1:{port}",
                "--catalog", db, *[x for s in settings for x in ("--set", s)]]  # fmt: skip
        env = {**os.environ, HOLD_ENV: f"6:{hold}", "COLUMNS": "250"}
        driver = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)  # fmt: skip
        held = [hold / f"held-rank{r}.json" for r in (0, 1)]
        while not all(p.exists() for p in held):  # both ranks after step 6's checkpoint
            assert driver.poll() is None, driver.stdout.read()
            time.sleep(0.2)
        records = [json.loads(p.read_text()) for p in held]
        assert len(records[0]["registered"]) == 1, records  # step 4's, in S3
        assert records[0]["node_id"] != records[1]["node_id"]  # SPREAD: one rank a node
        raylet = next(
            p for p in psutil.Process(records[1]["pid"]).parents() if p.name() == "raylet"
        )
        # the node is lost with everything on it: its raylet and the processes under it (a
        # raylet killed alone can leave its workers running on, and rank 1 trained to the end),
        # and rank 1's own process tree in case it does not hang under that raylet (two runs
        # that ended with no restart reported had lost the progress display with that node:
        # its actor now stays on the driver's node, training/progress.py)
        kill_tree(raylet.pid)
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone with the raylet: fine
            kill_tree(records[1]["pid"])
        nodes = f"http://127.0.0.1:{dashboard}/api/v0/nodes?detail=true&limit=100"
        while True:  # the cluster has marked rank 1's node dead
            request = urllib.request.Request(nodes, headers=auth_headers())
            with urllib.request.urlopen(request, timeout=60) as response:
                listed = json.loads(response.read())["data"]["result"]["result"]
            state = {n["node_id"]: n["state"] for n in listed}
            if state.get(records[1]["node_id"]) == "DEAD":
                break
            assert driver.poll() is None, driver.stdout.read()
            time.sleep(0.5)
        (hold / "release").touch()
        output, _ = driver.communicate(timeout=900)
        (tmp_path / "driver.log").write_text(output)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        down = cli("cluster", "down")
    assert down.returncode == 0, down.stderr
    assert driver.returncode == 0, output
    assert "workers restarted; resumed from checkpoint" in output, output
    assert "(step 4), steps 5-6 run again" in output, output  # the last checkpoint: step 4
    fs, _ = fsspec.core.url_to_fs(out)
    resumed = safetensors.torch.load(fs.cat_file(f"{out[5:]}/stages/1-align/final.safetensors"))
    clean = load_file(reference / "stages" / "1-align" / "final.safetensors")
    assert resumed.keys() == clean.keys()
    for key in clean:
        torch.testing.assert_close(resumed[key], clean[key], rtol=1e-5, atol=1e-6)
