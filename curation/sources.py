"""Inputs of a curation run: one row per input, listed deterministically so partitions are stable.

Accepted inputs (``--input``):
- a local directory or fsspec prefix (``s3://bucket/raw/``), scanned recursively; kinds are
  detected from content later (probe), not from extensions. Sidecar files (``.json``, ``.txt``,
  ``.yaml``, ``.csv``, ``.md``) are skipped; ``.jsonl`` / ``.parquet`` files that look like
  manifests are read as manifests, and the media they reference are not listed twice.
- a manifest (JSONL or Parquet): ``uri`` (+ ``caption``), or for edits ``source``, ``target``,
  ``instruction`` (+ ``kind``). Relative paths are relative to the manifest; a ``file://`` URL
  is listed as its local path.
- WebDataset tars (a ``.tar`` file, a brace pattern ``data-{000..009}.tar``, or a directory of
  tars): regular members are unpacked into ``OUTPUT/_staging/``; members with absolute paths
  or ``..`` (``unsafe_member_path``) and links, devices or fifos (``unsafe_member_type``)
  become error rows, so nothing is written or read outside the staging folder.

Inputs are confined to the input root: the directory for a directory input, the manifest's
folder for a manifest, the staging folder for tar members, the prefix for an fsspec URI.
Symlinks and ``..`` are resolved before the check (a symlinked folder is never followed
outside the root), and in a manifest a ``file://`` URL is checked as the local path it is,
while any other scheme (``http``, ``s3``, ...) is outside unless allowed. ``allow`` (the
config's ``allow_inputs``) lists more places: local folders, or URI prefixes such as
``s3://bucket/raw/``. An input outside all of them is an error row ``outside_input_root``
whose detail names the resolved target; nothing is read from it.

Every input is a row, even one that is not read: hidden and underscore files (``.name``,
``_name``, or anything inside such a folder) are ``rejected`` rows with the reason
``skipped_hidden`` (final: no stage reads them, see ``curation/stages/base.py``), files that
are not regular files (fifos, sockets, devices) are ``not_a_regular_file`` errors, and a line
that cannot be read (broken JSON, missing ``uri``, broken UTF-8) is an error row, so
inputs = accepted + rejected + error holds. Not listed at all: the run's staging folder and
its output folder (the staging folder's parent) when they lie inside the input folder, so a
rerun never reads its own shards.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec
import pyarrow.parquet as pq

from catalog.schema import EDIT_KINDS, make_key

SIDECAR_EXTENSIONS = {".json", ".txt", ".yaml", ".yml", ".csv", ".md", ".html"}
MANIFEST_EXTENSIONS = {".jsonl", ".parquet"}
CAPTION_EXTENSIONS = ("txt", "caption", "json")


def input_row(uri: str, **fields: Any) -> dict[str, Any]:
    target = fields.get("target_uri")
    key = make_key(uri, target_uri=target)
    row = {
        "key": key,
        "input_id": key,
        "source_uri": uri,
        "kind": None,
        "caption": None,
        "instruction": None,
        "target_uri": None,
        "status": None,
        "reasons": [],
    }
    row.update(fields)
    return row


VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".ts", ".mpg", ".mpeg"}


def error_input(uri: str, reason: str, detail: str = "") -> dict[str, Any]:
    """An input that failed before probing; its kind is guessed from the extension."""
    ext = PurePosixPath(uri.split("#", 1)[0]).suffix.lower()
    row = input_row(uri, kind="video" if ext in VIDEO_EXTENSIONS else "image")
    row["status"] = "error"
    row["reasons"] = [f"{reason}: {detail}" if detail else reason]
    return row


def rejected_input(uri: str, reason: str, detail: str = "") -> dict[str, Any]:
    """An input rejected by the listing without being read (e.g. a hidden file)."""
    row = error_input(uri, reason, detail)
    row["status"] = "rejected"
    return row


OUTSIDE = "outside_input_root"


class Scope:
    """Where inputs may be read from: the input root plus the allow-list.

    Local places are compared after resolving symlinks and ``..`` (``os.path.realpath``);
    URIs after normalising ``..`` (also percent-encoded) in their path, so a prefix
    ``s3://bucket/raw/`` admits ``s3://bucket/raw/x.png`` but not ``s3://bucket/raw2/x`` or
    ``s3://bucket/raw/../secret``.
    """

    def __init__(self, root: str, allow: Iterable[str] = ()):
        self.root = root
        self.local: list[str] = []
        self.remote: list[str] = []
        for entry in [root, *allow]:
            entry = str(entry).strip()
            if not entry:
                continue
            path = _local_path(entry)
            if path is not None:
                self.local.append(os.path.realpath(os.path.expanduser(path)))
            else:
                self.remote.append(_uri_key(entry).rstrip("/") + "/")

    def refusal(self, target: str) -> str | None:
        """None when ``target`` (a path or URI) lies inside; else what it resolves to."""
        path = _local_path(target)
        if path is not None:
            real = os.path.realpath(path)
            return None if any(_within(real, r) for r in self.local) else real
        keys = _uri_keys(target)
        for prefix in self.remote:
            if all(k == prefix[:-1] or k.startswith(prefix) for k in keys):
                return None
        return keys[0]

    def detail(self, given: str, resolved: str) -> str:
        shown = given if len(given) <= 200 else given[:200] + "..."
        via = "" if resolved == given else f" resolves to {resolved}, which"
        return f"{shown}{via} is outside the input root {self.root} (allow it with allow_inputs)"


def list_inputs(
    source: str,
    kind: str = "auto",
    staging: Path | None = None,
    allow: Iterable[str] = (),
) -> list[dict]:
    """Every input of ``source`` as a row, sorted by key (stable partitions on rerun).

    ``staging`` is the run's staging folder, ``OUTPUT/_staging`` (tars are unpacked there);
    neither it nor its parent, the run's output folder, is listed when inside the input
    folder. ``allow``: local folders or URI prefixes outside the input root that inputs may
    come from (the config's ``allow_inputs``).
    """
    forced = None if kind == "auto" else kind
    allow = [str(a) for a in allow]
    fs, path = fsspec.core.url_to_fs(source)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")

    def uri_of(p: str) -> str:
        return p if local else fs.unstrip_protocol(p)

    if "{" in source and source.rstrip("/").endswith(".tar"):
        rows = []
        for expanded in _brace_expand(source):
            rows += read_tar(expanded, _require_staging(staging), forced)
        return _finish(rows)
    if not fs.exists(path):
        raise FileNotFoundError(f"--input {source}: no such file or directory")
    if fs.isdir(path):
        scope = Scope(uri_of(path), allow)
        if local:
            entries, rows = _scan_local(path, scope, _not_listed(path, staging))
        else:
            entries = [(f, uri_of(f), _hidden_part(f, path)) for f in sorted(fs.find(path))]
            rows = []
        referenced, plain, hidden, listed = set(), [], [], 0
        for fs_path, uri, hidden_part in entries:
            ext = PurePosixPath(uri).suffix.lower()
            if ext in SIDECAR_EXTENSIONS:
                continue  # not an input, hidden or not
            if hidden_part is not None:
                hidden.append((uri, hidden_part))
            elif ext in MANIFEST_EXTENSIONS and _looks_like_manifest(fs, fs_path):
                manifest_rows = read_manifest(uri, forced, scope=scope)
                rows += manifest_rows
                listed += len(manifest_rows)
                for r in manifest_rows:
                    referenced.update({r["source_uri"], r.get("target_uri")})
            elif ext == ".tar":
                tar_rows = read_tar(uri, _require_staging(staging), forced)
                rows += tar_rows
                listed += len(tar_rows)
            elif ext in MANIFEST_EXTENSIONS:
                continue  # a JSONL/Parquet sidecar (e.g. labels)
            else:
                plain.append(uri)
        if forced in EDIT_KINDS and plain and not listed:
            raise ValueError(
                f"--kind {forced}: edit pairs need a manifest with source, target, instruction "
                f"(JSONL or Parquet); {source} holds only plain files"
            )
        rows += [input_row(u, kind=forced) for u in plain if u not in referenced]
        listed_uris = referenced | set(plain)
        rows += [
            rejected_input(u, "skipped_hidden", f"{part!r} starts with '.' or '_'")
            for u, part in hidden
            if u not in listed_uris
        ]
        return _finish(rows)
    ext = PurePosixPath(path).suffix.lower()
    if ext in MANIFEST_EXTENSIONS:
        return _finish(read_manifest(uri_of(path), forced, allow=allow))
    if ext == ".tar":
        return _finish(read_tar(uri_of(path), _require_staging(staging), forced))
    return _finish([input_row(uri_of(path), kind=forced)])


def _scan_local(
    root: str, scope: Scope, not_listed: set[str]
) -> tuple[list[tuple[str, str, str | None]], list[dict]]:
    """Files under a local folder as ``(path, uri, hidden part)``, plus the error rows of
    entries that are refused: links leading outside the scope, non-regular files.

    Symlinks are resolved, never walked through: a link to a file is listed as its target (a
    target inside the root under the root's path, so it is one input with the file itself);
    a link to a folder inside the root is not followed (its files are listed where they are);
    a link to a folder in ``allow`` is walked at its resolved place."""
    entries: list[tuple[str, str, str | None]] = []
    rows: list[dict] = []
    real_root = os.path.realpath(root)
    walked = {real_root}

    def add_file(path: str, uri: str, hidden: str | None) -> None:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            rows.append(error_input(uri, "unreadable_input", e.strerror or str(e)))
            return
        if stat.S_ISREG(mode):
            entries.append((uri, uri, hidden))
        else:
            rows.append(error_input(uri, "not_a_regular_file", _file_type(mode)))

    def walk(folder: str, hidden: str | None) -> None:
        try:
            with os.scandir(folder) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as e:
            rows.append(error_input(folder, "unreadable_input", e.strerror or str(e)))
            return
        for item in items:
            path = f"{folder.rstrip('/')}/{item.name}"
            part = hidden if hidden is not None else _hidden_name(item.name)
            if item.is_symlink():
                real = os.path.realpath(path)
                resolved = scope.refusal(real)
                if resolved is not None:
                    rows.append(error_input(path, OUTSIDE, scope.detail(path, resolved)))
                elif os.path.isdir(real):
                    if not _within(real, real_root) and real not in walked:
                        walked.add(real)
                        walk(real, part)
                elif any(_within(real, n) for n in not_listed):
                    continue  # a link into the run's own output
                elif _within(real, real_root):
                    rel = os.path.relpath(real, real_root)
                    add_file(real, f"{root.rstrip('/')}/{rel}", _hidden_part(rel, ""))
                else:
                    add_file(real, real, part)
            elif item.is_dir(follow_symlinks=False):
                if os.path.realpath(path) not in not_listed:
                    walk(path, part)
            else:
                add_file(path, path, part)

    walk(root, None)
    return entries, rows


def _not_listed(root: str, staging: Path | None) -> set[str]:
    """The run's own folders under ``root`` (resolved): its staging folder and its output."""
    if staging is None:
        return set()
    real_root = os.path.realpath(root)
    out = set()
    for folder in (Path(staging), Path(staging).parent):
        real = os.path.realpath(folder)
        if real == real_root:
            raise ValueError(
                f"--output {Path(staging).parent} is the --input folder {root}: the run's "
                "shards would be read back as inputs; choose an output folder outside it"
            )
        if _within(real, real_root):
            out.add(real)
    return out


def read_manifest(
    uri: str, forced: str | None = None, scope: Scope | None = None, allow: Iterable[str] = ()
) -> list[dict]:
    """Rows of a JSONL or Parquet manifest; unreadable lines become error rows, and so do
    lines naming media outside ``scope`` (default: the manifest's folder + ``allow``)."""
    base = posixpath.dirname(uri)
    scope = scope or Scope(base, allow)
    if uri.lower().endswith(".parquet"):
        with fsspec.open(uri, "rb") as f:
            records = [(i + 1, r, None) for i, r in enumerate(pq.read_table(f).to_pylist())]
    else:
        records = []
        with fsspec.open(uri, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    records.append((n, json.loads(raw.decode("utf-8")), None))
                except UnicodeDecodeError as e:
                    records.append((n, None, f"broken UTF-8: {e.reason}"))
                except json.JSONDecodeError as e:
                    records.append((n, None, f"invalid JSON: {e.msg}"))
    rows = []
    for n, rec, problem in records:
        where = f"{uri}#L{n}"
        if problem is None and not isinstance(rec, dict):
            problem = "a manifest line must be a JSON object"
        if problem is not None:
            rows.append(error_input(where, "manifest_error", problem))
            continue
        rows.append(_manifest_row(rec, base, where, forced, scope))
    return rows


def _manifest_row(rec: dict, base: str, where: str, forced: str | None, scope: Scope) -> dict:
    kind = rec.get("kind") or forced
    if "source" in rec or "target" in rec:
        if not rec.get("source") or not rec.get("target"):
            return error_input(where, "manifest_error", "an edit pair needs source and target")
        given = [str(rec["source"]), str(rec["target"])]
    elif not rec.get("uri"):
        return error_input(where, "manifest_error", "missing 'uri' (or 'source' + 'target')")
    else:
        given = [str(rec["uri"])]
    uris = [_resolve_entry(g, base) for g in given]
    for g, u in zip(given, uris, strict=True):
        resolved = scope.refusal(u)
        if resolved is not None:  # named by the manifest line, never read
            return error_input(where, OUTSIDE, scope.detail(g, resolved))
    if len(uris) == 2:
        if kind not in EDIT_KINDS:
            kind = None  # image_edit or video_edit, decided from content at probe
        return input_row(
            uris[0],
            kind=kind,
            target_uri=uris[1],
            instruction=rec.get("instruction"),
            caption=rec.get("caption"),
        )
    return input_row(uris[0], kind=kind, caption=rec.get("caption"))


def _resolve_entry(given: str, base: str) -> str:
    """A manifest entry as the uri of its row: relative paths joined to the manifest's folder
    and normalised, ``file://`` URLs as their local path, other URIs as they are."""
    if _scheme(given) is not None:
        path = _local_path(given)
        return posixpath.normpath(path) if path is not None else given
    if given.startswith("/"):
        return posixpath.normpath(given)
    if _scheme(base) is not None:
        return _normalize_uri(f"{base.rstrip('/')}/{given}")
    return posixpath.normpath(posixpath.join(base, given))


def read_tar(uri: str, staging: Path, forced: str | None = None) -> list[dict]:
    """Unpack a WebDataset tar into ``staging``; one input per sample key (media + caption)."""
    dest = staging / _safe_name(uri)
    groups: dict[str, dict[str, str]] = {}
    refused: list[dict] = []
    try:
        with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                name = member.name
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts or "\\" in name or not parts:
                    refused.append(
                        error_input(
                            f"{uri}#{name}",
                            "unsafe_member_path",
                            "absolute path or '..' in a tar member",
                        )
                    )
                    continue
                if not member.isfile():  # links, devices, fifos: never created or followed
                    refused.append(
                        error_input(f"{uri}#{name}", "unsafe_member_type", _member_type(member))
                    )
                    continue
                target = dest.joinpath(*parts)
                real_dest, real = os.path.realpath(dest), os.path.realpath(target)
                if not _within(real, real_dest):  # a link left in the staging folder
                    refused.append(
                        error_input(
                            f"{uri}#{name}",
                            OUTSIDE,
                            f"{target} resolves to {real}, outside the staging folder",
                        )
                    )
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    out.write(tar.extractfile(member).read())
                stem, _, ext = parts[-1].partition(".")
                key = str(PurePosixPath(*parts[:-1], stem))
                groups.setdefault(key, {})[ext.lower()] = str(target)
    except (tarfile.TarError, OSError, EOFError) as e:
        return refused + [error_input(uri, "tar_error", str(e))]
    rows = []
    for _key, members in sorted(groups.items()):
        media = [ext for ext in members if ext not in CAPTION_EXTENSIONS]
        if not media:
            continue  # a caption without media is not a sample
        caption = _caption(members)
        for ext in sorted(media):
            rows.append(input_row(members[ext], kind=forced, caption=caption))
    return refused + rows


def _caption(members: dict[str, str]) -> str | None:
    for ext in ("txt", "caption"):
        if ext in members:
            return Path(members[ext]).read_bytes().decode("utf-8", errors="replace").strip()
    if "json" in members:
        try:
            meta = json.loads(Path(members["json"]).read_bytes())
            if isinstance(meta, dict):
                return meta.get("caption") or meta.get("text")
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _looks_like_manifest(fs, path: str) -> bool:
    """A JSONL/Parquet file whose first record has a ``uri``, or a ``source`` and a ``target``
    (other JSONL files in a scanned folder, e.g. label dumps, are sidecars)."""
    try:
        with fs.open(path, "rb") as f:
            if path.lower().endswith(".parquet"):
                first = pq.ParquetFile(f).read_row_group(0).slice(0, 1).to_pylist()[0]
            else:
                first = json.loads(f.readline().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError, TypeError, IndexError):
        return False
    if not isinstance(first, dict):
        return False
    return bool(first.get("uri")) or bool(first.get("source") and first.get("target"))


def _finish(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in sorted(rows, key=lambda r: r["key"]):
        if row["key"] in seen:
            continue  # the same file listed twice (e.g. a manifest and a scan) is one input
        seen.add(row["key"])
        out.append(row)
    return out


def _hidden_name(name: str) -> str | None:
    return name if name.startswith((".", "_")) else None


def _hidden_part(path: str, root: str) -> str | None:
    """The first hidden or underscore name of ``path`` below ``root`` (None: not hidden)."""
    rel = posixpath.relpath(path, root) if root else path
    return next((p for p in PurePosixPath(rel).parts if _hidden_name(p)), None)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _scheme(uri: str) -> str | None:
    return uri.split("://", 1)[0].lower() if "://" in uri else None


def _local_path(uri: str) -> str | None:
    """The local path of a plain path or a ``file://`` URL; None for any other URI (and for a
    ``file://`` URL naming another host)."""
    scheme = _scheme(uri)
    if scheme is None:
        return uri
    if scheme not in ("file", "local"):
        return None
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        return None
    return unquote(parts.path) or "/"


def _normalize_uri(uri: str) -> str:
    """``scheme://host/a/../b`` -> ``scheme://host/b`` (``..`` cannot climb above the host)."""
    scheme, rest = uri.split("://", 1)
    netloc, _, path = rest.partition("/")
    norm = "/" + posixpath.normpath("/" + path).lstrip("/")
    if path.endswith("/") and norm != "/":
        norm += "/"
    return f"{scheme}://{netloc}{norm}"


def _uri_key(uri: str) -> str:
    """A URI for comparisons: normalised path, scheme and host in lower case."""
    scheme, rest = _normalize_uri(uri).split("://", 1)
    netloc, _, path = rest.partition("/")
    return f"{scheme.lower()}://{netloc.lower()}/{path}"


def _uri_keys(uri: str) -> list[str]:
    """The comparison keys of ``uri`` as written and as a server may decode it
    (``%2e%2e``, backslashes): both must lie inside an allowed prefix."""
    scheme, rest = uri.split("://", 1)
    decoded = f"{scheme}://{unquote(rest).replace(chr(92), '/')}"
    return [_uri_key(uri), _uri_key(decoded)]


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _member_type(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname}), not unpacked"
    if member.islnk():
        return f"a hard link (to {member.linkname}), not unpacked"
    if member.ischr() or member.isblk():
        return "a device, not unpacked"
    if member.isfifo():
        return "a fifo, not unpacked"
    return f"tar member type {member.type!r}, not unpacked"


def _require_staging(staging: Path | None) -> Path:
    if staging is None:
        raise ValueError("reading WebDataset tars needs a staging folder (the run's output)")
    return staging


def _safe_name(uri: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in uri)[-120:]


def _brace_expand(pattern: str) -> list[str]:
    import braceexpand  # webdataset's dependency

    return list(braceexpand.braceexpand(pattern))
