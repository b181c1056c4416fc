"""The commands the demo prints after its run work as printed (copied into a shell)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from orchestration.demo import demo_plan, look_around


def test_printed_commands_run_as_printed(committed_version, catalog_url, tmp_path, monkeypatch):
    committed_version("demo")
    monkeypatch.chdir(tmp_path)
    # a shell where the venv is not activated: `omniforge` is not on PATH
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(demo_plan(tmp_path, catalog_url, tracking)))
    commands = look_around(tmp_path, plan, catalog_url, tracking, "demo@1")
    venv_omniforge = str(Path(sys.executable).with_name("omniforge"))
    ours = [c for c in commands if c.startswith(venv_omniforge)]
    assert len(ours) >= 6 and commands[-1].startswith(str(Path(sys.executable).with_name("mlflow")))
    for command in ours:
        if " train " in command:
            continue  # training is exercised by the training tests
        args = shlex.split(command)
        out = subprocess.run(args, capture_output=True, text=True, timeout=120, env=os.environ)
        assert out.returncode == 0, f"{command}\n{out.stdout}{out.stderr}"
        assert "not in the catalog" not in out.stdout + out.stderr
