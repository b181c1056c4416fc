"""``omniforge catalog verify``, run as users run it (the installed entry point)."""

from pathlib import Path

from helpers import cli


def test_verify_passes_an_intact_version(catalog_url, committed_version):
    v, _ = committed_version("demo")
    out = cli("catalog", "verify", "demo@1", "--catalog", catalog_url)
    assert out.returncode == 0, out.stderr
    assert f"catalog://demo@1: {v.num_shards} shards verified, {v.num_bytes} bytes" in out.stdout


def test_verify_lists_every_bad_shard_and_fails(cat, catalog_url, committed_version):
    v, _ = committed_version("demo")
    shards = cat.shards(v.id)
    deleted, changed = Path(shards[0].uri), Path(shards[1].uri)
    deleted.unlink()
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum can tell
    changed.write_bytes(bytes(data))

    out = cli("catalog", "verify", "demo@latest", "--catalog", catalog_url)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert f"catalog://demo@1: 2 of {v.num_shards} shards are missing or corrupt" in out.stdout
    assert f"{deleted}: missing" in out.stdout
    assert f"{changed}: checksum mismatch" in out.stdout
    assert "verified" not in out.stdout


def test_verify_of_an_unknown_version_is_a_one_line_error(catalog_url, committed_version):
    committed_version("demo")
    out = cli("catalog", "verify", "demo@2", "--catalog", catalog_url)
    assert out.returncode == 2
    assert "dataset 'demo' has no version 2" in out.stderr and "Traceback" not in out.stderr
