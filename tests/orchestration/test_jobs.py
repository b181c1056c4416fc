"""A real local Ray head (`cluster up`), jobs through the Ray Jobs API, catalog + MLflow records."""

import json
import os
import re
import subprocess

import pytest
from helpers import OMNIFORGE, cli, free_port, outside_address, reachable, small_corpus

from catalog.records import Node
from catalog.store import Catalog
from orchestration import services
from orchestration.cluster_cmd import start_head


def job_id_of(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return re.search(r"submitted job (\S+)", out.stdout).group(1)


@pytest.mark.slow
def test_jobs_on_a_local_ray_head(tmp_path):
    dashboard = free_port()
    head = start_head(port=free_port(), dashboard_port=dashboard, num_cpus=2)
    try:
        assert head.url == f"http://127.0.0.1:{dashboard}"
        ip = outside_address()
        if ip is not None:  # the dashboard / Jobs API answers on loopback only
            assert not reachable(ip, dashboard)
        catalog_url = f"sqlite:///{tmp_path / 'catalog.db'}"
        tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
        corpus = small_corpus(tmp_path / "corpus")

        # 1. curation job, waited for through the Jobs API
        out = cli(
            "submit", "curate", "--input", str(corpus), "--output", str(tmp_path / "curated"),
            "--set", "name=job-curated", "--set", "select.min_short_side=128",
            "--catalog", catalog_url, "--tracking-uri", tracking, "--wait",
        )  # fmt: skip
        curate_job = job_id_of(out)
        assert "job SUCCEEDED" in out.stdout

        # 2. one-stage training job on the version it committed, log followed to the end
        out = cli(
            "submit", "train", "omni_video_tiny", "--output", str(tmp_path / "train"),
            "--stages", "1", "--workers", "1", "--placement", "spread",
            "--set", "data.curated.uri=catalog://job-curated@1",
            "--set", "stages.0.steps=4", "--set", "stages.0.checkpoint_every=2",
            "--catalog", catalog_url, "--tracking-uri", tracking, "--follow",
        )  # fmt: skip
        train_job = job_id_of(out)
        assert "job SUCCEEDED" in out.stdout and "stage 1 (align): 4 steps" in out.stdout

        # the catalog: each job's runs carry its id; lineage version -> stage run -> checkpoint
        cat = Catalog(catalog_url)
        (curation_run,) = cat.list_runs(job_id=curate_job)
        (stage_run,) = cat.list_runs(job_id=train_job)
        assert (curation_run.kind, curation_run.status) == ("curation", "succeeded")
        assert (stage_run.kind, stage_run.status) == ("training_stage", "succeeded")
        version = cat.get_version("job-curated", 1)
        assert version.run_id == curation_run.id
        _, down = cat.lineage(Node("version", version.id))
        edges = {(e.parent.type, e.parent.id, e.relation, e.child.type) for e in down}
        assert ("version", version.id, "input", "run") in edges
        assert ("run", stage_run.id, "produced", "checkpoint") in edges

        # MLflow: both runs exist and link back to the catalog
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking)
        cur = client.get_run(curation_run.mlflow_run_id)
        assert cur.data.tags["omniforge.catalog"] == "catalog://job-curated@1"
        stage = client.get_run(stage_run.mlflow_run_id)
        assert stage.data.tags["omniforge.catalog_run"] == str(stage_run.id)
        assert "loss" in stage.data.metrics

        # the jobs commands
        out = cli("jobs", "ls")
        assert curate_job in out.stdout and "SUCCEEDED" in out.stdout
        out = cli("jobs", "status", train_job, "--catalog", catalog_url)
        assert out.returncode == 0, out.stderr
        assert "SUCCEEDED" in out.stdout and f"catalog run {stage_run.id} (training_stage)" in (
            out.stdout
        )
        out = cli("jobs", "logs", curate_job)
        assert "catalog://job-curated@1" in out.stdout

        # for scripts: JSON; for people: ids whole on one line in an 80-column terminal
        listed = json.loads(cli("jobs", "ls", "--output", "json").stdout)
        assert {curate_job, train_job} <= {j["id"] for j in listed}
        assert {j["status"] for j in listed if j["id"] == curate_job} == {"SUCCEEDED"}
        info = json.loads(
            cli("jobs", "status", train_job, "--catalog", catalog_url, "-o", "json").stdout
        )
        assert info["status"] == "SUCCEEDED" and info["catalog_runs"][0]["id"] == stage_run.id
        narrow = subprocess.run(
            [OMNIFORGE, "jobs", "ls"],
            capture_output=True,
            text=True,
            env=os.environ | {"COLUMNS": "80"},
        )
        assert narrow.returncode == 0, narrow.stderr
        assert curate_job in narrow.stdout and "SUCCEEDED" in narrow.stdout
        assert max(len(line) for line in narrow.stdout.splitlines()) <= 80

        # an id the cluster does not know: one line naming it, exit status 2
        for command in ("status", "logs", "cancel"):
            out = cli("jobs", command, "no-such-job")
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
            assert out.stderr.strip() == (
                f"error: no job 'no-such-job' on {head.url}: `omniforge jobs ls` lists the "
                "cluster's jobs"
            )

        # cancelling a running job
        from ray.job_submission import JobSubmissionClient

        sleeper = JobSubmissionClient(head.url).submit_job(entrypoint="sleep 120")
        out = cli("jobs", "cancel", sleeper)
        assert "stop requested" in out.stdout, out.stderr
        from orchestration.jobs import wait

        assert wait(sleeper, head.url, timeout=60) == "STOPPED"
    finally:
        services.stop("cluster")
    assert services.running("cluster") is None
    assert services.port_free(dashboard)
    assert not json.dumps(head.info).count(":pw@")  # nothing secret was recorded
