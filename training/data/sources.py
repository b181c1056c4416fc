"""Where a task's shards come from: a recipe data entry resolved to shards and usable counts.

``catalog://NAME@VERSION`` (+ a filter on index columns) resolves through the catalog and the
version's index (no shard is opened); shard paths, globs and directories (every ``*.tar``
below) are listed with fsspec and scanned (tar headers and ``KEY.json`` members). A shard's
bucket is its record's, or for a path the name of its parent folder.

The entry's held-out split (``holdout.py``) is planned here, over its accepted samples before
any filter: ``DataSource.split`` (None when the entry has no split) and the held-out samples
per shard and kind, so that ``counts_for(task, part)`` gives a training loader its training
counts and an evaluation loader its held-out ones without opening a shard again.
"""

from __future__ import annotations

import glob as _glob
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec

from catalog.shards import relative_to_root
from training.data.holdout import Split, held_counts, plan_split
from training.data.samples import scan_keys
from training.tasks import task_spec

__all__ = ["DataSource", "Part", "parent_name", "resolve_data", "shard_entry"]

Part = str  # "train" (held-out samples skipped), "eval" (held-out only), "all"


@dataclass
class DataSource:
    """Shards of one recipe data entry, with usable counts per shard and kind."""

    uri: str  # as resolved: catalog://NAME@N (concrete version) or the path / glob
    shards: list[tuple[str, str]]  # (uri, shard bucket), sorted
    kind_counts: dict[str, Counter]  # shard uri -> {kind: samples}
    keys: frozenset[str] | None = None  # allowed keys (catalog filter), None = all
    split: Split | None = None  # the held-out split, None = none (evaluation reads training)
    held: dict[str, Counter] | None = None  # shard uri -> {kind: held-out samples}

    def counts_for(self, task: str, part: Part = "train") -> dict[str, int]:
        """Usable samples per shard for ``task``: its training samples (``"train"``), its
        held-out ones (``"eval"``) or all of them (``"all"``). Without a split, every part is
        all the samples (evaluation reads training samples)."""
        kind = task_spec(task).kind
        every = {u: c.get(kind, 0) for u, c in self.kind_counts.items()}
        if self.split is None or part == "all":
            return every
        held = {u: (self.held or {}).get(u, Counter()).get(kind, 0) for u in every}
        if part == "eval":
            return held
        if part != "train":
            raise ValueError(f"part {part!r}; allowed: train, eval, all")
        return {u: every[u] - held[u] for u in every}


def shard_entry(item: Any) -> tuple[str, str, int | None]:
    """(uri, shard bucket, num_samples or None) from a ``ShardRecord``-like object (``uri``,
    ``bucket``, ``num_samples``), a ``(uri, bucket[, num_samples])`` tuple or a plain uri
    (bucket = parent folder)."""
    if isinstance(item, str):
        return item, parent_name(item), None
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return str(item[0]), str(item[1]), None
        if len(item) == 3:
            return str(item[0]), str(item[1]), int(item[2])
        raise ValueError(f"shard tuple must be (uri, bucket[, num_samples]), got {item!r}")
    uri = getattr(item, "uri", None)
    if uri is None:
        raise TypeError(f"shard entry {item!r} has no uri")
    bucket = getattr(item, "bucket", None) or parent_name(uri)
    n = getattr(item, "num_samples", None)
    return str(uri), str(bucket), None if n is None else int(n)


def parent_name(uri: str) -> str:
    parts = uri.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else ""


def _glob_shards(uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(uri)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if _glob.has_magic(path):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(".tar")]
    else:
        found = [path]
    found = [p for p in found if p.endswith(".tar") and not p.rsplit("/", 1)[-1].startswith(".")]
    if not found:
        raise FileNotFoundError(f"no shards (*.tar) match {uri!r}")
    return sorted(p if local else fs.unstrip_protocol(p) for p in found)


def resolve_data(data: Any, catalog: Any = None) -> DataSource:
    """A recipe ``DataConfig`` -> its shards and per-shard kind counts.

    ``catalog://NAME@VERSION`` (+ filter) goes through ``Catalog.resolve`` and the version's
    index (no shard is opened); paths / globs / directories are globbed with fsspec (a
    directory means every ``*.tar`` below it; the shard bucket is the parent folder name) and
    scanned.
    """
    from catalog.names import is_catalog_uri

    uri, filt = data.uri, getattr(data, "filter", None)
    rule = getattr(data, "holdout", None)
    rule = rule if rule is not None and rule.enabled else None
    if not is_catalog_uri(uri):
        uris = _glob_shards(uri)
        scanned = {u: scan_keys(u) for u in uris}
        kind_counts = {u: Counter(kind for _, kind in rows) for u, rows in scanned.items()}
        src = DataSource(uri, [(u, parent_name(u)) for u in uris], kind_counts)
        if rule is not None:
            src.split = plan_split(rule, (r for rows in scanned.values() for r in rows))
            src.held = {u: held_counts(src.split, rows) for u, rows in scanned.items()}
        return src

    import pyarrow as pa
    import pyarrow.compute as pc

    from catalog.index import open_index
    from catalog.store import Catalog

    cat = catalog if catalog is not None else Catalog()
    try:
        res = cat.resolve(uri, filt)
    finally:
        if catalog is None:
            cat.close()
    table = open_index(res.version.index_uri).to_table(
        columns=["key", "kind", "shard"], filter=pc.field("status") == "accepted"
    )
    keys = frozenset(res.keys) if filt else None
    # the split over the version's accepted samples, before the filter (holdout.py)
    split = None
    if rule is not None:
        pairs = zip(table.column("key").to_pylist(), table.column("kind").to_pylist(), strict=True)
        split = plan_split(rule, pairs)
    if keys is not None:
        allowed = pa.array(sorted(keys), type=table.column("key").type)
        table = table.filter(pc.is_in(table.column("key"), value_set=allowed))
    by_rel: dict[str, Counter] = {}
    held_rel: dict[str, Counter] = {}
    for key, rel, kind in zip(
        table.column("key").to_pylist(),
        table.column("shard").to_pylist(),
        table.column("kind").to_pylist(),
        strict=True,
    ):
        if rel is not None:
            by_rel.setdefault(rel, Counter())[kind] += 1
            if split is not None and split.held_out(key, kind):
                held_rel.setdefault(rel, Counter())[kind] += 1
    root = res.version.root_uri
    rels = {sh.uri: relative_to_root(root, sh.uri) for sh in res.shards}
    kind_counts = {u: by_rel.get(rel, Counter()) for u, rel in rels.items()}
    held = {u: held_rel.get(rel, Counter()) for u, rel in rels.items()} if split else None
    if split is not None:  # what the entry's tasks see: after the filter
        total, out = sum(by_rel.values(), Counter()), sum(held_rel.values(), Counter())
        split.counts = {k: (total[k] - out[k], out[k]) for k in sorted(total)}
    shards = sorted((sh.uri, sh.bucket) for sh in res.shards)
    return DataSource(res.version.ref, shards, kind_counts, keys, split, held)
