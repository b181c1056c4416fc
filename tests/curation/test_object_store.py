"""Curation in and out of object storage: a real S3 server on 127.0.0.1 (``omniforge s3 up``,
moto's server mode) through the real s3fs / pyarrow clients; no patched calls."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from helpers import cli, sample_digests, small_corpus

from catalog.index import read_index
from catalog.records import Node
from catalog.store import Catalog
from core.config import load_config, to_plain
from core.storage import StorageError, location
from curation.config import CurationConfig
from curation.pipeline import load_run_config, reselect, run_curation

SETTINGS = ["ocr.enabled=false", "select.max_ocr_area=null", "block_size=2", "name=photos"]
VOLATILE = {"run_id", "shard"}  # which run wrote a row, and under which shard name


def contents(cat: Catalog, version) -> dict[str, dict[str, str]]:
    """Sample key -> sha256 of each member, read from the version's shards."""
    return sample_digests(s.uri for s in cat.shards(version.id))


def rows(index_uri: str) -> dict[str, dict]:
    return {
        r["key"]: {k: v for k, v in r.items() if k not in VOLATILE}
        for r in read_index(index_uri).to_pylist()
    }


@pytest.mark.slow
def test_curation_and_select_into_s3_equal_a_local_run(s3_bucket, tmp_path, ray_session):
    raw = small_corpus(tmp_path / "raw")
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    cfg = load_config(CurationConfig, None, SETTINGS)
    here = run_curation(str(raw), tmp_path / "local", cfg, catalog=cat)
    there = run_curation(str(raw), f"{s3_bucket}/curated/v1", cfg, catalog=cat)

    # the version lives in the bucket: the catalog records its URIs, nothing is local
    assert there.version.root_uri == f"{s3_bucket}/curated/v1"
    assert there.version.index_uri == f"{s3_bucket}/curated/v1/index"
    shards = cat.shards(there.version.id)
    assert shards and all(s.uri.startswith(f"{s3_bucket}/curated/v1/shards/") for s in shards)
    assert not list(Path.cwd().glob("s3:*")) and not (tmp_path / "s3:").exists()
    fs = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    written = {p.removeprefix(f"{bucket}/curated/v1/") for p in fs.find(bucket)}
    assert {"index/part-00000.parquet", "report.html", "summary.json", "config.yaml"} <= written
    assert not [p for p in written if p.startswith("_work/") or ".tmp" in p]
    assert "<html" in fs.cat_file(f"{bucket}/curated/v1/report.html").decode()

    # the same rows and the same shard contents as the local run
    assert rows(there.version.index_uri) == rows(here.version.index_uri)
    assert contents(cat, there.version) == contents(cat, here.version)
    assert there.version.counts == here.version.counts and here.version.counts["accepted"] > 0

    # the same command again finds the finished version in the bucket
    again = run_curation(str(raw), f"{s3_bucket}/curated/v1", cfg, catalog=cat)
    assert again.version.id == there.version.id

    # select reads the version from the bucket and writes a child version into it
    base = load_run_config(there.version.root_uri)
    tighter = load_config(CurationConfig, None, ["select.min_short_side=400"], base=to_plain(base))
    child = reselect(
        there.version.root_uri,
        f"{s3_bucket}/curated/v2",
        tighter,
        catalog=cat,
        parent=there.version,
    )
    assert child.version.parent_id == there.version.id
    assert child.version.root_uri == f"{s3_bucket}/curated/v2"
    new_rows = rows(child.version.index_uri)
    assert set(new_rows) == set(rows(there.version.index_uri))
    small = {k for k, r in new_rows.items() if r["status"] == "rejected"}
    assert small and child.version.counts["accepted"] < there.version.counts["accepted"]
    assert set(contents(cat, child.version)) == {
        k for k, r in new_rows.items() if r["status"] == "accepted"
    }
    up, _ = cat.lineage(Node("version", child.version.id))
    assert any(e.parent_label.startswith("catalog://photos@") for e in up)


