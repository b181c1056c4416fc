"""Secrets come from the environment or secret files and are masked wherever they are shown."""

import subprocess
import sys
from pathlib import Path

import pytest

from catalog.db import default_url
from core.secrets import MASK, masked, read_secret
from orchestration import jobs

OMNIFORGE = str(Path(sys.executable).with_name("omniforge"))


def test_read_secret_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("OF_TEST_SECRET", raising=False)
    monkeypatch.delenv("OF_TEST_SECRET_FILE", raising=False)
    assert read_secret("OF_TEST_SECRET", "dflt") == "dflt"
    (tmp_path / "pw").write_text("s3cr3t\n")
    monkeypatch.setenv("OF_TEST_SECRET_FILE", str(tmp_path / "pw"))
    assert read_secret("OF_TEST_SECRET") == "s3cr3t"
    monkeypatch.setenv("OF_TEST_SECRET", "from-env")  # the variable wins over the file
    assert read_secret("OF_TEST_SECRET") == "from-env"
    monkeypatch.delenv("OF_TEST_SECRET")
    monkeypatch.setenv("OF_TEST_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="OF_TEST_SECRET_FILE=.*missing: cannot read"):
        read_secret("OF_TEST_SECRET")


def test_catalog_url_from_a_secret_file(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'from-file.db'}"
    (tmp_path / "url").write_text(url)
    monkeypatch.setenv("OMNIFORGE_CATALOG_URL_FILE", str(tmp_path / "url"))
    assert default_url() == url


def test_masked_keeps_shape_and_hides_values():
    value = {
        "db": {"url": "postgresql://me:hunter2@db/x", "password": "hunter2", "port": 5432},
        "s3": [{"secret_key": "abc", "endpoint": "http://minio:9000"}],
        "token_budget": 768,
        "api_key_env": "OPENAI_API_KEY",
    }
    assert masked(value) == {
        "db": {"url": "postgresql://me:***@db/x", "password": MASK, "port": 5432},
        "s3": [{"secret_key": MASK, "endpoint": "http://minio:9000"}],
        "token_budget": 768,
        "api_key_env": "OPENAI_API_KEY",
    }


def test_config_show_masks_secrets():
    out = subprocess.run(
        [OMNIFORGE, "config", "show", "--set", "recaption.endpoint=https://me:pw@llm/v1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "endpoint: https://me:***@llm/v1" in out.stdout and ":pw@" not in out.stdout


def test_jobs_refuse_to_carry_secrets():
    from core.config import load_config
    from curation.config import CurationConfig

    cfg = load_config(CurationConfig, None, [])
    with pytest.raises(jobs.JobError, match=r"--catalog postgresql://me:\*\*\*@db/c holds a pass"):
        jobs.curate_spec(cfg, "/data/raw", "/data/out", catalog="postgresql://me:pw@db/c")
    leaky = load_config(CurationConfig, None, ["recaption.endpoint=https://me:pw@llm/v1"])
    with pytest.raises(jobs.JobError, match="recaption.endpoint hold a secret"):
        jobs.curate_spec(leaky, "/data/raw", "/data/out")
    spec = jobs.curate_spec(cfg, "/data/raw", "/data/out", catalog="postgresql://me@db/c")
    assert spec.args[:2] == ["curate", "run"] and "postgresql://me@db/c" in spec.args
    assert spec.metadata["omniforge.kind"] == "curate"
    assert "curate.yaml" in spec.files


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://u:pw@h/x", "https://u:***@h/x"),
        ("https://ghp_abc123@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("https://h/a?token=T&page=2", "https://h/a?token=***&page=2"),
        ("s3://b/k?X-Amz-Signature=abc&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),  # a user name alone
        ("git@github.com:o/r.git", "git@github.com:o/r.git"),
    ],
)
def test_credentials_inside_urls_are_masked(text, shown):
    from core.secrets import has_secret, mask_urls

    assert mask_urls(text) == shown
    assert has_secret(text) == (shown != text)
