"""catalog/runs.py on a real SQLite catalog: runs (status, ids, params), checkpoints, lineage."""

import json

import pytest

from catalog.runs import ENV_JOB_ID, current_job_id
from catalog.store import Node, NotFound
from core.secrets import MASK

# --- runs ---------------------------------------------------------------------------------


def test_runs_record_status_and_ids(cat):
    rid = cat.start_run("training_stage", "stage 1", params={"lr": 1e-4})
    cat.update_run(rid, ray_job_id="raysubmit_1", mlflow_run_id="m1", params={"steps": 10})
    info = cat.update_run(rid, status="succeeded")
    assert info.ended_at is not None and info.status == "succeeded"
    assert info.params == {"lr": 1e-4, "steps": 10}
    assert (info.ray_job_id, info.mlflow_run_id) == ("raysubmit_1", "m1")
    assert [r.id for r in cat.list_runs(kind="training_stage")] == [rid]
    with pytest.raises(ValueError, match="allowed: pending, running"):
        cat.update_run(rid, status="done")
    with pytest.raises(ValueError, match="run kind"):
        cat.start_run("inference")


def test_a_run_ends_only_on_a_final_status(cat):
    rid = cat.start_run("curation", "c", status="pending")
    assert cat.get_run(rid).status == "pending" and cat.get_run(rid).ended_at is None
    running = cat.update_run(rid, status="running", message="block 3 of 9")
    assert running.ended_at is None and running.message == "block 3 of 9"
    assert running.started_at is not None
    for final in ("succeeded", "failed", "cancelled"):
        other = cat.start_run("curation", final)
        info = cat.update_run(other, status=final, message="why")
        assert info.status == final and info.ended_at is not None and info.message == "why"
        assert info.ended_at >= info.started_at
    with pytest.raises(ValueError, match="run status 'done'"):
        cat.start_run("curation", status="done")


def test_unknown_fields_and_runs_are_refused(cat):
    rid = cat.start_run("plan", "p")
    with pytest.raises(ValueError, match=r"cannot update run fields \['kind', 'name'\]"):
        cat.update_run(rid, kind="curation", name="renamed", status="failed")
    assert cat.get_run(rid).status == "running"  # nothing of a refused update was applied
    for call in (
        lambda: cat.get_run(rid + 1),
        lambda: cat.update_run(rid + 1, status="failed"),
        lambda: cat.add_checkpoint(rid + 1, "/ckpt/x", step=1),
    ):
        with pytest.raises(NotFound, match=f"no run with id {rid + 1}"):
            call()


def test_list_runs_newest_first_by_kind_job_and_limit(cat):
    ids = [
        cat.start_run(kind, f"r{i}", ray_job_id=job)
        for i, (kind, job) in enumerate(
            [("curation", "j1"), ("training", "j1"), ("curation", "j2"), ("curation", None)]
        )
    ]
    assert [r.id for r in cat.list_runs()] == ids[::-1]
    assert [r.id for r in cat.list_runs(limit=2)] == ids[:1:-1]
    assert [r.id for r in cat.list_runs(kind="curation")] == [ids[3], ids[2], ids[0]]
    assert [r.id for r in cat.list_runs(job_id="j1")] == [ids[1], ids[0]]
    assert [r.id for r in cat.list_runs(kind="curation", job_id="j1")] == [ids[0]]
    assert cat.list_runs(kind="plan") == []


def test_catalog_run_params_are_stored_masked(cat):
    run = cat.start_run("curation", "x", params={"input": "s3://k:pw@bucket/raw", "api_key": "z"})
    assert cat.get_run(run).params == {"input": "s3://k:***@bucket/raw", "api_key": MASK}
    cat.update_run(run, params={"db_password": "pw"})
    assert cat.get_run(run).params["db_password"] == MASK


def test_catalog_runs_carry_the_ray_job_id(cat, monkeypatch):
    monkeypatch.setenv("OMNIFORGE_JOB_ID", "omniforge-curate-1")
    run = cat.start_run("curation", "in a job")
    monkeypatch.delenv("OMNIFORGE_JOB_ID")
    other = cat.start_run("curation", "not in a job")
    assert cat.get_run(run).ray_job_id == "omniforge-curate-1"
    assert cat.get_run(other).ray_job_id is None
    assert [r.id for r in cat.list_runs(job_id="omniforge-curate-1")] == [run]


