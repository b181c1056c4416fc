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
from curation.config import CurationConfig
from curation.sources import list_inputs
from curation.stages.base import Stage
from curation.stages.probe import ProbeStage
from curation.stages.select import SelectStage


def select_stage(cfg: CurationConfig) -> SelectStage:
    return SelectStage(cfg.select, cfg.edit, cfg.split.min_clip_s)


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
                           str(tmp_path / "src.png"), str(tmp_path / ".hidden.png")}  # fmt: skip
    assert by_uri.pop(str(tmp_path / ".hidden.png"))["status"] == "rejected"  # a row, not read
    rows = list(by_uri.values())
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


# -- inputs are confined to the input root ------------------------------------------------------


def tags(row: dict) -> list[str]:
    return [r.split(":", 1)[0] for r in row["reasons"]]


def refused_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "error" and tags(r) == ["outside_input_root"]]


def test_manifest_entries_outside_its_folder_are_refused_unless_allowed(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir(), elsewhere.mkdir()
    (root / "ok.png").write_bytes(png())
    (elsewhere / "secret.png").write_bytes(png())
    (root / "escape").symlink_to(elsewhere)  # a folder link inside the manifest's folder
    entries = [
        {"uri": "ok.png"},
        {"uri": "sub/../ok.png", "caption": "still inside"},
        {"uri": f"file://{root / 'ok.png'}"},
        {"uri": str(root / "ok.png")},
        {"uri": "/etc/passwd"},
        {"uri": "../elsewhere/secret.png"},
        {"uri": "escape/secret.png"},
        {"uri": "file:///etc/passwd"},
        {"uri": "file://otherhost/etc/passwd"},
        {"uri": "http://127.0.0.1:9/x.png"},
        {"uri": "s3://bucket/raw/x.png"},
        {"source": "ok.png", "target": "/etc/hostname", "instruction": "x"},
    ]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))

    rows = list_inputs(str(manifest))
    assert len(rows) == 9  # every line is a row; the four spellings of ok.png are one input
    ok = [r for r in rows if r["status"] is None]
    assert [r["source_uri"] for r in ok] == [str(root / "ok.png")]
    refused = refused_rows(rows)
    assert len(refused) == 8
    assert all(r["source_uri"].startswith(f"{manifest}#L") for r in refused)  # never the target
    details = " | ".join(r["reasons"][0] for r in refused)
    secret = str((elsewhere / "secret.png").resolve())
    assert details.count(secret) == 2  # '..' and the folder link: both resolved and named
    assert "/etc/passwd" in details and "http://127.0.0.1:9/x.png" in details
    assert "/etc/hostname" in details  # the edit pair's target

    allowed = list_inputs(
        str(manifest), allow=[str(elsewhere), "s3://bucket/raw/", "http://127.0.0.1:9/"]
    )
    uris = {r["source_uri"] for r in allowed if r["status"] is None}
    assert {str(elsewhere / "secret.png"), str(root / "escape" / "secret.png"),
            "s3://bucket/raw/x.png", "http://127.0.0.1:9/x.png"} <= uris  # fmt: skip
    assert len(refused_rows(allowed)) == 4  # /etc twice, file://otherhost, the edit target


def test_uri_prefixes_in_allow_are_matched_after_normalising_the_path(tmp_path):
    lines = [
        "https://media.example/raw/a.png",
        "https://media.example/raw/../private/b.png",
        "https://media.example/raw/%2e%2e/private/c.png",
        "https://media.example/raw/..%5cprivate/d.png",
        "https://media.example/raw2/e.png",
        "https://media.example@evil.example/raw/f.png",
        "S3://Bucket/raw/g.png",
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"uri": u}) + "\n" for u in lines))
    rows = list_inputs(str(manifest), allow=["https://media.example/raw/", "s3://bucket/raw"])
    ok = sorted(r["source_uri"] for r in rows if r["status"] is None)
    assert ok == ["S3://Bucket/raw/g.png", "https://media.example/raw/a.png"]
    assert len(refused_rows(rows)) == 5


