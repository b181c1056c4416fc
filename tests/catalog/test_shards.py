import os

import pytest

from catalog.shards import ShardWriter, bucket_name, iter_shard, sha256_file


@pytest.mark.parametrize(
    "w, h, frames, bucket",
    [
        (512, 512, 1, "a512_r1x1_f1"),
        (640, 360, 1, "a512_r16x9_f1"),
        (360, 640, 49, "a512_r9x16_f65"),
        (1920, 1080, 17, "a1536_r16x9_f17"),
        (900, 300, 9, "a512_r3x1_f9"),
        (200, 800, 2, "a512_r1x3_f9"),
        (64, 48, 1, "a256_r4x3_f1"),
    ],
)
def test_bucket_names(w, h, frames, bucket):
    assert bucket_name(w, h, frames) == bucket


def write(root, n=7, **kw):
    with ShardWriter(str(root), prefix="p", **kw) as writer:
        placed = {}
        for i in range(n):
            bucket = "a512_r1x1_f1" if i % 2 else "a512_r16x9_f1"
            placed[f"k{i}"] = writer.write(
                bucket, f"k{i}", {"json": b"{}", "jpg": bytes([i]) * 1000}
            )
    return writer.finished, placed


def test_roll_over_by_samples_and_read_back(tmp_path):
    shards, placed = write(tmp_path, max_samples=2)
    assert sorted((s.bucket, s.num_samples) for s in shards) == [
        ("a512_r16x9_f1", 2),
        ("a512_r16x9_f1", 2),
        ("a512_r1x1_f1", 1),
        ("a512_r1x1_f1", 2),
    ]
    seen = {}
    for s in shards:
        assert s.uri == str(tmp_path / s.path) and s.path.startswith(f"shards/{s.bucket}/p-")
        assert os.path.getsize(s.uri) == s.num_bytes and sha256_file(s.uri) == s.sha256
        for key, members in iter_shard(s.uri):
            assert placed[key] == s.path
            seen[key] = members
    assert sorted(seen) == [f"k{i}" for i in range(7)]
    assert seen["k3"] == {"json": b"{}", "jpg": bytes([3]) * 1000}
    assert not [p for p in tmp_path.rglob(".*tmp*")]


def test_roll_over_by_bytes(tmp_path):
    shards, _ = write(tmp_path, n=6, max_bytes=5000)
    assert all(s.num_samples <= 2 for s in shards) and sum(s.num_samples for s in shards) == 6


def test_same_input_same_bytes(tmp_path):
    a, _ = write(tmp_path / "a")
    b, _ = write(tmp_path / "b")
    assert [s.sha256 for s in a] == [s.sha256 for s in b]


def test_failed_write_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path)) as writer:
        writer.write("b", "k0", {"jpg": b"x"})
        raise RuntimeError("worker died")
    assert list(tmp_path.rglob("*.tar")) == [] and not list(tmp_path.rglob(".*tmp*"))
    with pytest.raises(ValueError, match="must not contain '/'"):
        ShardWriter(str(tmp_path)).write("b", "../evil", {"jpg": b"x"})
