"""The curation MLflow run (curation.tracking) against a real local SQLite store."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from helpers import sample_rows

from catalog.records import ShardRecord
from catalog.schema import rows_to_table
from core.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from curation.config import SelectConfig
from curation.summary import summarize
from curation.tracking import log_to_mlflow, mlflow_metrics

SHARDS = [
    ShardRecord("shards/a/p0-000000.tar", "a512_r1x1_f1", 4, 1000, "x"),
    ShardRecord("shards/a/p0-000001.tar", "a512_r1x1_f1", 3, 700, "y"),
    ShardRecord("shards/b/p0-000000.tar", "a256_r16x9_f96", 5, 5000, "z"),
]


def _summary(elapsed_s: float = 42.5) -> dict:
    rows = sample_rows(60)
    rows[4]["reasons"] = ["low_aesthetic: 3.1 < 5", "too_small: 200 < 256"]
    rows[8]["reasons"] = ["too_small: 100 < 256", "watermark: 0.93 > 0.5"]
    summary = summarize(
        rows_to_table(rows),
        stages_run=["probe", "split", "motion", "ocr", "select", "shard"],
        stages_skipped={"aesthetic": "weights not found in ~/.omniforge/models"},
        elapsed_s=elapsed_s,
        shards=SHARDS,
        num_inputs=60,
        run={
            "inputs_this_run": 50,
            "inputs_skipped": 10,
            "blocks": 4,
            "retries": 1,
            "startup_s": 3.5,
            "failed_inputs": 0,
            "stages": {"probe": [60, 60, 2.0], "ocr": [40, 40, 7.5]},
        },
    )
    summary["catalog"] = "catalog://sample-corpus@2"
    return summary


class Version:
    """The committed version ``_finish`` passes (the attributes of catalog.records.VersionInfo
    that are logged)."""

    def __init__(self, root: Path):
        self.ref = "catalog://sample-corpus@2"
        self.index_uri = str(root / "index")
        self.root_uri = str(root)
        self.config_hash = "ab" * 32
        self.num_samples, self.num_bytes, self.num_shards = 12, 6700, 3
        self.counts = {"accepted": 12, "rejected": 30, "error": 18}


def test_metric_names_group_by_slash():
    summary = _summary()
    summary["rejected_by_reason"]["a/../b"] = 2
    m = mlflow_metrics(summary)
    assert all("." not in k and "/" in k for k in m), m.keys()  # every metric in a group
    assert m["inputs/total"] == 60 and m["inputs/this_run"] == 50 and m["inputs/skipped"] == 10
    assert m["samples/total"] == summary["samples"]
    assert m["samples/accepted"] + m["samples/rejected"] + m["samples/errors"] == 60
    for reason, count in summary["rejected_by_reason"].items():
        name = "rejected/" + re.sub(r"[^\w\-]", "_", reason)
        assert m[name] == count, name
    assert m["rejected/a____b"] == 2
    assert m["errors/decode_error"] == summary["errors_by_reason"]["decode_error"]
    assert m["stage/ocr/rows_in"] == 40 and m["stage/ocr/seconds"] == 7.5
    assert m["stage/probe/rows_out"] == 60
    assert m["output/shards"] == 3 and m["output/bytes"] == 6700 and m["output/samples"] == 12
    assert m["bucket/a512_r1x1_f1/samples"] == 7 and m["bucket/a256_r16x9_f96/shards"] == 1
    assert m["kind/video/accepted"] == summary["by_kind"]["video"]["accepted"]
    assert m["time/elapsed_s"] == 42.5 and m["time/startup_s"] == 3.5
    assert m["run/blocks"] == 4 and m["run/retries"] == 1 and m["run/failed_inputs"] == 0


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory
    return cwd


def test_log_to_mlflow_against_a_local_sqlite_store(tmp_path, workdir):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    out.mkdir()
    report = out / "report.html"
    report.write_text("<html>report</html>")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "plan.txt").write_text("probe -> select\n")
    params = {
        "select": SelectConfig().model_dump(),
        "recaption": {"api_key_env": "OPENAI_API_KEY", "endpoint": "http://u:hunter2@vllm:8000"},
        "s3": {"secret_access_key": "hunter2", "token": "hunter2"},
        "note": "n" * 900,
    }
    work_started = time.time()
    summary = _summary(elapsed_s=1.25)
    run_id = log_to_mlflow(
        uri,
        "curation-tests",
        "curate sample-corpus@2",
        params,
        summary,
        report,
        extra_artifacts=[extra],
        tags={
            "omniforge.catalog": "catalog://sample-corpus@2",
            "omniforge.config_hash": None,
            "hf_token": "hunter2",
        },
        output=Version(out),
    )
    logged_by = time.time()
    assert list(workdir.iterdir()) == []

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "curate sample-corpus@2"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "curation-tests"
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    # the run spans the work: it started elapsed_s before it was written, not when written
    assert run.info.end_time - run.info.start_time >= summary["elapsed_s"] * 1000
    assert run.info.start_time >= (work_started - summary["elapsed_s"]) * 1000 - 1  # ms cut
    assert run.info.end_time <= logged_by * 1000 + 1

    p = run.data.params
    assert p["select.min_aesthetic"] == str(SelectConfig().min_aesthetic)
    assert p["s3.secret_access_key"] == "***" and p["s3.token"] == "***"
    assert p["recaption.endpoint"] == "http://u:***@vllm:8000"
    assert len(p["note"]) == 500
    assert not any("hunter2" in v for v in p.values())

    assert run.data.metrics == pytest.approx(mlflow_metrics(summary))

    t = run.data.tags
    assert t["omniforge.kind"] == "curation" and t["omniforge.catalog"] == summary["catalog"]
    assert t["omniforge.stages_run"] == "probe, split, motion, ocr, select, shard"
    assert "weights not found" in t["omniforge.stage_skipped.aesthetic"]
    assert t["hf_token"] == "***" and "omniforge.config_hash" not in t
    ours = [k for k in t if not k.startswith("mlflow.") and k != "hf_token"]
    assert all(k.startswith("omniforge.") for k in ours), ours
    assert t["mlflow.source.name"] and t["omniforge.command"] and t["mlflow.user"]
    assert re.fullmatch(r"[0-9a-f]{40}", t["mlflow.source.git.commit"])
    note = t["mlflow.note.content"]
    assert "catalog://sample-corpus@2" in note and "60 inputs" in note and "report.html" in note

    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "catalog://sample-corpus@2"
    assert dataset.dataset.digest == "ab" * 6
    assert dataset.dataset.source_type == "local"
    assert json.loads(dataset.dataset.source) == {"uri": str(out / "index")}
    assert json.loads(dataset.dataset.profile)["samples"] == 12
    assert [(tag.key, tag.value) for tag in dataset.tags] == [("mlflow.data.context", "output")]

    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "summary.json", "params.json", "extra"} <= top
    assert {a.path for a in client.list_artifacts(run_id, "extra")} == {"extra/plan.txt"}
    logged = json.loads(
        Path(client.download_artifacts(run_id, "params.json", str(tmp_path))).read_text()
    )
    assert logged["s3.token"] == "***" and len(logged["note"]) == 900
    assert "hunter2" not in json.dumps(logged)
    assert json.loads(
        Path(client.download_artifacts(run_id, "summary.json", str(tmp_path))).read_text()
    ) == json.loads(json.dumps(summary))