def test_symlinks_in_the_input_folder_do_not_lead_outside(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    (elsewhere / "deep").mkdir(parents=True)
    (root / "a" / "real.png").write_bytes(png())
    (elsewhere / "secret.png").write_bytes(png())
    (elsewhere / "deep" / "more.png").write_bytes(png())
    (root / "passwd.png").symlink_to(elsewhere / "secret.png")  # a file link leading out
    (root / "linked_dir").symlink_to(elsewhere)  # a folder link leading out
    (root / "alias.png").symlink_to(root / "a" / "real.png")  # inside: the same input
    (root / "a_again").symlink_to(root / "a")  # inside: not walked twice
    (root / "loop").symlink_to(root)  # a cycle: not followed
    (root / "dangling.png").symlink_to(tmp_path / "missing.png")

    rows = list_inputs(str(root))
    ok = [r["source_uri"] for r in rows if r["status"] is None]
    assert ok == [str(root / "a" / "real.png")]
    refused = {r["source_uri"]: r["reasons"][0] for r in refused_rows(rows)}
    assert set(refused) == {str(root / n) for n in ("passwd.png", "linked_dir", "dangling.png")}
    assert str((elsewhere / "secret.png").resolve()) in refused[str(root / "passwd.png")]
    assert str(elsewhere.resolve()) in refused[str(root / "linked_dir")]
    assert len(rows) == 4  # nothing under elsewhere/ is listed

    allowed = list_inputs(str(root), allow=[str(elsewhere)])
    ok = sorted(r["source_uri"] for r in allowed if r["status"] is None)
    real = elsewhere.resolve()
    assert ok == sorted([str(root / "a" / "real.png"), str(real / "secret.png"),
                         str(real / "deep" / "more.png")])  # fmt: skip
    assert [r["source_uri"] for r in refused_rows(allowed)] == [str(root / "dangling.png")]


def test_an_fsspec_input_is_confined_to_its_prefix():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/conf/raw/x.png", png())
    fs.pipe("/conf/secret.png", png())
    fs.pipe(
        "/conf/raw/m.jsonl",
        b"".join(
            json.dumps({"uri": u}).encode() + b"\n"
            for u in ["x.png", "../secret.png", "memory:///conf/raw/x.png", "/etc/passwd"]
        ),
    )
    try:
        rows = list_inputs("memory://conf/raw")
        ok = {r["source_uri"] for r in rows if r["status"] is None}
        assert ok == {"memory:///conf/raw/x.png"}
        refused = refused_rows(rows)
        assert len(refused) == 2
        assert any("memory:///conf/secret.png" in r["reasons"][0] for r in refused)
    finally:
        fs.rm("/conf", recursive=True)


# -- every input is a row ------------------------------------------------------------------------


def test_hidden_and_underscore_files_are_rejected_rows(tmp_path):
    (tmp_path / "keep.png").write_bytes(png())
    (tmp_path / ".hidden.png").write_bytes(png())
    (tmp_path / "_draft.mp4").write_bytes(png())
    (tmp_path / "_private" / "deep").mkdir(parents=True)
    (tmp_path / "_private" / "deep" / "x.png").write_bytes(png())
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    (tmp_path / ".notes.txt").write_text("a sidecar, hidden or not: not an input")
    rows = list_inputs(str(tmp_path))
    by_uri = {r["source_uri"]: r for r in rows}
    hidden = {str(tmp_path / p) for p in (".hidden.png", "_draft.mp4", "_private/deep/x.png",
                                          ".git/HEAD")}  # fmt: skip
    assert set(by_uri) == hidden | {str(tmp_path / "keep.png")}
    for uri in hidden:
        row = by_uri[uri]
        assert row["status"] == "rejected" and tags(row) == ["skipped_hidden"], row
    assert by_uri[str(tmp_path / "_draft.mp4")]["kind"] == "video"  # the contract needs a kind
    assert "'_private'" in by_uri[str(tmp_path / "_private/deep/x.png")]["reasons"][0]


def test_rows_rejected_by_the_listing_pass_through_every_stage(tmp_path):
    (tmp_path / ".hidden.png").write_bytes(png(size=(640, 480)))
    (tmp_path / "small.png").write_bytes(png())

    class Touches(Stage):  # a stage with its own process_batch, like the scorers
        name = "touches"

        def process_batch(self, rows):
            return [{**r, "aesthetic": 9.0} for r in rows]

    rows = list_inputs(str(tmp_path))
    listed = next(r for r in rows if r["status"] == "rejected")
    cfg = CurationConfig()
    for stage in (ProbeStage(cfg.probe), Touches(), select_stage(cfg)):
        rows = stage.process_batch(rows)
    hidden = next(r for r in rows if r["source_uri"].endswith(".hidden.png"))
    assert hidden == listed  # untouched: not probed, not scored, not re-selected
    small = next(r for r in rows if r["source_uri"].endswith("small.png"))
    assert small["status"] == "rejected" and small["width"] == 32 and small["aesthetic"] == 9.0
    lenient = CurationConfig(select={"min_short_side": None})
    (again,) = select_stage(lenient).process_batch([small])  # threshold rejections: re-selected
    assert (again["status"], again["reasons"]) == ("accepted", [])


def test_the_runs_own_output_inside_the_input_folder_is_not_listed(tmp_path):
    (tmp_path / "x.png").write_bytes(png())
    out = tmp_path / "curated"
    (out / "shards" / "a512").mkdir(parents=True)
    (out / "index").mkdir()
    (out / "_staging" / "data.tar").mkdir(parents=True)
    (out / "_staging" / "data.tar" / "s1.png").write_bytes(png())
    (out / "shards" / "a512" / "p00000-000000.tar").write_bytes(b"not read")
    (out / "index" / "part-p00000.parquet").write_bytes(b"not read")
    (out / "report.html").write_text("<html>")
    rows = list_inputs(str(tmp_path), staging=out / "_staging")
    assert [r["source_uri"] for r in rows] == [str(tmp_path / "x.png")]
    with pytest.raises(ValueError, match="is the --input folder"):
        list_inputs(str(tmp_path), staging=tmp_path / "_staging")


def test_special_files_in_the_input_folder_are_error_rows(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.mp4")  # a worker opening it would block forever
    (row,) = list_inputs(str(tmp_path))
    assert row["status"] == "error" and row["reasons"] == ["not_a_regular_file: a fifo"]


def test_link_and_device_members_of_a_tar_are_error_rows(tmp_path):
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "s1.png", png())
        for name, kind, target in [
            ("s2.png", tarfile.SYMTYPE, "/etc/passwd"),
            ("s3.png", tarfile.LNKTYPE, "s1.png"),
            ("s4.png", tarfile.CHRTYPE, ""),
            ("s5.png", tarfile.FIFOTYPE, ""),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    staging = tmp_path / "out" / "_staging"
    rows = list_inputs(str(shard), staging=staging)
    assert [Path(r["source_uri"]).name for r in rows if r["status"] is None] == ["s1.png"]
    errors = sorted(r["reasons"][0] for r in rows if r["status"] == "error")
    assert errors == [
        "unsafe_member_type: a device, not unpacked",
        "unsafe_member_type: a fifo, not unpacked",
        "unsafe_member_type: a hard link (to s1.png), not unpacked",
        "unsafe_member_type: a symbolic link (to /etc/passwd), not unpacked",
    ]
    staged = [p for p in staging.rglob("*") if not p.is_dir()]
    assert [p.name for p in staged] == ["s1.png"] and not any(p.is_symlink() for p in staged)
