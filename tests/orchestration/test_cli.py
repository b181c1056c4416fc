"""The ``omniforge`` console script, run as users run it (a subprocess of the installed entry point)."""

import json
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
        "split.treshold: unknown key; allowed keys here: drop_transitions, enabled, gradual, max_clip_s, min_clip_s, threshold, transnet, transnet_threshold, transnet_weights",
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
def test_user_errors_are_one_line_not_a_traceback(cat, catalog_url, args, message):
    out = run(*args, env_url=catalog_url if args[0] == "catalog" else None)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


# -- ordinary mistakes: one line on stderr, exit status 2, no traceback; nothing left behind --


def run_in(home: Path, *args: str, columns: int = 250) -> subprocess.CompletedProcess:
    """The CLI with its own HOME, OMNIFORGE_HOME and TMPDIR under ``home`` (all it may write)."""
    import os

    env = {
        **os.environ,
        "HOME": str(home),
        "OMNIFORGE_HOME": str(home / ".omniforge"),
        "TMPDIR": str(home / "tmp"),
        "COLUMNS": str(columns),
    }
    for name in ("OMNIFORGE_CATALOG_URL", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    return subprocess.run(
        [OMNIFORGE, *args], capture_output=True, text=True, timeout=120, env=env, cwd=home
    )


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_job_addresses_fail_at_once_with_what_to_do(tmp_path):
    from helpers import free_port

    (tmp_path / "tmp").mkdir()
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    line = one_line_error(run_in(tmp_path, "jobs", "status", "some-id", "--address", closed))
    assert f"use --address http://{closed}" in line
    for args in (("jobs", "status", "x"), ("jobs", "logs", "x"), ("jobs", "cancel", "x")):
        line = one_line_error(run_in(tmp_path, *args, "--address", f"http://{closed}"))
        assert f"cannot reach the Ray Jobs API at http://{closed}" in line
        assert "is the cluster running?" in line
    line = one_line_error(run_in(tmp_path, "jobs", "ls"))  # no cluster configured or running
    assert "no Ray cluster given: pass --address http://HOST:8265" in line
    # a job's catalog path is the cluster's: a relative one names nothing there
    args = ("submit", "curate", "--input", "/data/raw", "--output", "/data/out")
    line = one_line_error(run_in(tmp_path, *args, "--catalog", "rel/catalog.db"))
    assert "--catalog rel/catalog.db: a relative path names no file on the cluster" in line


def test_cluster_addresses_fail_at_once_with_what_to_do(tmp_path):
    """``curate run --address`` to a cluster nothing answers at: one line, from our own check,
    instead of Ray's retries (and a traceback for a Ray Client address). Training connects
    through the same ``core.cluster.init_ray``."""
    from helpers import free_port, small_corpus

    (tmp_path / "tmp").mkdir()
    raw = small_corpus(tmp_path / "raw")
    args = ("curate", "run", "--input", str(raw), "--output", str(tmp_path / "out"))
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    for address in (closed, f"ray://{closed}"):
        line = one_line_error(run_in(tmp_path, *args, "--address", address))
        assert f"no Ray cluster answers at {address} (Connection refused)" in line
        assert "check --address" in line


@pytest.mark.slow
def test_a_port_that_is_not_ray_gives_one_line_after_rays_own_wait(tmp_path):
    """``--address ray://HOST:PORT`` where something else listens (a mistyped port): Ray
    Client gives up after its own retries; the run ends with one line, no traceback."""
    import socket
    import threading

    from helpers import small_corpus

    (tmp_path / "tmp").mkdir()
    raw = small_corpus(tmp_path / "raw")
    held = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"ray://127.0.0.1:{server.getsockname()[1]}"

        def accept() -> None:  # connections open and stay silent, as a non-Ray service's
            while True:
                try:
                    held.append(server.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        args = ("curate", "run", "--input", str(raw), "--output", str(tmp_path / "out"))
        out = run_in(tmp_path, *args, "--address", address)
    for conn in held:
        conn.close()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"error: cannot connect to the Ray cluster at {address}: " + (
        "ray client connection timeout"
    ), out.stderr


def test_catalog_takes_a_path_and_read_only_commands_create_nothing(tmp_path, cat, catalog_url):
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    plan = home / "plan.yaml"
    plan.write_text("name: p\noutput: out\ntraining: {recipe: omni_video_tiny}\n")
    before = files_under(home)
    for args in (
        ("catalog", "ls"),
        ("catalog", "ls", "--output", "json"),
        ("catalog", "show", "nothing"),
        ("catalog", "show", "nothing@1", "--catalog", "elsewhere/catalog.db"),
        ("catalog", "lineage", "nothing@1"),
        ("catalog", "verify", "nothing@1"),
        ("config", "show"),
        ("train", "plan", "omni_video_tiny", "--catalog", "elsewhere/catalog.db"),
        ("plan", "status", str(plan)),
        ("plan", "status", str(plan), "--output", "json"),
        ("jobs", "ls"),
    ):
        out = run_in(home, *args)
        assert "Traceback" not in out.stderr, out.stderr
        assert files_under(home) == before, f"{args} wrote {files_under(home) - before}"
    out = run_in(home, "catalog", "ls")
    assert out.returncode == 0 and "no catalog at" in out.stdout
    assert json.loads(run_in(home, "catalog", "ls", "--output", "json").stdout) == []
    line = one_line_error(run_in(home, "catalog", "show", "nothing"))
    assert f"no catalog at {home / '.omniforge' / 'catalog.db'}" in line
    steps = json.loads(run_in(home, "plan", "status", str(plan), "--output", "json").stdout)
    assert [s["status"] for s in steps["steps"]] == ["pending"] * 3

    # a path is a SQLite file: the same catalog as its sqlite:/// URL, from any folder
    db = catalog_url.removeprefix("sqlite:///")
    cat.create_dataset("raw")
    out = run_in(home, "catalog", "ls", "--catalog", db, "--output", "json")
    assert out.returncode == 0, out.stderr
    assert [d["name"] for d in json.loads(out.stdout)] == ["raw"]
    line = one_line_error(run_in(home, "catalog", "ls", "--catalog", "postgres://db/x"))
    assert "'postgres://db/x' is not a database URL" in line


def test_an_empty_input_folder_leaves_nothing_behind(tmp_path, cat, catalog_url):
    (tmp_path / "empty").mkdir()
    out = run(
        "curate", "run", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out"),
        "--set", "name=nothing", env_url=catalog_url,
    )  # fmt: skip
    line = one_line_error(out)
    assert f"--input {tmp_path / 'empty'}: no inputs found" in line
    assert not (tmp_path / "out").exists()
    assert cat.list_datasets() == []  # no pending version either


def test_version_and_completion():
    from importlib.metadata import version

    out = run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"omniforge {version('omniforge')}")
    out = run("--help")
    assert "--install-completion" in out.stdout and "doctor" in out.stdout
    import os

    env = {**os.environ, "_OMNIFORGE_COMPLETE": "complete_bash", "COMP_WORDS": "omniforge cat",
           "COMP_CWORD": "1"}  # fmt: skip
    out = subprocess.run([OMNIFORGE], capture_output=True, text=True, timeout=60, env=env)
    assert "catalog" in out.stdout.split(), out.stdout + out.stderr


def test_library_notices_only_with_verbose(tmp_path, catalog_url):
    """Ray's token notice and MLflow's table creation are hidden unless --verbose."""
    import os
    import shutil

    from helpers import DATA

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(DATA / "astronaut.png", corpus / "astronaut.png")
    env = {**os.environ, "OMNIFORGE_HOME": str(tmp_path / "home")}
    env.pop("OMNIFORGE_VERBOSE", None)
    # a user's shell: Ray prints its notice only when the auth mode is not set (this test
    # process's own ray.init sets it in os.environ)
    env.pop("RAY_AUTH_MODE", None)
    stderr = {}
    for flag in ("", "--verbose"):
        out = subprocess.run(
            [OMNIFORGE, *([flag] if flag else []), "curate", "run", "--input", str(corpus),
             "--output", str(tmp_path / f"out{flag}"), "--set", f"name=one{flag.strip('-')}",
             "--catalog", catalog_url,
             "--tracking-uri", f"sqlite:///{tmp_path / f'mlflow{flag}.db'}"],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        stderr[flag] = out.stderr
    assert stderr[""] == ""
    assert "Token authentication is enabled" in stderr["--verbose"]
    assert "Creating initial MLflow database tables" in stderr["--verbose"]
