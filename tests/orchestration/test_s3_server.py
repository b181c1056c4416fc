"""`omniforge s3 up|status|down`: the local S3-compatible server, used by a real s3fs client."""

from __future__ import annotations

import fsspec
from helpers import cli, free_port, outside_address, reachable


def test_s3_up_serves_buckets_on_loopback_and_down_stops_it(tmp_path):
    port = free_port()
    up = cli("s3", "up", "--port", str(port), "--bucket", "raw", "--bucket", "curated")
    try:
        assert up.returncode == 0, up.stderr
        url = f"http://127.0.0.1:{port}"
        assert f"export AWS_ENDPOINT_URL={url}" in up.stdout
        assert "buckets: raw, curated" in up.stdout
        ip = outside_address()
        if ip is not None:
            assert not reachable(ip, port)
        env = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in up.stdout.splitlines()
            if line.strip().startswith("export ")
        )
        assert set(env) == {
            "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"
        }  # fmt: skip
        fs = fsspec.filesystem(
            "s3",
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=env["AWS_ENDPOINT_URL"],
            skip_instance_cache=True,
        )
        assert sorted(b.rstrip("/") for b in fs.ls("")) == ["curated", "raw"]
        fs.pipe_file("raw/a.txt", b"hello")
        assert fs.cat_file("raw/a.txt") == b"hello"
        status = cli("s3", "status")
        assert status.returncode == 0 and url in status.stdout
        again = cli("s3", "up", "--port", str(free_port()))
        assert again.returncode == 2 and "s3 is already running" in again.stderr
    finally:
        down = cli("s3", "down")
    assert down.returncode == 0 and "stopped the S3 server" in down.stdout
    assert cli("s3", "status").returncode == 1
