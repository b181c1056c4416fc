"""Shared fixtures. Everything is written under pytest's tmp dirs; nothing touches ~/.omniforge."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, sample_rows, torch_threads, write_version_files

REPO = Path(__file__).resolve().parent.parent

# Object storage in tests is the local S3 server of ``s3_server`` (``omniforge s3 up``), found
# through the standard variables. They are set before anything starts (Ray's workers inherit
# the environment of the first ``ray.init``), and they point away from any real account: the
# developer's own AWS settings never reach a test.
S3_PORT = free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="omniforge-test",
    AWS_SECRET_ACCESS_KEY="omniforge-test",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_CONFIG_FILE=os.devnull,
    AWS_SHARED_CREDENTIALS_FILE=os.devnull,
)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_name, None)


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The local S3-compatible server (``omniforge s3 up``: moto's server mode on 127.0.0.1,
    objects in memory) for the whole session; its URL. Clients reach it through the AWS_*
    variables set above: real s3fs / pyarrow clients, no patched calls."""
    from orchestration import s3_cmd, services

    home = tmp_path_factory.mktemp("s3_service_home")
    with service_home(home):
        service = s3_cmd.start_server(port=S3_PORT)
    yield service.url
    with service_home(home):
        services.stop(s3_cmd.NAME)


@contextlib.contextmanager
def service_home(home: Path):
    """``OMNIFORGE_HOME`` set to ``home`` for a while: where a session-wide service records
    its pid and log (each test has its own home, see ``_isolated_home``)."""
    before = os.environ.get("OMNIFORGE_HOME")
    os.environ["OMNIFORGE_HOME"] = str(home)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMNIFORGE_HOME", None)
        else:
            os.environ["OMNIFORGE_HOME"] = before


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the local S3 server: ``s3://NAME``."""
    import uuid

    from orchestration import s3_cmd

    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_cmd.make_bucket(s3_server, name)
    return f"s3://{name}"


@dataclass
class Postgres:
    port: int
    password: str

    def database(self) -> str:
        """A new, empty database on the server: its URL (with the password)."""
        import uuid

        from orchestration import postgres_cmd

        name = f"t_{uuid.uuid4().hex[:12]}"
        return postgres_cmd.create_database(self.port, name, self.password)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A PostgreSQL server on 127.0.0.1 for the session, started as users start one
    (``omniforge postgres up``); skipped where the PostgreSQL server is not installed."""
    import shutil
    import signal

    from orchestration import postgres_cmd, services

    try:
        postgres_cmd.binary("initdb")
    except services.ServiceError as e:
        pytest.skip(str(e))
    home = tmp_path_factory.mktemp("postgres_service_home")
    port = free_port()
    with service_home(home):
        postgres_cmd.start_server(port)
    yield Postgres(port, (home / "postgres" / "password").read_text().strip())
    with service_home(home):
        try:
            services.stop(postgres_cmd.NAME, sig=signal.SIGINT)
        finally:
            shutil.rmtree(postgres_cmd.folder(port), ignore_errors=True)
