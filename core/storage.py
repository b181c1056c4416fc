"""Where outputs live: a local folder or an object store, behind one small API (fsspec).

``location(uri, field)`` checks a user-given output once, at the edge: a path or ``file://``
URI is a local folder (made absolute); ``s3://`` and ``gs://`` are object stores (s3fs and
gcsfs, the ``s3`` / ``gcs`` extras); anything else is an error naming ``field``, never a local
folder called ``s3:``. Credentials and endpoints are the clients' own standard places
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible
servers such as MinIO, ``~/.aws/*``; GCS application default credentials): never argv.

Object stores have no rename. Writers here never rely on one for correctness: a file counts
only once a record written after it names it (the curation journal, the shard list, the
catalog), so a crash leaves at worst an unlisted object that the next run removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import fsspec

# Listings are not cached: a curation output is written by many processes (Ray workers, the
# driver) and a cached listing would hide what another one wrote. Applied to every s3fs /
# gcsfs instance a process creates once this module is imported.
for _proto in ("s3", "gcs"):
    fsspec.config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)

# Files ``read_many`` asks an object store for at once. A loop of ``open`` + ``read`` waits for
# two round trips per file (s3fs: a HEAD, then the GET); a run's finish reads one journal
# record and one index part per block, thousands of them.
READ_AHEAD = 64

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# scheme -> (what to install, protocol name in fsspec)
OBJECT_STORES = {
    "s3": ("omniforge[s3] (s3fs)", "s3"),
    "s3a": ("omniforge[s3] (s3fs)", "s3"),
    "gs": ("omniforge[gcs] (gcsfs)", "gcs"),
    "gcs": ("omniforge[gcs] (gcsfs)", "gcs"),
}


class StorageError(ValueError):
    """A location that cannot be used: unknown scheme, missing client library."""


def scheme(uri: str | os.PathLike) -> str | None:
    """``s3`` for ``s3://b/k``; None for a plain path."""
    m = _SCHEME.match(str(uri))
    return m.group(1).lower() if m else None


def is_remote(uri: str | os.PathLike) -> bool:
    return scheme(uri) not in (None, "file")


@dataclass(frozen=True)
class Location:
    """A checked place: ``uri`` is an absolute local path or a ``scheme://`` URI (no trailing
    slash). ``join`` gives child URIs in the same form; ``fs`` / ``path`` are fsspec's."""

    uri: str

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    @cached_property
    def _fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(self.uri)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_path[0]

    @property
    def path(self) -> str:
        return self._fs_path[1]

    def join(self, *parts: str) -> str:
        return "/".join([self.uri, *(p.strip("/") for p in parts)])

    def local(self) -> Path:
        """The local folder (only for a local location)."""
        if self.remote:
            raise StorageError(f"{self.uri} is not a local folder")
        return Path(self.uri)

    def key(self) -> str:
        """A short stable name for this location (local lock and cache folders)."""
        return hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return self.uri


def location(uri: str | os.PathLike, field: str = "path") -> Location:
    """Check ``uri`` (a user-given ``field``) and return its ``Location``; raises
    ``StorageError`` naming the field for an unknown scheme or a missing client library."""
    text = str(uri)
    proto = scheme(text)
    if proto is None:
        return Location(str(Path(text).expanduser().resolve()))
    if proto == "file":
        return Location(str(Path(text[len("file://") :]).expanduser().resolve()))
    if proto not in OBJECT_STORES:
        known = ", ".join(f"{s}://" for s in ("s3", "gs"))
        raise StorageError(
            f"{field} {text}: the scheme {proto}:// is not supported; use a local path, "
            f"file://, or an object store ({known})"
        )
    extra, fs_proto = OBJECT_STORES[proto]
    try:
        fsspec.get_filesystem_class(fs_proto)
    except ImportError:
        raise StorageError(
            f"{field} {text}: {proto}:// needs its client library; pip install {extra}"
        ) from None
    if not text[len(proto) + 3 :].strip("/"):
        raise StorageError(f"{field} {text}: name a bucket (and a prefix): {proto}://BUCKET/PREFIX")
    return Location(text.rstrip("/"))


