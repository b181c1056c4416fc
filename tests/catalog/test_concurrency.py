"""Two processes registering versions of one dataset at once lose nothing."""

import multiprocessing as mp
from pathlib import Path

import pytest

from catalog.store import Catalog

VERSIONS_PER_WRITER = 6


def _writer(url: str, root: str, writer: int, barrier, results) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from helpers import sample_rows, write_version_files

    barrier.wait()  # both open a fresh database (and migrate it) at the same moment
    cat = Catalog(url)
    mine = []
    for i in range(VERSIONS_PER_WRITER):
        out = Path(root) / f"w{writer}-{i}"
        rows = sample_rows(8, seed=writer * 100 + i)
        shards = write_version_files(out, rows)
        v = cat.begin_version("shared", root_uri=str(out), config_hash=f"w{writer}-{i}")
        cat.add_shards(v.id, shards)
        cat.commit_version(v.id, str(out / "index"))
        mine.append(v.version)
    results.put((writer, mine))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_processes_register_versions_concurrently(backend, tmp_path, request):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
    else:  # a real server (``omniforge postgres up``): unique constraint + retry
        url = request.getfixturevalue("postgres_server").database()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, str(tmp_path), w, barrier, results)) for w in (0, 1)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    cat = Catalog(url)
    versions = cat.list_versions("shared")
    numbers = sorted(v.version for v in versions)
    assert numbers == list(range(1, 2 * VERSIONS_PER_WRITER + 1))
    assert sorted(got[0] + got[1]) == numbers  # each writer got distinct numbers
    for v in versions:
        assert v.status == "committed"
        assert v.num_samples == 8 and sum(v.counts.values()) == 8
        assert v.num_shards == len(cat.shards(v.id)) > 0
        writer, i = v.config_hash[1:].split("-")
        assert v.root_uri.endswith(f"w{writer}-{i}")
