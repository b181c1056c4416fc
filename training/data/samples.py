"""A shard's samples as training reads them: kind, index row and raw members.

Shards are read through ``catalog.shards.ShardReader`` (the one WebDataset reader), with one
difference of policy: an unreadable shard (missing, cut short, not a tar) does not stop
training; a ``SampleDecodeWarning`` names it and the shard ends there. A sample's kind comes
from its ``KEY.json`` (the index row), or from its member names when that is unreadable.
"""

from __future__ import annotations

import json
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from catalog.shards import ShardReader, ShardReadError

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "RawSample",
    "SampleDecodeWarning",
    "kind_from_members",
    "meta_and_kind",
    "open_shard",
    "read_sample",
    "scan_keys",
    "scan_shard",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov")


class SampleDecodeWarning(RuntimeWarning):
    """A sample could not be decoded and was skipped."""


@dataclass
class RawSample:
    key: str
    shard: str
    meta: dict[str, Any]  # the index row ({} when KEY.json is missing or unreadable)
    members: dict[str, bytes]  # every member but KEY.json
    error: str | None = None  # reading the members failed


def _warn_unreadable(error: ShardReadError) -> None:
    warnings.warn(str(error), SampleDecodeWarning, stacklevel=2)


def open_shard(uri: str) -> ShardReader:
    """A reader whose unreadable shard does not raise: a ``SampleDecodeWarning`` names it and
    the shard ends there (a partly read sample is dropped)."""
    return ShardReader(uri, handler=_warn_unreadable)


def kind_from_members(exts: Iterable[str]) -> str | None:
    exts = set(exts)
    src = [e for e in exts if e.startswith("src.")]
    if src and any(e.startswith("tgt.") for e in exts):
        return "video_edit" if src[0][4:] in VIDEO_EXTS else "image_edit"
    if exts & set(VIDEO_EXTS):
        return "video"
    if exts & set(IMAGE_EXTS):
        return "image"
    return None


def meta_and_kind(
    reader: ShardReader, members: Mapping[str, tarfile.TarInfo]
) -> tuple[dict[str, Any], str | None]:
    """(index row or {}, kind or None) from the JSON member, falling back to member names."""
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(reader.read(members["json"]))
            if not isinstance(meta, dict):
                meta = {}
        except (ValueError, UnicodeDecodeError, OSError, tarfile.TarError):
            meta = {}
    kind = meta.get("kind") or kind_from_members(members)
    return meta, kind


def read_sample(
    reader: ShardReader, key: str, meta: dict[str, Any], members: Mapping[str, tarfile.TarInfo]
) -> RawSample:
    """The sample's members other than ``KEY.json``; a read failure is recorded, not raised."""
    try:
        data = {ext: reader.read(info) for ext, info in members.items() if ext != "json"}
    except (OSError, EOFError, tarfile.TarError) as e:
        return RawSample(key, reader.uri, meta, {}, error=f"{type(e).__name__}: {e}")
    return RawSample(key, reader.uri, meta, data)


def scan_keys(uri: str) -> list[tuple[str, str | None]]:
    """(key, kind) of each sample of one shard, in order (tar headers + JSON members)."""
    with open_shard(uri) as reader:
        return [(key, meta_and_kind(reader, members)[1]) for key, members in reader]


def scan_shard(uri: str, keys: Iterable[str] | None = None) -> Counter:
    """Samples per kind in one shard (tar headers + JSON members; media is not read).

    With ``keys``, only samples whose key is in ``keys`` count.
    """
    allowed = None if keys is None else (keys if isinstance(keys, (set, frozenset)) else set(keys))
    return Counter(kind for key, kind in scan_keys(uri) if allowed is None or key in allowed)
