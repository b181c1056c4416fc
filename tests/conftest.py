"""Shared fixtures. Everything is written under pytest's tmp dirs; nothing touches ~/.omniforge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import sample_rows, torch_threads, write_version_files

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own OMNIFORGE_HOME so a default catalog never leaks between tests."""
    monkeypatch.setenv("OMNIFORGE_HOME", str(tmp_path / "omniforge_home"))
    monkeypatch.delenv("OMNIFORGE_CATALOG_URL", raising=False)


@pytest.fixture
def catalog_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture
def cat(catalog_url):
    from catalog.store import Catalog

    c = Catalog(catalog_url)
    yield c
    c.close()


@pytest.fixture
def committed_version(cat, tmp_path):
    """A committed dataset version 'demo@1' with 20 samples (13 accepted) in shards."""

    def make(name: str = "demo", n: int = 20, seed: int = 0, parent_id: int | None = None):
        root = tmp_path / f"{name}-{seed}-{os.urandom(3).hex()}"
        rows = sample_rows(n, seed)
        shards = write_version_files(root, rows)
        v = cat.begin_version(name, root_uri=str(root), config_hash=f"h{seed}", parent_id=parent_id)
        cat.add_shards(v.id, shards)
        return cat.commit_version(v.id, str(root / "index")), rows

    return make


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The synthetic corpus of seed 0 (``curation.sample_data``), generated once per session:
    (root, labels). Shared by every test that reads it: write nothing under its root."""
    from curation.sample_data import generate

    root = tmp_path_factory.mktemp("corpus_seed0")
    return root, generate(root, seed=0)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (tiny models; see ``helpers.torch_threads``)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting Ray costs seconds); stopped at the end."""
    import ray

    from core.secrets import ensure_ray_token

    if not ray.is_initialized():
        ensure_ray_token()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and any socket connection fails: nothing may be downloaded."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
