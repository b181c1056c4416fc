"""Stage plans: a plan killed between stages resumes at the right step, with lineage."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import pytest
from helpers import OMNIFORGE, cli, small_corpus

from catalog.records import Node
from catalog.store import Catalog
from core.storage import StorageError
from core.tracking import run_link
from orchestration.plan import load_plan, read_state, run_plan, steps

PLAN = """
name: small-programme
output: out
catalog: sqlite:///out/catalog.db
tracking_uri: sqlite:///out/mlflow.db
curation:
  input: corpus
  set: [name=plan-curated, select.min_short_side=128]
training:
  recipe: omni_video_tiny
  stages: 1-2
  workers: 0
  set:
    - data.curated.uri=catalog://plan-curated@latest
    - stages.0.steps=4
    - stages.0.checkpoint_every=2
    - stages.1.steps=4
    - stages.1.checkpoint_every=2
"""


def write_plan(tmp_path: Path) -> Path:
    small_corpus(tmp_path / "corpus")
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    return path


def test_plan_paths_steps_and_refusals(tmp_path):
    plan, output = load_plan(write_plan(tmp_path))
    assert output.uri == str(tmp_path / "out")
    assert plan.curation.input == str(tmp_path / "corpus")
    assert plan.catalog == f"sqlite:///{tmp_path / 'out' / 'catalog.db'}"
    assert [(s.id, s.label) for s in steps(plan)] == [
        ("curate", "curation"),
        ("train-1", "stage 1 (align)"),
        ("train-2", "stage 2 (generate)"),
    ]
    assert run_link("sqlite:///x.db", "abc") == "abc"
    before = cli("plan", "status", str(tmp_path / "plan.yaml"))  # nothing has run yet
    assert before.returncode == 0, before.stderr
    assert before.stdout.count(" pending ") == 3 and not (tmp_path / "out").exists()
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(PLAN.replace("sqlite:///out/catalog.db", "postgresql://me:pw@db/c"))
    with pytest.raises(ValueError, match="catalog holds a password"):
        load_plan(leaky)
    remote = tmp_path / "remote.yaml"
    remote.write_text(PLAN.replace("output: out", "output: s3://bucket/programme"))
    assert load_plan(remote)[1].uri == "s3://bucket/programme"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(PLAN.replace("output: out", "output: hdfs://bucket/programme"))
    with pytest.raises(StorageError, match=r"unknown.yaml: output hdfs://bucket/programme: the"):
        load_plan(unknown)
    bad = tmp_path / "bad.yaml"
    bad.write_text(PLAN.replace("stages: 1-2", "stages: 1-9"))
    with pytest.raises(ValueError, match="the recipe has stages 1..3"):
        steps(load_plan(bad)[0])


@pytest.mark.slow
def test_plan_killed_between_stages_resumes_at_the_next_step(tmp_path):
    plan_file = write_plan(tmp_path)
    out = tmp_path / "out"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [OMNIFORGE, "plan", "run", str(plan_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the plan's driver and the local Ray it started
        )
    deadline = time.monotonic() + 540
    try:
        while time.monotonic() < deadline and first.poll() is None:
            state = read_state(out) if (out / "plan.json").exists() else {"steps": {}}
            if state["steps"].get("train-1", {}).get("status") == "done":
                break
            time.sleep(0.5)
        else:
            pytest.fail("stage 1 did not finish:\n" + (tmp_path / "first.log").read_text()[-3000:])
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    stage1_done = (out / "training" / "stages" / "1-align" / "done.json").stat().st_mtime_ns

    status = cli("plan", "status", str(plan_file))
    assert status.returncode == 0, status.stderr
    lines = {line.split("│")[1].strip(): line for line in status.stdout.splitlines() if "│" in line}
    assert " done " in lines["curate"] and " done " in lines["train-1"]
    assert " interrupted " in lines["train-2"] or " pending " in lines["train-2"]

    rerun = cli("plan", "run", str(plan_file))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "curate: curation finished earlier, skipped" in rerun.stdout
    assert "train-1: stage 1 (align) finished earlier, skipped" in rerun.stdout
    assert "stage 2 (generate): 4 steps" in rerun.stdout
    # stage 1 was not trained again; stage 2 ran to the end
    assert (out / "training" / "stages" / "1-align" / "done.json").stat().st_mtime_ns == stage1_done
    assert (out / "training" / "stages" / "2-generate" / "final.safetensors").exists()

    state = json.loads((out / "plan.json").read_text())
    assert {k: v["status"] for k, v in state["steps"].items()} == {
        "curate": "done",
        "train-1": "done",
        "train-2": "done",
    }
    cat = Catalog(f"sqlite:///{out / 'catalog.db'}")
    assert len(cat.list_runs(kind="curation")) == 1  # the curation ran once
    stage_runs = {}  # the newest run per stage; one killed before it was recorded is failed
    for r in cat.list_runs(kind="training_stage"):
        if r.name in stage_runs:
            assert (r.status, r.message) == ("failed", "interrupted before it was recorded; rerun")
        stage_runs.setdefault(r.name, r)
    assert sorted(stage_runs) == [
        "omni_video_tiny stage 1 (align)",
        "omni_video_tiny stage 2 (generate)",
    ]
    assert all(r.status == "succeeded" for r in stage_runs.values())
    (plan_run,) = cat.list_runs(kind="plan")
    assert plan_run.status == "succeeded"

    # lineage: version -> stage 1 -> checkpoint -> stage 2; the plan run links every step
    version = cat.get_version("plan-curated", 1)
    s1 = stage_runs["omni_video_tiny stage 1 (align)"].id
    s2 = stage_runs["omni_video_tiny stage 2 (generate)"].id
    _, down = cat.lineage(Node("version", version.id))
    edges = {(e.parent.type, e.relation, e.child.type, e.child.id) for e in down}
    assert ("version", "input", "run", s1) in edges and ("version", "input", "run", s2) in edges
    assert ("checkpoint", "init", "run", s2) in edges
    _, steps_down = cat.lineage(Node("run", plan_run.id))
    step_children = {e.child.id for e in steps_down if e.relation == "step"}
    assert {version.run_id, s1, s2} <= step_children
    assert state["steps"]["train-2"]["version"] == "catalog://plan-curated@1"


@pytest.mark.slow
def test_a_plan_in_a_bucket_keeps_its_state_version_and_weights_there(
    s3_bucket, tmp_path, ray_session, monkeypatch
):
    """``output: s3://...``: plan.json, the curated version and the training stage all live in
    the bucket; ``plan status`` reads them from there; nothing lands in a local "s3:" folder."""
    monkeypatch.chdir(tmp_path)
    small_corpus(tmp_path / "corpus")
    text = PLAN.replace("output: out", f"output: {s3_bucket}/programme")
    text = text.replace("sqlite:///out/catalog.db", f"sqlite:///{tmp_path / 'catalog.db'}")
    text = text.replace("tracking_uri: sqlite:///out/mlflow.db\n", "").replace("1-2", "1-1")
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(text)
    plan, output = load_plan(plan_file)
    cat = Catalog(plan.catalog)
    state = run_plan(plan, output, cat)
    assert {k: v["status"] for k, v in state["steps"].items()} == {
        "curate": "done",
        "train-1": "done",
    }
    assert read_state(output)["steps"] == state["steps"]  # plan.json in the bucket
    version = cat.get_version("plan-curated", 1)
    assert version.root_uri == f"{s3_bucket}/programme/curation"
    fs, root = fsspec.core.url_to_fs(f"{s3_bucket}/programme")
    assert fs.exists(f"{root}/training/stages/1-align/final.safetensors")
    run = cat.get_run(state["steps"]["train-1"]["catalog_runs"][0])
    assert run.params["output"] == f"{s3_bucket}/programme/training/stages/1-align"
    status = cli("plan", "status", str(plan_file))
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(" done ") == 2, status.stdout
    assert not list(tmp_path.glob("s3*"))