@pytest.mark.slow
def test_the_cli_curates_from_s3_into_s3(s3_bucket, tmp_path):
    """Inputs listed from the bucket, output into it, through ``omniforge curate run``; the
    catalog verifies the shards it recorded there."""
    raw = small_corpus(tmp_path / "raw")
    fs = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    fs.put(f"{raw}/", f"{bucket}/raw/", recursive=True)
    db = f"sqlite:///{tmp_path / 'catalog.db'}"
    args = ["--catalog", db, *[x for s in SETTINGS for x in ("--set", s)]]
    done = cli(
        "curate", "run", "--input", f"{s3_bucket}/raw", "--output", f"{s3_bucket}/out", *args
    )
    assert done.returncode == 0, done.stderr
    assert f"report: {s3_bucket}/out/report.html" in done.stdout
    cat = Catalog(db)
    (version,) = cat.list_versions("photos")
    assert version.counts["accepted"] + version.counts["rejected"] + version.counts["error"] == 6
    keys = set(contents(cat, version))
    index = read_index(version.index_uri).to_pylist()
    assert {r["source_uri"].split("/raw/")[0] for r in index} == {s3_bucket}
    assert keys == {r["key"] for r in index if r["status"] == "accepted"}
    verified = cli("catalog", "verify", "catalog://photos@1", "--catalog", db)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    # the version deduplicated (against itself: every accepted sample repeats one kept there)
    dedup = cli("curate", "dedup", "catalog://photos@1", "--output", f"{s3_bucket}/dedup",
                "--against", "catalog://photos@1", "--catalog", db)  # fmt: skip
    assert dedup.returncode == 0, dedup.stderr
    child = cat.get_version("photos", 2)
    assert child.parent_id == version.id and child.root_uri == f"{s3_bucket}/dedup"
    assert child.counts["accepted"] == 0
    assert child.counts["rejected"] == version.counts["rejected"] + version.counts["accepted"]
    bad = cli("curate", "dedup", "catalog://photos@1", "--output", f"{s3_bucket}/x",
              "--against", "photos@1", "--catalog", db)  # fmt: skip
    assert bad.returncode == 2 and "--against photos@1: name a version as catalog://" in (
        bad.stderr
    ), bad.stderr


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/out", "the scheme ftp:// is not supported; use a local path, file://"),
        ("memory://out", "the scheme memory:// is not supported"),
        ("s3://", "name a bucket (and a prefix): s3://BUCKET/PREFIX"),
    ],
)
def test_an_unsupported_output_is_an_error_never_a_local_folder(
    uri, message, tmp_path, monkeypatch
):
    with pytest.raises(StorageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        location(uri, "--output")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    done = cli("curate", "run", "--input", str(small_corpus(tmp_path / "raw")), "--output", uri)
    assert done.returncode == 2
    assert f"--output {uri}: " in done.stderr and message in done.stderr
    assert list(cwd.iterdir()) == []


def test_a_missing_client_library_names_the_extra(monkeypatch):
    import sys

    registered = sys.modules["fsspec.registry"]._registry  # classes fsspec imported already
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed: import fails
    monkeypatch.delitem(registered, "gcs", raising=False)
    with pytest.raises(
        StorageError, match=r"needs its client library; pip install omniforge\[gcs\]"
    ):
        location("gs://bucket/out", "--output")


@pytest.mark.slow
def test_two_nodes_sharing_only_the_bucket_curate_what_one_node_does(s3_bucket, tmp_path):
    """A head (no CPUs for work) and two worker nodes of one CPU each, started on this
    machine by ``omniforge cluster up --workers 2``; the inputs and the output are in the
    bucket. The blocks run on both worker nodes and the version equals a one-node run's."""
    import urllib.request

    from helpers import free_port

    from orchestration.cluster_cmd import auth_headers

    raw = small_corpus(tmp_path / "raw")
    fs = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    fs.put(f"{raw}/", f"{bucket}/raw/", recursive=True)
    db = f"sqlite:///{tmp_path / 'catalog.db'}"
    args = ["--input", f"{s3_bucket}/raw", "--catalog", db]
    args += [x for s in [*SETTINGS, "block_size=1"] for x in ("--set", s)]

    single = cli("curate", "run", *args, "--output", f"{s3_bucket}/one-node")
    assert single.returncode == 0, single.stderr
    port, dashboard = free_port(), free_port()
    up = cli("cluster", "up", "--port", str(port), "--dashboard-port", str(dashboard),
             "--num-cpus", "0", "--workers", "2", "--worker-cpus", "1")  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert "2 worker node(s)" in up.stdout
        multi = cli(
            "curate", "run", *args, "--output", f"{s3_bucket}/two-nodes",
            "--address", f"127.0.0.1:{port}",
        )  # fmt: skip
        assert multi.returncode == 0, multi.stderr
        assert "workers: 2 CPU" in multi.stdout  # one on each worker node (1 CPU each)
        url = f"http://127.0.0.1:{dashboard}/api/v0/actors?detail=true&limit=1000"
        request = urllib.request.Request(url, headers=auth_headers())
        with urllib.request.urlopen(request, timeout=60) as response:
            actors = json.loads(response.read())["data"]["result"]["result"]
    finally:
        down = cli("cluster", "down")
    assert down.returncode == 0, down.stderr
    workers = [a for a in actors if a["class_name"] == "CpuWorker"]
    assert len({a["node_id"] for a in workers}) == 2, (multi.stdout, workers)  # one a node

    cat = Catalog(db)
    one, two = (cat.get_version("photos", v) for v in (1, 2))
    assert two.root_uri == f"{s3_bucket}/two-nodes"
    assert rows(two.index_uri) == rows(one.index_uri)
    assert contents(cat, two) == contents(cat, one)
