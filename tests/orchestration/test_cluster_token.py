"""The Ray auth token `cluster up` relies on is readable by its owner only."""

from __future__ import annotations

import os
import stat

import pytest

from orchestration import cluster_cmd


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A temporary HOME with no token anywhere, and a permissive umask (as on most machines)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_FILE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    old = os.umask(0o022)
    yield tmp_path
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_generated_token_is_private(home):
    assert cluster_cmd._ensure_token() == "token"
    token = home / ".ray" / "auth_token"
    assert mode(token) == 0o600
    assert mode(token.parent) == 0o700
    value = token.read_text()
    assert len(value) == 64 and int(value, 16) >= 0  # Ray's format: 32 random bytes in hex
    assert cluster_cmd.ray_token() == value
    cluster_cmd._ensure_token()  # an existing token is kept
    assert token.read_text() == value


def test_a_token_ray_wrote_with_a_loose_mode_is_tightened(home):
    token = home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)  # what ray.init() leaves behind: mode 0644 under umask 022
    assert mode(token) == 0o644
    cluster_cmd._ensure_token()
    assert mode(token) == 0o600 and token.read_text() == "a" * 64


def test_the_token_goes_where_ray_auth_token_path_points(home, monkeypatch):
    path = home / "secrets" / "ray-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    cluster_cmd._ensure_token()
    assert mode(path) == 0o600 and not (home / ".ray").exists()


def test_no_token_file_when_auth_is_off_or_the_token_comes_from_the_environment(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster_cmd._ensure_token() == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "b" * 64)
    assert cluster_cmd._ensure_token() == "token"
    assert not (home / ".ray").exists()
