"""Faults: a killed driver resumes with only the uncommitted inputs; killed workers are retried.

Both compare with a clean run by sample key and content hash (index rows and every tar member),
and both wait for a recorded event (a committed block), never for a number of seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers import kill_tree, sample_digests

from catalog.index import read_index
from catalog.store import Catalog
from core.config import load_config
from curation.config import CurationConfig
from curation.journal import Journal
from curation.pipeline import run_curation
from curation.sample_data import generate

SETTINGS = [
    "select.min_short_side=64",
    "block_size=1",
    "name=subset",
    "aesthetic.enabled=false",
    "watermark.enabled=false",
]
OMNIFORGE = str(Path(sys.executable).with_name("omniforge"))


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """Sixteen inputs: images, videos (cuts, pans, static) and two corrupt files."""
    full = tmp_path_factory.mktemp("full")
    generate(full, seed=0)
    sub = tmp_path_factory.mktemp("subset")
    picks = sorted((full / "images").iterdir())[:7] + sorted((full / "corrupt").iterdir())[:2]
    picks += [
        p for p in (full / "videos").iterdir() if p.name.startswith(("cuts", "pan_", "static"))
    ]
    for p in picks:
        shutil.copy(p, sub / p.name)
    return sub


def snapshot(out: Path) -> tuple[dict[str, dict], dict[str, dict[str, str]]]:
    """Index rows by key and the sha256 of every tar member of every sample, run ids and shard
    names aside (each run has its own id; block boundaries may group shards differently)."""
    rows = {}
    for r in read_index(str(out / "index")).to_pylist():
        r.pop("run_id")
        r.pop("shard")
        rows[r["key"]] = r
    return rows, sample_digests(sorted((out / "shards").rglob("*.tar")))


@pytest.fixture(scope="module")
def clean(subset, tmp_path_factory, ray_session):
    work = tmp_path_factory.mktemp("clean")
    cat = Catalog(f"sqlite:///{work / 'catalog.db'}")
    cfg = load_config(CurationConfig, None, SETTINGS)
    run_curation(str(subset), work / "out", cfg, catalog=cat)
    rows, samples = snapshot(work / "out")
    assert samples and any(r["status"] == "error" for r in rows.values())
    return rows, samples


def committed_blocks(out: Path) -> int:
    return len(list((out / "_work" / "blocks").glob("b*.json")))


def test_rerun_after_killed_driver_processes_only_the_uncommitted_inputs(subset, clean, tmp_path):
    out = tmp_path / "out"
    cmd = [OMNIFORGE, "curate", "run", "--input", str(subset), "--output", str(out)]
    cmd += ["--catalog", f"sqlite:///{tmp_path / 'catalog.db'}"]
    for s in SETTINGS:
        cmd += ["--set", s]
    env = {**os.environ, "OMNIFORGE_HOME": str(tmp_path / "home")}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while driver.poll() is None and committed_blocks(out) < 3:  # the recorded event
        psutil.wait_procs([psutil.Process(driver.pid)], timeout=0.2)
    assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
    kill_tree(driver.pid)
    driver.wait()
    committed = Journal.committed_inputs(Journal(str(out)).records())
    total = len(list(subset.iterdir()))
    assert 3 <= len(committed) < total

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = json.loads((out / "summary.json").read_text())["run"]
    assert run["inputs_skipped"] == len(committed)
    assert run["inputs_this_run"] == total - len(committed)  # committed inputs are not redone
    assert snapshot(out) == clean
    assert not (out / "_work").exists()  # segments and block parts live on in shards/, index/
    version = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}").get_version("subset")
    assert version.version == 1  # the interrupted pending version was resumed, not duplicated


def test_killed_workers_are_retried_with_the_same_result(subset, clean, tmp_path, ray_session):
    """A CPU worker (probe ... motion, and the sink) and the OCR actor die mid-run."""
    out = tmp_path / "out"
    killed: dict[str, int] = {}
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and committed_blocks(out) < 1:  # the recorded event
            stop.wait(0.05)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            for kind in ("CpuWorker", "ModelWorker"):
                if title.startswith(f"ray::{kind}") and kind not in killed:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.send_signal(signal.SIGKILL)
                        killed[kind] = proc.pid

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        result = run_curation(
            str(subset), out, load_config(CurationConfig, None, SETTINGS), catalog=cat
        )
    finally:
        stop.set()
        thread.join()
    assert set(killed) == {"CpuWorker", "ModelWorker"}, killed
    assert result.summary["inputs"] == len(list(subset.iterdir()))
    assert snapshot(out) == clean
