import io
import os
import pickle
import tarfile
from pathlib import Path

import pytest

from catalog.shards import (
    ShardReader,
    ShardReadError,
    ShardWriter,
    bucket_name,
    iter_shard,
    sha256_file,
)


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


def test_on_an_object_store_shards_are_written_under_their_names_whole(s3_bucket, tmp_path):
    """No temporary object and no copy (an object store has no rename): the shards equal a
    local folder's, sizes and hashes as read back; a failed write leaves nothing."""
    import fsspec

    local, _ = write(tmp_path)
    remote, placed = write(f"{s3_bucket}/v1")
    fs = fsspec.filesystem("s3")
    assert [(s.path, s.num_bytes, s.sha256) for s in remote] == [
        (s.path, s.num_bytes, s.sha256) for s in local
    ]
    for s in remote:
        assert s.uri == f"{s3_bucket}/v1/{s.path}"
        assert fs.size(s.uri) == s.num_bytes and sha256_file(s.uri) == s.sha256
    assert sorted(fs.find(f"{s3_bucket}/v1")) == sorted(s.uri.removeprefix("s3://") for s in remote)
    assert sorted(k for s in remote for k, _ in iter_shard(s.uri)) == sorted(placed)

    with pytest.raises(RuntimeError), ShardWriter(f"{s3_bucket}/v2") as writer:
        writer.write("b", "k0", {"jpg": b"x"})
        raise RuntimeError("worker died")
    assert fs.find(f"{s3_bucket}/v2") == []


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


# -- reading ----------------------------------------------------------------------------------


def tar_of(path, members):
    """A tar of ``members`` ((name, bytes) in order; bytes None = a directory)."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_reader_groups_consecutive_members_by_key(tmp_path):
    uri = tar_of(
        tmp_path / "s.tar",
        [
            ("__index__", b"tar-level metadata"),
            ("a.json", b"{}"),
            ("a.JPG", b"A"),
            ("d/", None),
            ("d/b.src.jpg", b"S"),
            ("d/b.tgt.jpg", b"T"),
            ("no_extension", b"?"),
            ("c.txt", b"C"),
            ("a.txt", b"again"),  # a key that comes back is a new sample (WebDataset's rule)
        ],
    )
    with ShardReader(uri) as reader:
        samples = [(key, sorted(members)) for key, members in reader]
        assert reader.ordinal == 4
    assert samples == [
        ("a", ["jpg", "json"]),
        ("d/b", ["src.jpg", "tgt.jpg"]),
        ("c", ["txt"]),
        ("a", ["txt"]),
    ]
    assert dict(iter_shard(uri))["d/b"] == {"src.jpg": b"S", "tgt.jpg": b"T"}


def test_reader_reads_members_on_request_and_skips(tmp_path):
    uri = tar_of(
        tmp_path / "s.tar",
        [(f"k{i}.{e}", f"{i}{e}".encode()) for i in range(4) for e in ("json", "mp4")],
    )
    with ShardReader(uri) as reader:
        reader.skip(2)
        key, members = reader.next()
        assert (key, reader.ordinal) == ("k2", 3)
        assert reader.read(members["json"]) == b"2json"  # media never read
        rest = [k for k, _ in reader]
        assert reader.read(members["mp4"]) == b"2mp4"  # an earlier sample's member, by seek
    assert rest == ["k3"] and reader.next() is None


def cut_shards(tmp_path):
    """Shards of k0..k2 (json + 1000-byte jpg) cut: inside k2's jpg, inside k2's jpg header,
    between members (no end-of-archive block), and not a tar at all."""
    members = [
        (f"k{i}.{e}", b"{}" if e == "json" else bytes(1000))
        for i in range(3)
        for e in ("json", "jpg")
    ]
    whole = tar_of(tmp_path / "whole.tar", members)
    blob = Path(whole).read_bytes()
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1]
    at_k2 = blob.index(b"k2.jpg")
    cuts = {
        "data": blob[: at_k2 + 512 + 300],
        "header": blob[: at_k2 + 100],
        "between": blob[: last.offset_data + (last.size + 511) // 512 * 512],  # no end block
        "garbage": b"not a tar " * 200,
    }
    for name, data in cuts.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
    return {name: str(tmp_path / f"{name}.tar") for name in cuts}


@pytest.mark.parametrize(
    "cut, read, why",
    [
        ("data", 2, "unexpected end of data"),
        ("header", 2, "no end-of-archive block"),
        ("between", 2, "no end-of-archive block"),
        ("garbage", 0, "ReadError"),
    ],
)
def test_a_cut_or_corrupt_shard_raises_naming_it(tmp_path, cut, read, why):
    uri = cut_shards(tmp_path)[cut]
    seen = []
    with pytest.raises(ShardReadError, match=f"is unreadable after {read} samples: .*{why}") as e:
        seen.extend(key for key, _ in iter_shard(uri))
    assert str(e.value).startswith(f"shard {uri} ") and e.value.uri == uri
    assert isinstance(e.value, OSError)
    assert seen == [f"k{i}" for i in range(read)]  # k2 (cut short) is never returned


def test_a_handler_ends_the_shard_instead_of_raising(tmp_path):
    errors = []
    uri = cut_shards(tmp_path)["data"]
    with ShardReader(uri, handler=errors.append) as reader:
        assert [key for key, _ in reader] == ["k0", "k1"] and reader.next() is None
    missing = ShardReader(str(tmp_path / "missing.tar"), handler=errors.append)
    assert missing.next() is None
    assert [e.uri for e in errors] == [uri, str(tmp_path / "missing.tar")]
    with pytest.raises(ShardReadError, match="missing.tar is unreadable after 0 samples"):
        ShardReader(str(tmp_path / "missing.tar"))
    again = pickle.loads(pickle.dumps(errors[0]))  # crosses process boundaries (Ray tasks)
    assert (str(again), again.uri) == (str(errors[0]), uri)


def test_a_repeated_member_is_corruption(tmp_path):
    uri = tar_of(tmp_path / "s.tar", [("k.json", b"{}"), ("k.jpg", b"1"), ("k.JPG", b"2")])
    with pytest.raises(ShardReadError, match="k.JPG repeats extension 'jpg'"):
        list(iter_shard(uri))


def test_a_member_cut_short_is_an_error_of_that_member(tmp_path):
    uri = cut_shards(tmp_path)["data"]
    info = tarfile.TarInfo("k2.jpg")  # the header the reader stopped at, data cut after 300
    info.size, info.offset_data = 1000, Path(uri).stat().st_size - 300
    with (
        ShardReader(uri, handler=lambda e: None) as reader,
        pytest.raises(ShardReadError, match="unexpected end of data") as e,
    ):
        reader.read(info)
    assert str(e.value).startswith(f"shard {uri}: member k2.jpg: ")
