"""The catalog: system of record for datasets, versions, shards, runs and lineage.

``Catalog(url)`` opens (and migrates) a SQLite file by default or PostgreSQL
(``OMNIFORGE_CATALOG_URL`` / ``--catalog``). Writers follow one protocol:

    v = cat.begin_version("corpus", root_uri=out, config_hash=h)   # pending: invisible
    cat.add_shards(v.id, shards)                                   # as shards finish
    cat.commit_version(v.id, index_uri=out + "/index")             # counts from the index

The commit verifies every registered shard (present, recorded size, recorded sha256:
``catalog.verify``) and refuses the version if any is missing or corrupt; ``verify_shards``
runs the same check on demand (``omniforge catalog verify``).

A version is visible to readers (``get_version``, ``resolve``, ``latest``) only once committed.
Concurrent writers are safe: on SQLite every transaction starts with BEGIN IMMEDIATE (one
writer at a time, others wait up to the busy timeout); on PostgreSQL the unique constraint on
(dataset, version) plus a retry settles races.

One concept: the datasets and their versions, from allocation to commit and resolution; the
runs and lineage edges of the same catalog are ``catalog.runs`` (``RunLedger``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.compute as pc
from sqlalchemy import func, select
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

from catalog.db import (
    ENV_HOME,
    ENV_URL,
    CatalogError,
    NotFound,
    code_version,
    default_url,
    make_engine,
    migrate,
    require_existing,
)
from catalog.filters import parse_filter
from catalog.index import check_index_schema, open_index
from catalog.models import (
    Dataset,
    DatasetVersion,
    Shard,
    utcnow,
)
from catalog.names import DatasetRef, check_name
from catalog.records import Edge, Node, Resolution, RunInfo, ShardRecord, VersionInfo
from catalog.runs import RunLedger
from catalog.schema import STATUSES, count_by_status
from catalog.shards import ShardInfo, relative_to_root
from catalog.verify import ShardProblem, check_shards
from core.secrets import mask_urls

__all__ = [
    "ENV_HOME",
    "ENV_URL",
    "Catalog",
    "CatalogError",
    "Edge",
    "Node",
    "NotFound",
    "Resolution",
    "RunInfo",
    "ShardProblem",
    "ShardRecord",
    "VersionInfo",
    "migrate",
]


class Catalog(RunLedger):
    """``create=False``: open an existing catalog only (read-only commands); a missing SQLite
    file is ``NotFound`` instead of a new empty catalog."""

    def __init__(self, url: str | None = None, auto_migrate: bool = True, create: bool = True):
        self.url = url or default_url()
        if not create:
            require_existing(self.url)
        try:
            self.engine = make_engine(self.url)
            if auto_migrate:
                migrate(self.engine)
        except (ArgumentError, NoSuchModuleError):
            raise CatalogError(
                f"catalog URL {mask_urls(self.url)!r} is not a database URL: use "
                "sqlite:///FILE, a path to a SQLite file, or postgresql://USER@HOST/DB"
            ) from None
        except ModuleNotFoundError as e:  # the database's driver (psycopg) is not installed
            raise CatalogError(
                f"catalog URL {mask_urls(self.url)!r} needs the {e.name} package: "
                "pip install 'omniforge[postgres]'"
            ) from None
        except OperationalError as e:
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            raise CatalogError(
                f"cannot open the catalog at {mask_urls(self.url)}: {reason}"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    # -- datasets ------------------------------------------------------------------------------

    def create_dataset(self, name: str, description: str = "") -> int:
        """Get or create; returns the dataset id."""
        check_name(name)
        for _ in range(5):
            try:
                with self.session() as s:
                    return self._dataset(s, name, create=True, description=description).id
            except IntegrityError:  # created concurrently (PostgreSQL): read it next time
                continue
        raise CatalogError(f"could not create dataset {name!r}")

    def list_datasets(self) -> list[dict[str, Any]]:
        """One entry per dataset: name, committed versions, latest committed version."""
        out = []
        with self.session() as s:
            for ds in s.scalars(select(Dataset).order_by(Dataset.name)):
                committed = [v for v in ds.versions if v.status == "committed"]
                latest = committed[-1] if committed else None
                out.append(
                    {
                        "name": ds.name,
                        "description": ds.description,
                        "versions": len(committed),
                        "pending": sum(v.status == "pending" for v in ds.versions),
                        "latest": latest.version if latest else None,
                        "samples": latest.num_samples if latest else 0,
                        "counts": dict(latest.counts) if latest else {},
                        "committed_at": latest.committed_at if latest else None,
                    }
                )
        return out

    @staticmethod
    def _dataset(s: Session, name: str, create: bool = False, description: str = "") -> Dataset:
        ds = s.scalar(select(Dataset).where(Dataset.name == name))
        if ds is None:
            if not create:
                raise NotFound(f"dataset {name!r} is not in the catalog")
            ds = Dataset(name=name, description=description)
            s.add(ds)
            s.flush()
        return ds

    # -- versions ------------------------------------------------------------------------------

    def begin_version(
        self,
        name: str,
        *,
        root_uri: str | None = None,
        config_hash: str | None = None,
        code_version_: str | None = None,
        parent_id: int | None = None,
        run_id: int | None = None,
        note: str = "",
        reuse_pending: bool = True,
    ) -> VersionInfo:
        """Allocate the next version number as ``pending`` (invisible until committed).

        With ``reuse_pending`` a pending version of the same dataset, root and config hash
        (a run that was interrupted) is returned instead, so a rerun resumes into it.
        """
        check_name(name)
        cv = code_version_ or code_version()
        for _ in range(10):
            try:
                with self.session() as s:
                    ds = self._dataset(s, name, create=True)
                    if reuse_pending and root_uri is not None:
                        existing = self._written(s, ds.id, "pending", root_uri, config_hash)
                        if existing is not None:
                            return self._version_info(s, existing)
                    top = s.scalar(
                        select(func.max(DatasetVersion.version)).where(
                            DatasetVersion.dataset_id == ds.id
                        )
                    )
                    v = DatasetVersion(
                        dataset_id=ds.id,
                        version=(top or 0) + 1,
                        status="pending",
                        config_hash=config_hash,
                        code_version=cv,
                        parent_id=parent_id,
                        root_uri=root_uri,
                        run_id=run_id,
                        note=note,
                        counts={},
                    )
                    s.add(v)
                    s.flush()
                    return self._version_info(s, v)
            except IntegrityError:  # another writer took this number (PostgreSQL): retry
                continue
        raise CatalogError(f"could not allocate a version of {name!r} after 10 attempts")

    def add_shards(self, version_id: int, shards: Iterable[ShardInfo | ShardRecord]) -> int:
        """Register finished shards of a pending version (idempotent per shard uri)."""
        with self.session() as s:
            v = self._pending(s, version_id)
            known = set(s.scalars(select(Shard.uri).where(Shard.version_id == v.id)))
            added = 0
            for sh in shards:
                if sh.uri in known:
                    continue
                s.add(
                    Shard(
                        version_id=v.id,
                        uri=sh.uri,
                        bucket=sh.bucket,
                        num_samples=sh.num_samples,
                        num_bytes=sh.num_bytes,
                        sha256=sh.sha256,
                    )
                )
                known.add(sh.uri)
                added += 1
            return added

    def verify_shards(self, version_id: int) -> list[ShardProblem]:
        """Every registered shard of a version that is missing, has another size than
        recorded, or another sha256; empty when all are intact."""
        return check_shards(self.shards(version_id))

    def commit_version(self, version_id: int, index_uri: str) -> VersionInfo:
        """Make a pending version visible. Counts come from the index itself; the commit is
        refused when the index breaks the contract or disagrees with the registered shards,
        or when any registered shard is missing or differs from its recorded size or sha256."""
        problems = check_index_schema(index_uri)
        if problems:
            raise CatalogError(f"index {index_uri} breaks the sample contract: {problems}")
        table = open_index(index_uri).to_table(columns=["key", "status", "shard"])
        counts = count_by_status(table)
        unknown = set(counts) - set(STATUSES)
        if unknown:
            raise CatalogError(f"index {index_uri} has unknown statuses {sorted(unknown)}")
        if pc.count_distinct(table.column("key")).as_py() != table.num_rows:
            raise CatalogError(f"index {index_uri} has duplicate sample keys")
        # hashed before the write transaction: on SQLite it would block every other writer
        registered = self.shards(version_id)
        bad = check_shards(registered)
        if bad:
            raise CatalogError(
                f"{self.version_by_id(version_id).ref}: {len(bad)} of {len(registered)} shards "
                "are missing or corrupt: " + "; ".join(str(p) for p in bad)
            )
        with self.session() as s:
            v = self._pending(s, version_id)
            shards = list(v.shards)
            if {sh.uri for sh in shards} != {sh.uri for sh in registered}:
                raise CatalogError(
                    f"version {v.dataset.name}@{v.version}: shards were registered while the "
                    "commit verified them; commit again"
                )
            if shards:
                in_shards = sum(sh.num_samples for sh in shards)
                if in_shards != counts["accepted"]:
                    raise CatalogError(
                        f"version {v.dataset.name}@{v.version}: shards hold {in_shards} samples "
                        f"but the index has {counts['accepted']} accepted rows"
                    )
                accepted = table.filter(pc.equal(table.column("status"), "accepted"))
                named = set(accepted.column("shard").drop_null().to_pylist())
                registered = {relative_to_root(v.root_uri, sh.uri) for sh in shards}
                missing = sorted(named - registered)
                if missing:
                    raise CatalogError(f"index names unregistered shards: {missing[:5]}")
            v.status = "committed"
            v.index_uri = index_uri
            v.counts = counts
            v.num_samples = table.num_rows
            v.num_bytes = sum(sh.num_bytes for sh in shards)
            v.committed_at = utcnow()
            s.flush()
            return self._version_info(s, v)

    def attach_run(self, version_id: int, run_id: int) -> None:
        """Record the run that writes a pending version (a resumed run keeps using it)."""
        with self.session() as s:
            self._pending(s, version_id).run_id = run_id

    def fail_version(self, version_id: int, note: str = "") -> None:
        with self.session() as s:
            v = self._pending(s, version_id)
            v.status = "failed"
            v.note = note

    def get_version(
        self, name: str, version: int | str = "latest", include_pending: bool = False
    ) -> VersionInfo:
        with self.session() as s:
            ds = self._dataset(s, name)
            q = select(DatasetVersion).where(DatasetVersion.dataset_id == ds.id)
            if not include_pending:
                q = q.where(DatasetVersion.status == "committed")
            if version == "latest":
                v = s.scalar(q.order_by(DatasetVersion.version.desc()).limit(1))
            else:
                v = s.scalar(q.where(DatasetVersion.version == int(version)))
            if v is None:
                what = "no committed version" if version == "latest" else f"no version {version}"
                raise NotFound(
                    f"dataset {name!r} has {what}" + ("" if include_pending else " (committed)")
                )
            return self._version_info(s, v)

    def version_of(self, ref: str | DatasetRef) -> VersionInfo:
        """The committed version ``catalog://NAME@VERSION`` (or ``@latest``) names."""
        ref = DatasetRef.parse(ref) if isinstance(ref, str) else ref
        return self.get_version(ref.name, ref.version)

    def find_committed(self, name: str, root_uri: str, config_hash: str) -> VersionInfo | None:
        """The committed version written to ``root_uri`` with ``config_hash``, if any (a rerun
        of a finished job returns it instead of writing the same version again)."""
        with self.session() as s:
            ds = s.scalar(select(Dataset).where(Dataset.name == name))
            if ds is None:
                return None
            v = self._written(s, ds.id, "committed", root_uri, config_hash)
            return self._version_info(s, v) if v is not None else None

    def version_by_id(self, version_id: int) -> VersionInfo:
        with self.session() as s:
            return self._version_info(s, self._version_row(s, version_id))

    def list_versions(self, name: str, include_pending: bool = False) -> list[VersionInfo]:
        with self.session() as s:
            ds = self._dataset(s, name)
            return [
                self._version_info(s, v)
                for v in ds.versions
                if include_pending or v.status == "committed"
            ]

    def shards(self, version_id: int) -> list[ShardRecord]:
        with self.session() as s:
            rows = s.scalars(
                select(Shard).where(Shard.version_id == version_id).order_by(Shard.uri)
            )
            return [
                ShardRecord(r.uri, r.bucket, r.num_samples, r.num_bytes, r.sha256) for r in rows
            ]

    def resolve(self, ref: str | DatasetRef, filter: str | None = None) -> Resolution:
        """``catalog://NAME@VERSION`` (+ filter on index columns) -> shards and accepted keys."""
        info = self.version_of(ref)
        if info.index_uri is None:
            raise CatalogError(f"{info.ref} has no index")
        dataset = open_index(info.index_uri)
        expr = parse_filter(filter, dataset.schema.names) if filter else None
        accepted = pc.field("status") == "accepted"
        table = dataset.to_table(
            columns=["key", "shard", "bucket"],
            filter=accepted if expr is None else (accepted & expr),
        )
        wanted = set(table.column("shard").drop_null().to_pylist())
        shards = [
            sh for sh in self.shards(info.id) if relative_to_root(info.root_uri, sh.uri) in wanted
        ]
        buckets: dict[str, int] = {}
        for b in table.column("bucket").to_pylist():
            buckets[b] = buckets.get(b, 0) + 1
        return Resolution(
            version=info,
            filter=filter,
            shards=shards,
            keys=table.column("key").to_pylist(),
            num_matched=table.num_rows,
            buckets=buckets,
        )

    @staticmethod
    def _version_row(s: Session, version_id: int) -> DatasetVersion:
        v = s.get(DatasetVersion, version_id)
        if v is None:
            raise NotFound(f"no dataset version with id {version_id}")
        return v

    @staticmethod
    def _written(
        s: Session, dataset_id: int, status: str, root_uri: str, config_hash: str | None
    ) -> DatasetVersion | None:
        """The version of a dataset in ``status`` written to ``root_uri`` with ``config_hash``."""
        return s.scalar(
            select(DatasetVersion).where(
                DatasetVersion.dataset_id == dataset_id,
                DatasetVersion.status == status,
                DatasetVersion.root_uri == root_uri,
                DatasetVersion.config_hash == config_hash,
            )
        )

    def _pending(self, s: Session, version_id: int) -> DatasetVersion:
        v = self._version_row(s, version_id)
        if v.status != "pending":
            raise CatalogError(
                f"version {v.dataset.name}@{v.version} is {v.status}; only pending versions change"
            )
        return v

    @staticmethod
    def _version_info(s: Session, v: DatasetVersion) -> VersionInfo:
        num_shards = s.scalar(select(func.count(Shard.id)).where(Shard.version_id == v.id))
        return VersionInfo(
            id=v.id,
            dataset=v.dataset.name,
            version=v.version,
            status=v.status,
            counts=dict(v.counts or {}),
            num_samples=v.num_samples,
            num_bytes=v.num_bytes,
            num_shards=num_shards or 0,
            config_hash=v.config_hash,
            code_version=v.code_version,
            parent_id=v.parent_id,
            root_uri=v.root_uri,
            index_uri=v.index_uri,
            run_id=v.run_id,
            created_at=v.created_at,
            committed_at=v.committed_at,
        )
