"""The sample index: Parquet files (one row per sample, the sample contract) per dataset version.

A version's index is a directory of Parquet files (one per finished partition, so a resumed
run only adds files) or a single file. Queries use pyarrow datasets so filters and column
selection are pushed down to row groups.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.schema import assert_valid, conform, validate_table
from core import storage  # also: its object-store settings apply to every fsspec client

if TYPE_CHECKING:
    import pyarrow.dataset as ds


def write_index_part(table: pa.Table, index_dir: str | Path, name: str) -> str:
    """Validate ``table`` against the contract and write ``index_dir/name.parquet`` atomically.

    A reader never sees half a file: the bytes are made in memory, then put in one request on
    an object store, or written to a temporary name and renamed (``storage.put_atomic``).
    """
    table = assert_valid(conform(table))
    fs, root = fsspec.core.url_to_fs(str(index_dir))
    final = f"{root.rstrip('/')}/{name}.parquet"
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=64_000, compression="zstd")
    tmp = f"{root.rstrip('/')}/.{name}.parquet.tmp-{os.getpid()}"
    storage.put_atomic(fs, final, buffer.getvalue().to_pybytes(), tmp)
    return final


def open_index(uri: str | Path) -> ds.Dataset:
    """A pyarrow dataset over a version's index (directory of Parquet files, or one file)."""
    import pyarrow.dataset as ds  # here: it imports pandas, which stage workers never need

    fs, root = fsspec.core.url_to_fs(str(uri))
    if not fs.exists(root):
        raise FileNotFoundError(f"sample index not found: {uri}")
    kw = dict(filesystem=fs, format="parquet", ignore_prefixes=[".", "_"])
    dataset = ds.dataset(root, **kw)
    # Parts written by different partitions may type an extra column differently (all-null in
    # one part): read every part's schema (footer only) and unify them.
    schemas = [f.physical_schema for f in dataset.get_fragments()]
    if len(schemas) > 1:
        dataset = ds.dataset(
            root, schema=pa.unify_schemas(schemas, promote_options="permissive"), **kw
        )
    return dataset


def query_index(
    uri: str | Path,
    filter: str | ds.Expression | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Rows of the index matching ``filter`` (a string expression or a pyarrow expression)."""
    from catalog.filters import parse_filter

    dataset = open_index(uri)
    expr = parse_filter(filter, dataset.schema.names) if isinstance(filter, str) else filter
    return dataset.to_table(columns=list(columns) if columns else None, filter=expr)


def check_index_schema(uri: str | Path) -> list[str]:
    """Contract problems of the index's schema (column presence and types; no row scan)."""
    dataset = open_index(uri)
    return validate_table(dataset.schema.empty_table())


def read_index(uri: str | Path) -> pa.Table:
    return open_index(uri).to_table()
