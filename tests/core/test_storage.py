"""Reading and writing many small files, on a local disk and on an object store (the local S3
server): every file whole, in order, and on the object store one request per file."""

from __future__ import annotations

import fsspec
import pytest

from core.storage import copy_tree, put_atomic, read_many


def test_read_many_gives_every_file_in_order_in_chunks(tmp_path):
    fs = fsspec.filesystem("file")
    paths = []
    for i in (3, 1, 4, 5, 9, 2, 6):  # not in name order: the order asked for is kept
        put_atomic(fs, f"{tmp_path}/sub/f{i}", f"file {i}".encode(), f"{tmp_path}/sub/.f{i}.tmp")
        paths.append(f"{tmp_path}/sub/f{i}")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        f"f{i}" for i in (1, 2, 3, 4, 5, 6, 9)
    ]  # the folder was made; no temporary file is left
    got = list(read_many(fs, paths, chunk=3))
    assert got == [f"file {p.rsplit('f', 1)[1]}".encode() for p in paths]
    with pytest.raises(FileNotFoundError):
        list(read_many(fs, [*paths[:4], f"{tmp_path}/sub/missing"], chunk=3))


def test_on_an_object_store_each_file_is_one_put_and_one_get(s3_bucket):
    """A put is the object whole (no temporary object, no copy); reads take one GET per file
    (no HEAD first) and span more than one chunk."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True)  # its own client: its own counter
    fs.connect()
    sent: list[tuple[str, str]] = []

    def count(request, **_):
        sent.append((request.method, request.url.split("?", 1)[0].rsplit("/", 2)[-1]))

    fs.s3.meta.events.register("before-send.s3", count)
    bucket = s3_bucket.removeprefix("s3://")
    paths = [f"{bucket}/records/b{i:03d}.json" for i in range(70)]
    for i, p in enumerate(paths):
        put_atomic(fs, p, b"{}" * i + b"[]", p + ".tmp")
    assert sent == [("PUT", p.rsplit("/", 1)[1]) for p in paths]
    assert fs.find(f"{bucket}/records") == paths

    sent.clear()
    assert list(read_many(fs, paths)) == [b"{}" * i + b"[]" for i in range(len(paths))]
    assert sorted(sent) == sorted(("GET", p.rsplit("/", 1)[1]) for p in paths)
    with pytest.raises(FileNotFoundError):
        list(read_many(fs, [*paths[:2], f"{bucket}/records/missing.json"]))


def test_copy_tree_between_folders_and_an_object_store(s3_bucket, tmp_path):
    """Every file to the same relative path, whichever side is the object store; between two
    local folders as hard links; copying again (a rerun) gives the same tree."""
    src = tmp_path / "src"
    files = {"a.jpg": b"a" * 10, "accepted/image~b1/k.jpg": b"k" * 7, "accepted/v~b2/m.jpg": b""}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)

    def tree(root) -> dict[str, bytes]:
        fs, path = fsspec.core.url_to_fs(str(root))
        return {f[len(path.rstrip("/")) + 1 :]: fs.cat_file(f) for f in fs.find(path)}

    for _ in range(2):
        assert copy_tree(str(src), str(tmp_path / "linked")) == 3
    assert tree(tmp_path / "linked") == files
    assert (tmp_path / "linked/a.jpg").stat().st_ino == (src / "a.jpg").stat().st_ino

    assert copy_tree(str(src), f"{s3_bucket}/one/_thumbs") == 3
    assert copy_tree(f"{s3_bucket}/one/_thumbs", f"{s3_bucket}/two/_thumbs") == 3
    assert copy_tree(f"{s3_bucket}/two/_thumbs", str(tmp_path / "back")) == 3
    assert tree(f"{s3_bucket}/two/_thumbs") == tree(tmp_path / "back") == files
    assert copy_tree(f"{s3_bucket}/missing", str(tmp_path / "none")) == 0
    assert not (tmp_path / "none").exists()