def home() -> Path:
    """``OMNIFORGE_HOME`` (default ``~/.omniforge``): local state, caches, service logs."""
    return Path(os.environ.get("OMNIFORGE_HOME") or Path.home() / ".omniforge")


def local_cache(loc: Location, what: str) -> Path:
    """A local folder kept for a remote ``loc`` (its lock, staging, report copy)."""
    folder = home() / what / loc.key()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def read_many(
    fs: fsspec.AbstractFileSystem, paths: Sequence[str], chunk: int = READ_AHEAD
) -> Iterator[bytes]:
    """The whole contents of each of ``paths``, in order, fetched ``chunk`` files at a time:
    s3fs and gcsfs send a chunk's GETs concurrently (a local folder reads them one by one).
    A file that cannot be read raises its error (``FileNotFoundError``, ``PermissionError``)."""
    for i in range(0, len(paths), chunk):
        # from byte 0: a read without a range costs s3fs a HEAD for the size first
        for data in fs.cat_ranges(list(paths[i : i + chunk]), 0, None, on_error="return"):
            if isinstance(data, BaseException):
                raise data
            yield data


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, tmp: str) -> None:
    """``data`` to ``path`` so that a reader sees the old file or the new one whole: an object
    store's put is atomic (one request; it has no folders to make); a local file is written to
    ``tmp`` (its folder made), flushed to disk (a rename never outlives its contents) and
    renamed."""
    if not is_local_fs(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        with contextlib.suppress(AttributeError, OSError, ValueError):  # no fsync there
            os.fsync(getattr(f, "f", f).fileno())  # fsspec's local file wraps the real one
    fs.mv(tmp, path)


def put_file(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file to ``uri`` (a local path or an object-store URI)."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(local), path)


def copy_tree(src: str, dst: str) -> int:
    """Copy every file under ``src`` to the same relative path under ``dst`` (either side a
    local folder or an object store; a missing ``src`` copies nothing); returns the count.

    Many small files (a run's thumbnails: one per rejected sample) go in as few round trips
    as the client allows: within one object store as server-side copies, between a store and
    a local folder as uploads or downloads, each sent many at a time; between two local
    folders as hard links (the files are never changed in place), a copy where none can be
    made (another disk)."""
    sfs, spath = fsspec.core.url_to_fs(src)
    dfs, dpath = fsspec.core.url_to_fs(dst)
    spath = spath.rstrip("/")
    if not sfs.isdir(spath):
        return 0
    files = [f for f in sfs.find(spath) if f != spath]
    if not files:
        return 0
    targets = [f"{dpath.rstrip('/')}/{f[len(spath) + 1 :]}" for f in files]
    local_src, local_dst = is_local_fs(sfs), is_local_fs(dfs)
    if local_dst:
        for folder in sorted({t.rsplit("/", 1)[0] for t in targets}):
            dfs.makedirs(folder, exist_ok=True)
    if local_src and local_dst:
        for f, t in zip(files, targets, strict=True):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)  # a copy made earlier (a rerun)
            try:
                os.link(f, t)
            except OSError:  # another file system, or one without links
                shutil.copyfile(f, t)
    elif local_src:
        dfs.put(files, targets)
    elif local_dst:
        sfs.get(files, targets)
    elif type(sfs) is type(dfs) and sfs.storage_options == dfs.storage_options:
        sfs.copy(files, targets)
    else:  # two different stores: through this machine
        for f, t in zip(files, targets, strict=True):
            dfs.pipe_file(t, sfs.cat_file(f))
    return len(files)


def read_text(uri: str) -> str:
    with fsspec.open(uri, "rt", encoding="utf-8") as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    """``uri`` whole or as it was: an object store's put is atomic; a local file is written to
    a temporary name and renamed."""
    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        fs.pipe_file(path, text.encode("utf-8"))
        return
    path = Path(uri.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def makedirs(uri: str) -> None:
    """The folder ``uri`` (an object store has none to make: a no-op there)."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)


def get_file(uri: str, local: str | os.PathLike) -> Path:
    """Copy ``uri`` (an object-store URI or a local path) to the local file ``local``."""
    fs, path = fsspec.core.url_to_fs(uri)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(path, str(local))
    return Path(local)


def exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)
