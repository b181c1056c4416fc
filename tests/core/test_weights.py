"""The local-weights policy curation and training share: lookup order, checks, loud errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.weights import (
    CHECKPOINT,
    LocalWeights,
    MissingWeights,
    hf_snapshot,
    model_roots,
    require_all,
    resolve_weights,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """(models_dir, $OMNIFORGE_MODELS, user cache) under tmp_path, none of them existing yet."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMNIFORGE_MODELS", str(tmp_path / "env"))
    return tmp_path / "cfg", tmp_path / "env", tmp_path / "home/.cache/omniforge/models"


def checkpoint(folder: Path, *files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_text("{}")
    return folder


def test_missing_weights_name_the_path_looked_at_and_how_to_get_them(roots):
    cfg, env, user = roots
    assert model_roots(cfg) == [cfg, env, user]
    path = resolve_weights(None, "aesthetic/head.pth", cfg)
    assert path == cfg / "aesthetic/head.pth"  # nothing anywhere: expected under the first root
    weights = LocalWeights(path, "LAION aesthetic head", "copy it there")
    with pytest.raises(MissingWeights) as err:
        weights.require()
    assert str(err.value) == f"LAION aesthetic head not found at {path}; copy it there"
    assert isinstance(err.value, FileNotFoundError)
    # found in a later root: that path, and it passes the check
    (env / "aesthetic").mkdir(parents=True)
    (env / "aesthetic/head.pth").write_bytes(b"x")
    found = resolve_weights(None, "aesthetic/head.pth", cfg)
    assert found == env / "aesthetic/head.pth"
    assert LocalWeights(found, "LAION aesthetic head").require() == found
    # an explicit path wins, as given, found or not
    assert (
        resolve_weights("~/mine.pth", "aesthetic/head.pth", cfg) == Path("~/mine.pth").expanduser()
    )


def test_a_checkpoint_folder_needs_config_weights_and_every_shard(roots, tmp_path):
    cfg, env, _ = roots
    path = resolve_weights(None, "Qwen2.5-7B-Instruct", cfg, kind=CHECKPOINT)
    assert path == cfg / "Qwen2.5-7B-Instruct"

    def problem(folder: Path) -> str:
        with pytest.raises(MissingWeights) as err:
            LocalWeights(folder, "mllm", "fetch it", CHECKPOINT).require()
        return str(err.value)

    assert problem(path) == f"mllm directory {path} does not exist; fetch it"
    folder = checkpoint(env / "Qwen2.5-7B-Instruct")
    assert resolve_weights(None, "Qwen2.5-7B-Instruct", cfg, kind=CHECKPOINT) == folder
    assert problem(folder) == f"mllm: no config.json in {folder}; fetch it"
    checkpoint(folder, "config.json")
    assert "mllm: no weights (*.safetensors, *.bin, *.pt, *.pth) in" in problem(folder)
    index = '{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}'
    (folder / "model.safetensors.index.json").write_text(index)
    checkpoint(folder, "model-1.safetensors")
    assert "lists missing weight files ['model-2.safetensors'] (incomplete download?)" in (
        problem(folder)
    )
    checkpoint(folder, "model-2.safetensors")
    assert LocalWeights(folder, "mllm", kind=CHECKPOINT).require() == folder


def test_every_problem_is_reported_at_once(tmp_path):
    good = checkpoint(tmp_path / "good", "config.json", "model.safetensors")
    weights = [
        LocalWeights(tmp_path / "a.pth", "head a", "get a"),
        LocalWeights(good, "backbone", kind=CHECKPOINT),
        LocalWeights(tmp_path / "b", "backbone b", "get b", CHECKPOINT),
    ]
    with pytest.raises(MissingWeights) as err:
        require_all(weights)
    assert str(err.value) == (
        "model weights are missing:\n"
        f"  - head a not found at {tmp_path / 'a.pth'}; get a\n"
        f"  - backbone b directory {tmp_path / 'b'} does not exist; get b"
    )
    assert require_all(weights[1:2]) == [good]


def test_hf_hub_names_the_cached_snapshot_and_never_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo_dir = tmp_path / "hub/models--org--name"
    missing = resolve_weights("hf-hub:org/name", [], kind=CHECKPOINT)
    assert missing == repo_dir / "snapshots/<main>"
    snap = checkpoint(repo_dir / "snapshots/abc123", "config.json", "model.safetensors")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs/main").write_text("abc123\n")
    assert hf_snapshot("org/name") == snap
    assert resolve_weights("hf-hub:org/name", "unused", kind=CHECKPOINT) == snap
    with pytest.raises(ValueError, match="names a repository, not a weights file"):
        resolve_weights("hf-hub:org/name", "x.pth")
    with pytest.raises(ValueError, match="expected hf-hub:ORG/NAME"):
        resolve_weights("hf-hub:name", [], kind=CHECKPOINT)


def test_the_policy_imports_no_torch():
    code = "import sys, core.weights; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
