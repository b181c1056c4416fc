"""Manifests (JSONL or Parquet): one row per line, ``uri`` (+ ``caption``), or for edit pairs
``source``, ``target``, ``instruction`` (+ ``kind``).

Relative paths are relative to the manifest; a ``file://`` URL is listed as its local path. A
line that cannot be read (broken JSON, missing ``uri``, broken UTF-8) or that names media
outside the scope (``curation.sources.scope``) is an error row.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable

import fsspec
import pyarrow.parquet as pq

from catalog.schema import EDIT_KINDS
from curation.sources.rows import error_input, input_row
from curation.sources.scope import OUTSIDE, Scope, local_path_of, normalize_uri, scheme_of


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
    if scheme_of(given) is not None:
        path = local_path_of(given)
        return posixpath.normpath(path) if path is not None else given
    if given.startswith("/"):
        return posixpath.normpath(given)
    if scheme_of(base) is not None:
        return normalize_uri(f"{base.rstrip('/')}/{given}")
    return posixpath.normpath(posixpath.join(base, given))


def looks_like_manifest(fs, path: str) -> bool:
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