def test_current_job_id_from_our_variable_then_rays_job_config(monkeypatch):
    monkeypatch.delenv(ENV_JOB_ID, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert current_job_id() is None
    config = {"metadata": {"job_submission_id": "raysubmit_abc"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    assert current_job_id() == "raysubmit_abc"  # a job submitted by other means than ours
    monkeypatch.setenv(ENV_JOB_ID, "omniforge-train-2")
    assert current_job_id() == "omniforge-train-2"  # ours wins
    monkeypatch.delenv(ENV_JOB_ID)
    for unusable in ("{not json", json.dumps({"metadata": None}), "{}"):
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", unusable)
        assert current_job_id() is None, unusable


# --- checkpoints and lineage --------------------------------------------------------------


def test_lineage_links_versions_runs_and_checkpoints(cat, committed_version):
    raw, _ = committed_version("raw", seed=1)
    curate = cat.start_run("curation", "curate raw", config_hash="c1", mlflow_run_id="abc")
    cat.add_edge(Node("version", raw.id), Node("run", curate), "input")
    curated, _ = committed_version("curated", seed=2, parent_id=raw.id)
    cat.add_edge(Node("run", curate), Node("version", curated.id), "output")
    stage1 = cat.start_run("training_stage", "omni_video stage 1")
    cat.add_edge(Node("version", curated.id), Node("run", stage1), "input")
    ckpt = cat.add_checkpoint(stage1, "/ckpt/stage1/step_10", step=10)
    cat.add_edge(Node("version", curated.id), Node("run", stage1), "input")  # idempotent

    up, down = cat.lineage(Node("version", curated.id))
    assert [(e.parent.type, e.child.type, e.relation) for e in up] == [
        ("run", "version", "output"),
        ("version", "run", "input"),
    ]
    assert up[1].parent_label.startswith("catalog://raw@1")
    assert [(e.parent.type, e.child.type, e.relation) for e in down] == [
        ("version", "run", "input"),
        ("run", "checkpoint", "produced"),
    ]
    assert down[1].child == Node("checkpoint", ckpt)
    assert "step 10" in down[1].child_label
    assert cat.version_by_id(curated.parent_id).ref == "catalog://raw@1"
    with pytest.raises(NotFound):
        cat.add_edge(Node("version", 999), Node("run", stage1))
    with pytest.raises(ValueError, match="node type"):
        Node("dataset", 1)


def test_lineage_walks_every_hop_nearest_first_and_ends_on_a_cycle(cat, tmp_path):
    data = cat.begin_version("data", root_uri=str(tmp_path / "d"))
    train = cat.start_run("training", "t")
    stage = cat.start_run("training_stage", "s1")
    cat.add_edge(Node("version", data.id), Node("run", train), "input")
    cat.add_edge(Node("run", train), Node("run", stage), "stage")
    ckpt = cat.add_checkpoint(stage, "/ckpt/s1/step_5", step=5)
    cat.add_edge(Node("run", stage), Node("run", train), "reports")  # a cycle: train <-> stage
    with pytest.raises(NotFound, match=f"lineage node checkpoint {ckpt + 1} does not exist"):
        cat.add_edge(Node("run", stage), Node("checkpoint", ckpt + 1))

    up, down = cat.lineage(Node("checkpoint", ckpt))
    assert down == []
    assert [(e.parent, e.child, e.relation) for e in up] == [
        (Node("run", stage), Node("checkpoint", ckpt), "produced"),
        (Node("run", train), Node("run", stage), "stage"),  # two hops
        (Node("version", data.id), Node("run", train), "input"),  # three hops
        (Node("run", stage), Node("run", train), "reports"),  # listed once, not walked again
    ]
    labels = {e.parent: e.parent_label for e in up}
    assert labels[Node("version", data.id)] == "catalog://data@1 [pending]"
    assert labels[Node("run", train)] == f"run {train} training 't' [running]"
    assert up[0].child_label == f"checkpoint {ckpt} step 5 /ckpt/s1/step_5"

    _, from_data = cat.lineage(Node("version", data.id))
    assert [e.relation for e in from_data] == ["input", "stage", "produced", "reports"]
