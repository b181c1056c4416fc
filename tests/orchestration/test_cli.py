"""The ``omniforge`` console script, run as users run it (a subprocess of the installed entry point)."""

import subprocess
import sys
from pathlib import Path

import pytest

from catalog.store import Node

OMNIFORGE = str(Path(sys.executable).with_name("omniforge"))


def run(*args: str, env_url: str | None = None) -> subprocess.CompletedProcess:
    cmd = [OMNIFORGE, *args]
    if env_url:
        cmd += ["--catalog", env_url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_config_validate_reports_every_problem_readably(tmp_path):
    path = tmp_path / "curate.yaml"
    path.write_text(
        "name: clips\nsplit:\n  treshold: 30\nframes:\n  num_frames: 1\nmotion:\n  short_side: big\n"
    )
    out = run("config", "validate", str(path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    for line in [
        "split.treshold: unknown key; allowed keys here: enabled, max_clip_s, min_clip_s, threshold",
        "frames.num_frames: Input should be greater than or equal to 2 (got 1)",
        "motion.short_side: Input should be a valid integer, unable to parse string as an integer (got 'big')",
    ]:
        assert line in out.stderr
    assert str(path) in out.stderr

    path.write_text("name: clips\nrecaption:\n  endpoint: http://127.0.0.1:9/v1\n")
    out = run("config", "validate", str(path), "--set", "split.threshold=30")
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "valid CurationConfig" in out.stdout
    assert "'recaption.endpoint' has no effect" in out.stderr


def test_config_validate_detects_recipes(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: r\nmodel: {family: vino}\ndata: {d: {uri: 'catalog://x@1'}}\n"
        "stages:\n- name: s1\n  trainable: [connector]\n  optimizer: {lr: 0.0001}\n"
        "  frame_area: 1024\n  token_budget: 512\n  steps: 4\n  checkpoint_every: 2\n"
        "  tasks: {t2i: {weight: 1, data: d}}\n"
    )
    assert run("config", "validate", str(path)).returncode == 0
    out = run("config", "validate", str(path), "--set", "stages.0.optimizer.lr=0")
    assert out.returncode == 2
    assert "stages.0.optimizer.lr: Input should be greater than 0 (got 0)" in out.stderr


def test_config_validate_knows_the_family_groups_and_reports_every_problem(tmp_path):
    """A ``trainable`` group the family lacks is caught by validation (not only by ``train
    plan``), with every other problem of the recipe, each under its own path."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: r\nmodel: {family: omni_video}\ndata: {d: {uri: 'catalog://x@1'}}\n"
        "stages:\n- name: s1\n  trainable: [adaptor, dit]\n  optimizer: {lr: 0.0001}\n"
        "  frame_area: 1024\n  token_budget: 512\n  steps: 4\n  checkpoint_every: 2\n"
        "  tasks: {t2i: {weight: 1, data: e}, t2v: {weight: 1, data: d}}\n"
    )
    out = run("config", "validate", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for line in [
        "  - stages.0.tasks.t2v.num_frames: required for a video task",
        "  - stages.0.trainable: 'adaptor' matches no module group of omni_video; groups: mllm, "
        "text_head, vision_head, adapter, dit, vae, vision_encoder",
        "  - stages.0.tasks.t2i.data: 'e' is not a key of the data section; allowed: d",
    ]:
        assert line in out.stderr.splitlines(), out.stderr

    path.write_text(path.read_text().replace("t2i:", "i2i_edt:"))
    out = run("config", "validate", str(path))
    assert out.returncode == 2
    assert "  - stages.0.tasks.i2i_edt: 'i2i_edt' is not an allowed key here: Input should be " in (
        out.stderr
    )


def test_catalog_commands(cat, catalog_url, committed_version):
    raw, _ = committed_version("raw", n=20, seed=1)
    run_id = cat.start_run("curation", "curate raw")
    cat.add_edge(Node("version", raw.id), Node("run", run_id), "input")
    curated, rows = committed_version("curated", n=30, seed=2, parent_id=raw.id)
    cat.add_edge(Node("run", run_id), Node("version", curated.id), "output")

    out = run("catalog", "ls", env_url=catalog_url)
    assert out.returncode == 0, out.stderr
    assert "curated" in out.stdout and "raw" in out.stdout

    out = run("catalog", "show", "curated@1", env_url=catalog_url)
    assert out.returncode == 0, out.stderr
    counts = curated.counts
    assert f"{counts['accepted']} / {counts['rejected']} / {counts['error']}" in out.stdout
    assert "parent        catalog://raw@1" in out.stdout
    assert "shards per bucket" in out.stdout

    out = run("catalog", "lineage", "curated@1", env_url=catalog_url)
    assert out.returncode == 0, out.stderr
    assert "catalog://raw@1" in out.stdout and "curate raw" in out.stdout

    out = run(
        "catalog",
        "resolve",
        "catalog://curated@latest",
        "--filter",
        "kind == 'video'",
        "--keys",
        env_url=catalog_url,
    )
    assert out.returncode == 0, out.stderr
    videos = [r["key"] for r in rows if r["status"] == "accepted" and r["kind"] == "video"]
    assert f"{len(videos)} accepted samples matching" in out.stdout
    assert all(k in out.stdout for k in videos)


@pytest.mark.parametrize(
    "args, message",
    [
        (("catalog", "show", "nothing@1"), "dataset 'nothing' is not in the catalog"),
        (("catalog", "show", "demo@zero"), "version must be a positive integer or 'latest'"),
        (("config", "validate", "/nonexistent.yaml"), "config file not found"),
    ],
)
def test_user_errors_are_one_line_not_a_traceback(catalog_url, args, message):
    out = run(*args, env_url=catalog_url if args[0] == "catalog" else None)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
