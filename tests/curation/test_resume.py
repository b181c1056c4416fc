"""Faults: a killed driver resumes to the clean result; a killed Ray worker is retried."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from catalog.config import load_config
from catalog.index import read_index
from catalog.shards import iter_shard
from catalog.store import Catalog
from curation.config import CurationConfig
from curation.pipeline import run_curation
from curation.sample_data import generate

SETTINGS = [
    "select.min_short_side=64",
    "partition_size=2",
    "name=subset",
    "aesthetic.enabled=false",
    "watermark.enabled=false",
]
OMNIFORGE = str(Path(sys.executable).with_name("omniforge"))


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """A dozen inputs: images, a few videos (cuts, pans) and two corrupt files."""
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


def snapshot(out: Path) -> tuple[list[dict], dict[str, list]]:
    """Index rows and shard contents, run ids aside (each run has its own): what must match."""
    rows = sorted(read_index(str(out / "index")).to_pylist(), key=lambda r: r["key"])
    for r in rows:
        r.pop("run_id")
    shards = {}
    for path in sorted((out / "shards").rglob("*.tar")):
        samples = []
        for key, members in iter_shard(str(path)):
            meta = json.loads(members.pop("json"))
            meta.pop("run_id")
            samples.append((key, meta, members))
        shards[str(path.relative_to(out))] = samples
    return rows, shards


@pytest.fixture(scope="module")
def clean(subset, tmp_path_factory, ray_session):
    work = tmp_path_factory.mktemp("clean")
    cat = Catalog(f"sqlite:///{work / 'catalog.db'}")
    run_curation(
        str(subset), work / "out", load_config(CurationConfig, None, SETTINGS), catalog=cat
    )
    return snapshot(work / "out")


def kill_tree(pid: int) -> None:
    proc = psutil.Process(pid)
    for child in proc.children(recursive=True) + [proc]:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGKILL)


def test_rerun_after_killed_driver_equals_clean_run(subset, clean, tmp_path):
    out = tmp_path / "out"
    cmd = [
        OMNIFORGE,
        "curate",
        "run",
        "--input",
        str(subset),
        "--output",
        str(out),
        "--catalog",
        f"sqlite:///{tmp_path / 'catalog.db'}",
    ]
    for s in SETTINGS:
        cmd += ["--set", s]
    env = {**os.environ, "OMNIFORGE_HOME": str(tmp_path / "home")}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if len(list((out / "index").glob("part-p*.parquet"))) >= 2:
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the run finished before it could be killed"
    kill_tree(driver.pid)
    driver.wait()
    finished = len(list((out / "index").glob("part-p*.parquet")))
    total = (len(list(subset.iterdir())) + 1) // 2
    assert 0 < finished < total

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{finished} already finished, skipped" in rerun.stdout
    assert snapshot(out) == clean
    version = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}").get_version("subset")
    assert version.version == 1  # the interrupted pending version was resumed, not duplicated


def test_killed_ray_worker_is_retried_with_the_same_result(subset, clean, tmp_path, ray_session):
    killed: list[str] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith("ray::") and ("StageTask" in title or "MapBatches" in title):
                    try:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(title)
                    except psutil.NoSuchProcess:
                        continue
                    break
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        cfg = load_config(CurationConfig, None, SETTINGS)
        run_curation(str(subset), tmp_path / "out", cfg, catalog=cat)
    finally:
        stop.set()
        thread.join()
    assert killed, "no Ray worker was seen running a stage"
    assert snapshot(tmp_path / "out") == clean
