"""`omniforge postgres up|status|down`: a real PostgreSQL server on 127.0.0.1 that the catalog and
an MLflow server use through the URL files it writes; its password is never printed."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from helpers import cli, free_port

from orchestration import postgres_cmd, services


@pytest.mark.slow
def test_postgres_up_serves_the_catalog_and_mlflow_without_printing_its_password(tmp_path):
    try:
        postgres_cmd.binary("initdb")
    except services.ServiceError as e:
        pytest.skip(str(e))
    port, mlflow_port = free_port(), free_port()
    up = cli("postgres", "up", "--port", str(port))
    try:
        assert up.returncode == 0, up.stderr
        password = (services.home() / "postgres" / "password").read_text().strip()
        files = {}
        for line in up.stdout.splitlines():
            if line.strip().startswith("export "):
                name, value = line.strip().removeprefix("export ").split("=", 1)
                files[name] = value
        assert set(files) == {"OMNIFORGE_CATALOG_URL_FILE", "OMNIFORGE_MLFLOW_BACKEND_URI_FILE"}
        for path in files.values():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert f"@127.0.0.1:{port}/" in Path(path).read_text()
        env = {**os.environ, **files}

        def run(*args: str):
            done = cli(*args, env=env)
            assert password not in done.stdout + done.stderr
            return done

        assert run("catalog", "migrate").returncode == 0
        listed = run("catalog", "ls")
        assert listed.returncode == 0 and "omniforge:***@127.0.0.1" in listed.stdout

        served = run("mlflow", "up", "--port", str(mlflow_port))
        assert served.returncode == 0, served.stderr
        assert f"backend postgresql://omniforge:***@127.0.0.1:{port}/mlflow" in served.stdout
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        run_id = client.create_run(client.create_experiment("on-postgres")).info.run_id
        client.log_metric(run_id, "loss", 0.5, step=1)
        assert client.get_metric_history(run_id, "loss")[0].value == 0.5
        assert run("mlflow", "down").returncode == 0
        assert run("postgres", "status").returncode == 0
    finally:
        cli("mlflow", "down")
        down = cli("postgres", "down")
        shutil.rmtree(postgres_cmd.folder(port), ignore_errors=True)
    assert down.returncode == 0 and "stopped PostgreSQL" in down.stdout
    assert services.port_free(port)
