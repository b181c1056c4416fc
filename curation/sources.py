"""Inputs of a curation run: one row per input, listed deterministically so partitions are stable.

Accepted inputs (``--input``):
- a local directory or fsspec prefix (``s3://bucket/raw/``), scanned recursively; kinds are
  detected from content later (probe), not from extensions. Sidecar files (``.json``, ``.txt``,
  ``.yaml``, ``.csv``, ``.md``) are skipped; ``.jsonl`` / ``.parquet`` files that look like
  manifests are read as manifests, and the media they reference are not listed twice.
- a manifest (JSONL or Parquet): ``uri`` (+ ``caption``), or for edits ``source``, ``target``,
  ``instruction`` (+ ``kind``). Relative paths are relative to the manifest.
- WebDataset tars (a ``.tar`` file, a brace pattern ``data-{000..009}.tar``, or a directory of
  tars): members are unpacked into ``OUTPUT/_staging/``; members with absolute paths or ``..``
  are refused (an error row), so nothing is written outside the output folder.

A line that cannot be read (broken JSON, missing ``uri``, broken UTF-8) is still an input: it
becomes an error row, so inputs = accepted + rejected + error holds.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import pyarrow.parquet as pq

from catalog.schema import make_key

SIDECAR_EXTENSIONS = {".json", ".txt", ".yaml", ".yml", ".csv", ".md", ".html"}
MANIFEST_EXTENSIONS = {".jsonl", ".parquet"}
CAPTION_EXTENSIONS = ("txt", "caption", "json")
EDIT_KINDS = ("image_edit", "video_edit")


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


def list_inputs(source: str, kind: str = "auto", staging: Path | None = None) -> list[dict]:
    """Every input of ``source`` as a row, sorted by key (stable partitions on rerun)."""
    forced = None if kind == "auto" else kind
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
        files = sorted(f for f in fs.find(path) if not _hidden(f, path))
        rows, referenced = [], set()
        plain = []
        for f in files:
            ext = PurePosixPath(f).suffix.lower()
            if ext in MANIFEST_EXTENSIONS and _looks_like_manifest(fs, f):
                manifest_rows = read_manifest(uri_of(f), forced)
                rows += manifest_rows
                for r in manifest_rows:
                    referenced.update({r["source_uri"], r.get("target_uri")})
            elif ext == ".tar":
                rows += read_tar(uri_of(f), _require_staging(staging), forced)
            elif ext in SIDECAR_EXTENSIONS or ext in MANIFEST_EXTENSIONS:
                continue
            else:
                plain.append(uri_of(f))
        if forced in EDIT_KINDS and plain and not rows:
            raise ValueError(
                f"--kind {forced}: edit pairs need a manifest with source, target, instruction "
                f"(JSONL or Parquet); {source} holds only plain files"
            )
        rows += [input_row(u, kind=forced) for u in plain if u not in referenced]
        return _finish(rows)
    ext = PurePosixPath(path).suffix.lower()
    if ext in MANIFEST_EXTENSIONS:
        return _finish(read_manifest(uri_of(path), forced))
    if ext == ".tar":
        return _finish(read_tar(uri_of(path), _require_staging(staging), forced))
    return _finish([input_row(uri_of(path), kind=forced)])


def read_manifest(uri: str, forced: str | None = None) -> list[dict]:
    """Rows of a JSONL or Parquet manifest; unreadable lines become error rows."""
    base = posixpath.dirname(uri)
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
        rows.append(_manifest_row(rec, base, where, forced))
    return rows


def _manifest_row(rec: dict, base: str, where: str, forced: str | None) -> dict:
    def resolve(p: Any) -> str:
        p = str(p)
        return p if "://" in p or p.startswith("/") else posixpath.normpath(posixpath.join(base, p))

    kind = rec.get("kind") or forced
    if "source" in rec or "target" in rec:
        if not rec.get("source") or not rec.get("target"):
            return error_input(where, "manifest_error", "an edit pair needs source and target")
        if kind not in EDIT_KINDS:
            kind = None  # image_edit or video_edit, decided from content at probe
        return input_row(
            resolve(rec["source"]),
            kind=kind,
            target_uri=resolve(rec["target"]),
            instruction=rec.get("instruction"),
            caption=rec.get("caption"),
        )
    if not rec.get("uri"):
        return error_input(where, "manifest_error", "missing 'uri' (or 'source' + 'target')")
    return input_row(resolve(rec["uri"]), kind=kind, caption=rec.get("caption"))


def read_tar(uri: str, staging: Path, forced: str | None = None) -> list[dict]:
    """Unpack a WebDataset tar into ``staging``; one input per sample key (media + caption)."""
    dest = staging / _safe_name(uri)
    groups: dict[str, dict[str, str]] = {}
    refused: list[dict] = []
    try:
        with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
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
                target = dest.joinpath(*parts)
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


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root)
    return any(part.startswith((".", "_")) for part in PurePosixPath(rel).parts)


def _require_staging(staging: Path | None) -> Path:
    if staging is None:
        raise ValueError("reading WebDataset tars needs a staging folder (the run's output)")
    return staging


def _safe_name(uri: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in uri)[-120:]


def _brace_expand(pattern: str) -> list[str]:
    import braceexpand  # webdataset's dependency

    return list(braceexpand.braceexpand(pattern))
