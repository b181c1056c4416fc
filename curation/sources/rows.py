"""The row an input becomes before any stage reads it: a sample-contract row keyed by its uri
(and its target's, for an edit pair), or a final row for an input that failed or was refused
by the listing, its kind guessed from the extension."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from catalog.schema import make_key

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".ts", ".mpg", ".mpeg"}


def input_row(uri: str, **fields: Any) -> dict[str, Any]:
    """``fields``: contract columns; ``key_part`` (not a column) also goes into the key (a
    conversation record's ``FILE#INDEX``)."""
    target = fields.get("target_uri")
    key = make_key(uri, target_uri=target, record=fields.pop("key_part", None))
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
