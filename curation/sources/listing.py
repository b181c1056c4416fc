"""``list_inputs``: every input of ``--input`` as a row, sorted by key (stable partitions).

A directory (local, or an fsspec prefix) is scanned recursively: sidecar files are skipped,
manifests and tars in it are read (``curation.sources.manifest``, ``curation.sources.tars``;
the media a manifest references are not listed twice), hidden and underscore files are
``skipped_hidden`` rows, non-regular files ``not_a_regular_file`` errors, and the run's own
staging and output folders are not listed. Local links are resolved, never walked through out
of the scope (``curation.sources.scope``).
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import fsspec

from catalog.schema import EDIT_KINDS
from curation.sources.conversations import looks_like_conversations, read_conversations
from curation.sources.manifest import looks_like_manifest, read_manifest
from curation.sources.rows import error_input, input_row, rejected_input
from curation.sources.scope import OUTSIDE, Scope, within
from curation.sources.tars import brace_expand, read_tar, require_staging

SIDECAR_EXTENSIONS = {".json", ".txt", ".yaml", ".yml", ".csv", ".md", ".html"}
MANIFEST_EXTENSIONS = {".jsonl", ".parquet"}
CONVERSATION_EXTENSIONS = {".json", ".jsonl"}  # LLaVA-style records (sources/conversations.py)


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
    conversations_only = kind == "conversation"  # media no record names are not inputs
    forced = None if kind in ("auto", "conversation") else kind
    allow = [str(a) for a in allow]
    fs, path = fsspec.core.url_to_fs(source)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")

    def uri_of(p: str) -> str:
        return p if local else fs.unstrip_protocol(p)

    if "{" in source and source.rstrip("/").endswith(".tar"):
        rows = []
        for expanded in brace_expand(source):
            rows += read_tar(expanded, require_staging(staging), forced)
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
            if (
                hidden_part is None
                and ext in CONVERSATION_EXTENSIONS
                and looks_like_conversations(fs, fs_path)
                and not (ext == ".jsonl" and looks_like_manifest(fs, fs_path))
            ):
                conversation_rows = read_conversations(uri, scope=scope)
                rows += conversation_rows
                listed += len(conversation_rows)
                referenced.update(r["source_uri"] for r in conversation_rows)
                continue
            if ext in SIDECAR_EXTENSIONS:
                continue  # not an input, hidden or not
            if hidden_part is not None:
                hidden.append((uri, hidden_part))
            elif ext in MANIFEST_EXTENSIONS and looks_like_manifest(fs, fs_path):
                manifest_rows = read_manifest(uri, forced, scope=scope)
                rows += manifest_rows
                listed += len(manifest_rows)
                for r in manifest_rows:
                    referenced.update({r["source_uri"], r.get("target_uri")})
            elif ext == ".tar":
                tar_rows = read_tar(uri, require_staging(staging), forced)
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
        if conversations_only and not listed:
            raise ValueError(
                f"--kind conversation: {source} holds no conversation file (LLaVA-style JSON "
                "list or JSONL of records with 'conversations')"
            )
        if conversations_only:
            why = "--kind conversation reads only the media the records name"
            rows += [rejected_input(u, "not_referenced", why) for u in plain if u not in referenced]
            plain = []
        rows += [input_row(u, kind=forced) for u in plain if u not in referenced]
        listed_uris = referenced | set(plain)
        rows += [
            rejected_input(u, "skipped_hidden", f"{part!r} starts with '.' or '_'")
            for u, part in hidden
            if u not in listed_uris
        ]
        return _finish(rows)
    ext = PurePosixPath(path).suffix.lower()
    if ext in CONVERSATION_EXTENSIONS and (
        conversations_only or looks_like_conversations(fs, path)
    ):
        return _finish(read_conversations(uri_of(path), allow=allow))
    if conversations_only:
        raise ValueError(f"--kind conversation: --input {source} is not a .json or .jsonl file")
    if ext in MANIFEST_EXTENSIONS:
        return _finish(read_manifest(uri_of(path), forced, allow=allow))
    if ext == ".tar":
        return _finish(read_tar(uri_of(path), require_staging(staging), forced))
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
                    if not within(real, real_root) and real not in walked:
                        walked.add(real)
                        walk(real, part)
                elif any(within(real, n) for n in not_listed):
                    continue  # a link into the run's own output
                elif within(real, real_root):
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
        if within(real, real_root):
            out.add(real)
    return out


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
