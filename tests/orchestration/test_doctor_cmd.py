"""``omniforge doctor`` through the real CLI: a table of ok/warn/fail, exit 1 only on a fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port

OMNIFORGE = str(Path(sys.executable).with_name("omniforge"))


def doctor(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    full_env = dict(os.environ)
    for name in ("OMNIFORGE_CATALOG_URL", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        full_env.pop(name, None)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(HOME=str(home), OMNIFORGE_HOME=str(home / ".omniforge"), COLUMNS="200")
    full_env.update(env)
    return subprocess.run(
        [OMNIFORGE, "doctor", *args], capture_output=True, text=True, timeout=300, env=full_env
    )


def test_doctor_checks_this_machine_and_fails_on_an_unreachable_service(tmp_path):
    models = tmp_path / "models"  # no weights there: the default profile skips those stages
    out = doctor(tmp_path, OMNIFORGE_MODELS=str(models))
    assert "Traceback" not in out.stderr, out.stderr
    assert "omniforge doctor" in out.stdout
    for name in ("ray ", "deepspeed ", "mlflow ", "weights: aesthetic", "catalog ", "disk: "):
        assert name in out.stdout, out.stdout
    # libraries import, nothing is configured, HOME is writable: a fail could only be this
    # machine's disk (under 1 GiB free), which the test then names
    disk_fail = [
        ln for ln in out.stdout.splitlines() if ln.lstrip().startswith("disk") and " fail " in ln
    ]
    assert out.returncode == (1 if disk_fail else 0), out.stdout
    if not disk_fail:
        assert " fail " not in out.stdout, out.stdout

    checks = json.loads(doctor(tmp_path, "--output", "json", OMNIFORGE_MODELS=str(models)).stdout)
    by_name = {c["name"]: c for c in checks}
    assert by_name["ray"]["status"] == by_name["mlflow"]["status"] == "ok"
    assert by_name["ray cluster"]["detail"].startswith("none configured")
    aesthetic = by_name["weights: aesthetic"]
    assert aesthetic["status"] == "warn" and aesthetic["hint"]
    assert aesthetic["detail"].endswith("the default profile skips aesthetic")
    assert not (tmp_path / "home" / ".omniforge").exists()  # doctor creates nothing

    closed = f"http://127.0.0.1:{free_port()}"
    out = doctor(tmp_path, RAY_API_SERVER_ADDRESS=closed, MLFLOW_TRACKING_URI=closed)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"Jobs API at {closed} does not answer" in out.stdout
    assert f"tracking server {closed} does not answer" in out.stdout
    assert "2 check(s) failed: ray cluster, mlflow" in out.stdout
