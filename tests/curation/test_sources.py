"""Inputs: directories, manifests, WebDataset tars and fsspec URIs; nothing lost, nothing escapes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog.schema import make_key
from curation.sources import list_inputs


def png(color=(200, 10, 10), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_directory_scan_detects_nothing_by_extension_and_reads_manifests(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.png").write_bytes(png())
    (tmp_path / "a" / "photo.mp4").write_bytes(png())  # wrong extension: still an input
    (tmp_path / "notes.txt").write_text("sidecar")
    (tmp_path / "labels.jsonl").write_text('{"path": "a/one.png", "source": null}\n')
    (tmp_path / ".hidden.png").write_bytes(png())
    (tmp_path / "src.png").write_bytes(png())
    (tmp_path / "tgt.png").write_bytes(png((0, 0, 255)))
    (tmp_path / "edits.jsonl").write_text(
        json.dumps({"source": "src.png", "target": "tgt.png", "instruction": "make it blue"}) + "\n"
    )
    rows = list_inputs(str(tmp_path))
    by_uri = {r["source_uri"]: r for r in rows}
    assert set(by_uri) == {str(tmp_path / "a" / "one.png"), str(tmp_path / "a" / "photo.mp4"),
                           str(tmp_path / "src.png")}  # fmt: skip
    edit = by_uri[str(tmp_path / "src.png")]
    assert edit["target_uri"] == str(tmp_path / "tgt.png")
    assert edit["instruction"] == "make it blue" and edit["kind"] is None  # decided by content
    assert edit["key"] == make_key(str(tmp_path / "src.png"), target_uri=str(tmp_path / "tgt.png"))
    assert all(r["kind"] is None for r in rows)  # kinds come from content, later
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)  # stable partitions


def test_manifest_lines_that_cannot_be_read_become_error_rows(tmp_path):
    (tmp_path / "x.png").write_bytes(png())
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(
        b'{"uri": "x.png", "caption": "a red card"}\n'
        b"{not json\n"
        b'{"caption": "no uri"}\n'
        b'{"uri": "caf\xe9.png"}\n'
        b'{"source": "x.png"}\n'
        b"[1, 2]\n"
    )
    rows = list_inputs(str(manifest))
    assert len(rows) == 6  # every line is an input
    ok = [r for r in rows if r["status"] is None]
    assert [(r["source_uri"], r["caption"]) for r in ok] == [
        (str(tmp_path / "x.png"), "a red card")
    ]
    reasons = sorted(r["reasons"][0] for r in rows if r["status"] == "error")
    assert reasons == [
        "manifest_error: a manifest line must be a JSON object",
        "manifest_error: an edit pair needs source and target",
        "manifest_error: broken UTF-8: invalid continuation byte",
        "manifest_error: invalid JSON: Expecting property name enclosed in double quotes",
        "manifest_error: missing 'uri' (or 'source' + 'target')",
    ]
    assert all(r["source_uri"].startswith(f"{manifest}#L") for r in rows if r["status"] == "error")


def test_parquet_manifest_with_edit_pairs(tmp_path):
    (tmp_path / "s.png").write_bytes(png())
    (tmp_path / "t.png").write_bytes(png((1, 2, 3)))
    pq.write_table(
        pa.table(
            {
                "source": ["s.png"],
                "target": ["t.png"],
                "instruction": ["darken"],
                "kind": ["image_edit"],
            }
        ),  # fmt: skip
        tmp_path / "pairs.parquet",
    )
    (row,) = list_inputs(str(tmp_path / "pairs.parquet"))
    assert (row["kind"], row["instruction"], row["target_uri"]) == (
        "image_edit", "darken", str(tmp_path / "t.png"))  # fmt: skip


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_members_are_staged_and_unsafe_paths_refused(tmp_path):
    shard = tmp_path / "data-000.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "s1.png", png())
        add(tar, "s1.txt", b"a red card")
        add(tar, "dir/s2.jpg", png((0, 255, 0)))
        add(tar, "dir/s2.json", json.dumps({"caption": "green"}).encode())
        add(tar, "../escape.png", png())
        add(tar, "/abs/evil.png", png())
        add(tar, "only.txt", b"caption without media")
    out = tmp_path / "out"
    rows = list_inputs(str(shard), staging=out / "_staging")
    ok = sorted((Path(r["source_uri"]).name, r["caption"]) for r in rows if r["status"] is None)
    assert ok == [("s1.png", "a red card"), ("s2.jpg", "green")]
    refused = [r for r in rows if r["status"] == "error"]
    assert len(refused) == 2
    assert all(r["reasons"][0].startswith("unsafe_member_path") for r in refused)
    staged = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert all(str(p).startswith("_staging/") for p in staged)
    assert not (tmp_path / "escape.png").exists() and not Path("/abs/evil.png").exists()


def test_brace_pattern_and_corrupt_tar(tmp_path):
    for i in range(2):
        with tarfile.open(tmp_path / f"d-{i:03d}.tar", "w") as tar:
            add(tar, f"k{i}.png", png())
    rows = list_inputs(str(tmp_path / "d-{000..001}.tar"), staging=tmp_path / "stage")
    assert sorted(Path(r["source_uri"]).name for r in rows) == ["k0.png", "k1.png"]
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    (row,) = list_inputs(str(tmp_path / "bad.tar"), staging=tmp_path / "stage")
    assert row["status"] == "error" and row["reasons"][0].startswith("tar_error")


def test_fsspec_uris_and_clear_errors(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(png())
    rows = list_inputs(f"file://{tmp_path / 'd'}")
    assert [Path(r["source_uri"]).name for r in rows] == ["x.png"]
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        list_inputs(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="edit pairs need a manifest"):
        list_inputs(str(tmp_path / "d"), kind="image_edit")
    forced = list_inputs(str(tmp_path / "d"), kind="video")
    assert forced[0]["kind"] == "video"  # probe checks the forced kind against the content
