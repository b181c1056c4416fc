"""Catalog datasets and versions on a real SQLite database: create, commit, resolve, verify
(runs and lineage: test_runs.py; the Parquet index: test_index.py)."""

from pathlib import Path

import pytest
from helpers import sample_rows, write_version_files
from sqlalchemy import create_engine

from catalog.names import DatasetRef
from catalog.shards import sha256_file
from catalog.store import CatalogError, NotFound, migrate


def test_create_commit_and_read_back(cat, committed_version):
    v, rows = committed_version("demo", n=20)
    assert (v.dataset, v.version, v.status) == ("demo", 1, "committed")
    assert v.counts == {"accepted": 12, "rejected": 4, "error": 4}
    assert v.num_samples == 20 == sum(v.counts.values())
    shards = cat.shards(v.id)
    assert v.num_shards == len(shards) >= 3
    assert sum(s.num_samples for s in shards) == 12
    assert v.num_bytes == sum(s.num_bytes for s in shards)
    assert all(sha256_file(s.uri) == s.sha256 for s in shards)
    assert cat.get_version("demo", "latest") == v == cat.get_version("demo", 1)
    assert v.code_version and v.config_hash == "h0"
    listed = cat.list_datasets()
    assert [(d["name"], d["latest"], d["samples"]) for d in listed] == [("demo", 1, 20)]


def test_uncommitted_version_is_invisible(cat, committed_version, tmp_path):
    v1, _ = committed_version("demo")
    pending = cat.begin_version("demo", root_uri=str(tmp_path / "v2"), config_hash="other")
    assert pending.version == 2 and pending.status == "pending"
    assert cat.get_version("demo", "latest").version == 1
    with pytest.raises(NotFound, match="no version 2"):
        cat.get_version("demo", 2)
    with pytest.raises(NotFound):
        cat.resolve("catalog://demo@2")
    assert [v.version for v in cat.list_versions("demo")] == [1]
    assert [v.version for v in cat.list_versions("demo", include_pending=True)] == [1, 2]
    assert cat.list_datasets()[0]["pending"] == 1
    # a new dataset whose only version is pending has no latest
    cat.begin_version("fresh", root_uri=str(tmp_path / "f"))
    with pytest.raises(NotFound, match="no committed version"):
        cat.get_version("fresh")


def test_rerun_reuses_its_pending_version(cat, tmp_path):
    a = cat.begin_version("demo", root_uri=str(tmp_path / "out"), config_hash="h")
    b = cat.begin_version("demo", root_uri=str(tmp_path / "out"), config_hash="h")
    c = cat.begin_version("demo", root_uri=str(tmp_path / "out"), config_hash="different")
    assert a.id == b.id and c.id != a.id and c.version == 2


def test_commit_refuses_inconsistent_versions(cat, tmp_path):
    rows = sample_rows(10)
    root = tmp_path / "v"
    shards = write_version_files(root, rows)
    v = cat.begin_version("demo", root_uri=str(root))
    cat.add_shards(v.id, shards[:-1])  # one shard missing from the catalog
    with pytest.raises(CatalogError, match="shards hold"):
        cat.commit_version(v.id, str(root / "index"))
    with pytest.raises(FileNotFoundError, match="sample index not found"):
        cat.commit_version(v.id, str(tmp_path / "nowhere"))
    cat.add_shards(v.id, shards)  # idempotent for the ones already there
    assert cat.commit_version(v.id, str(root / "index")).status == "committed"
    with pytest.raises(CatalogError, match="only pending versions change"):
        cat.add_shards(v.id, shards)


def test_resolve_with_filter(cat, committed_version):
    v, rows = committed_version("demo", n=40)
    everything = cat.resolve("catalog://demo@latest")
    accepted = [r for r in rows if r["status"] == "accepted"]
    assert sorted(everything.keys) == sorted(r["key"] for r in accepted)
    assert sum(everything.buckets.values()) == len(accepted)
    assert {s.uri for s in everything.shards} == {s.uri for s in cat.shards(v.id)}

    res = cat.resolve(DatasetRef("demo", 1), filter="kind == 'video' and aesthetic >= 6")
    expected = [r["key"] for r in accepted if r["kind"] == "video" and r["aesthetic"] >= 6]
    assert sorted(res.keys) == sorted(expected) and expected
    # only shards holding a matching sample are returned
    holding = {r["shard"] for r in accepted if r["key"] in set(expected)}
    assert {s.uri.split(str(v.root_uri) + "/")[1] for s in res.shards} == holding
    assert len(res.shards) < len(everything.shards)
    with pytest.raises(ValueError, match="unknown column 'aesthetik'"):
        cat.resolve("catalog://demo@1", filter="aesthetik > 1")


def test_bad_names_and_references(cat):
    with pytest.raises(ValueError, match="dataset name '../etc' is invalid"):
        cat.create_dataset("../etc")
    assert DatasetRef.parse("catalog://demo@3") == DatasetRef("demo", 3)
    assert DatasetRef.parse("demo") == DatasetRef("demo", "latest")
    for bad in ["catalog://demo@0", "catalog://demo@v1", "catalog://", "catalog://a b@1"]:
        with pytest.raises(ValueError, match="catalog://NAME@VERSION|positive integer"):
            DatasetRef.parse(bad)


def test_migrations_match_models_and_are_idempotent(catalog_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from catalog.models import Base

    engine = create_engine(catalog_url)
    assert migrate(engine) == "0001"
    assert migrate(engine) == "0001"  # second run is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def tamper(shards) -> tuple[str, str]:
    """Delete the first shard, flip one byte of the second (same size): (deleted, changed)."""
    deleted, changed = Path(shards[0].uri), Path(shards[1].uri)
    deleted.unlink()
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    return str(deleted), str(changed)


def test_commit_refuses_missing_and_corrupt_shards(cat, tmp_path):
    root = tmp_path / "v"
    shards = write_version_files(root, sample_rows(20))
    assert len(shards) >= 3
    v = cat.begin_version("demo", root_uri=str(root))
    cat.add_shards(v.id, shards)
    deleted, changed = tamper(shards)
    assert Path(changed).stat().st_size == shards[1].num_bytes  # only the checksum differs

    with pytest.raises(CatalogError) as err:
        cat.commit_version(v.id, str(root / "index"))
    message = str(err.value)
    assert "\n" not in message
    assert f"catalog://demo@1: 2 of {len(shards)} shards are missing or corrupt" in message
    assert f"{deleted}: missing" in message
    assert f"{changed}: checksum mismatch" in message
    assert cat.version_by_id(v.id).status == "pending"  # nothing became visible
    problems = cat.verify_shards(v.id)
    assert sorted((p.uri, p.kind) for p in problems) == sorted(
        [(deleted, "missing"), (changed, "checksum")]
    )


def test_verify_shards_reports_wrong_sizes_and_accepts_intact_versions(cat, committed_version):
    v, _ = committed_version("demo")
    assert cat.verify_shards(v.id) == []
    shard = cat.shards(v.id)[0]
    with open(shard.uri, "ab") as f:
        f.write(b"\0" * 512)
    [problem] = cat.verify_shards(v.id)
    assert (problem.uri, problem.kind) == (shard.uri, "size")
    assert str(problem) == (
        f"{shard.uri}: wrong size: {shard.num_bytes + 512} bytes, recorded {shard.num_bytes}"
    )
