"""`omniforge mlflow up`: a real tracking server on 127.0.0.1, used over HTTP and its REST API."""

import json
import socket
import subprocess
import urllib.request

import pytest
from helpers import OMNIFORGE, free_port, outside_address, reachable

from core.tracking import log_params
from orchestration import services
from orchestration.mlflow_cmd import start_server


def rest(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_server_logs_over_http_and_answers_rest(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = start_server(port=port)
    try:
        assert server.url == f"http://127.0.0.1:{port}"
        ip = outside_address()
        if ip is not None:
            assert not reachable(ip, port)
        client = MlflowClient(server.url)
        exp = client.create_experiment("served")
        run = client.create_run(exp, run_name="over-http", tags={"omniforge.catalog": "x@1"})
        run_id = run.info.run_id
        log_params(client, run_id, {"db": {"url": "postgresql://me:pw@db/c"}, "lr": 0.1})
        for step in range(3):
            client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
        (tmp_path / "report.txt").write_text("hello")
        client.log_artifact(run_id, str(tmp_path / "report.txt"))
        client.set_terminated(run_id)

        api = f"{server.url}/api/2.0/mlflow"
        found = rest(f"{api}/runs/search", {"experiment_ids": [exp]})["runs"]
        assert [r["info"]["run_id"] for r in found] == [run_id]
        data = rest(f"{api}/runs/get?run_id={run_id}")["run"]["data"]
        params = {p["key"]: p["value"] for p in data["params"]}
        assert params == {"db.url": "postgresql://me:***@db/c", "lr": "0.1"}
        assert {m["key"]: m["value"] for m in data["metrics"]} == {"loss": pytest.approx(1 / 3)}
        tags = {t["key"]: t["value"] for t in data["tags"]}
        assert tags["omniforge.catalog"] == "x@1"
        history = rest(f"{api}/metrics/get-history?run_id={run_id}&metric_key=loss")["metrics"]
        assert [m["step"] for m in history] == [0, 1, 2]
        files = rest(f"{api}/artifacts/list?run_id={run_id}")["files"]
        assert [f["path"] for f in files] == ["report.txt"]
        # artifacts are proxied by the server into its artifact root
        stored = list((services.home() / "mlflow" / "artifacts").rglob("report.txt"))
        assert len(stored) == 1 and stored[0].read_text() == "hello"

        status = subprocess.run([OMNIFORGE, "mlflow", "status"], capture_output=True, text=True)
        assert status.returncode == 0 and server.url in status.stdout
    finally:
        services.stop("mlflow")
    assert services.running("mlflow") is None and services.port_free(port)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_mlflow_up_refuses_a_password_on_the_command_line():
    out = subprocess.run(
        [OMNIFORGE, "mlflow", "up", "--backend-store-uri", "postgresql://me:pw@db/mlflow"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--backend-store-uri holds a password" in out.stderr and "pw@" not in out.stderr
    down = subprocess.run([OMNIFORGE, "mlflow", "down"], capture_output=True, text=True)
    assert "no MLflow server is running" in down.stdout
