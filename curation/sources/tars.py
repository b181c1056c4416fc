"""WebDataset tars: regular members are unpacked into the run's staging folder
(``OUTPUT/_staging/``), one input per sample key (media + caption).

Members with absolute paths or ``..`` (``unsafe_member_path``) and links, devices or fifos
(``unsafe_member_type``) become error rows, so nothing is written or read outside the staging
folder.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path, PurePosixPath

import fsspec

from curation.sources.rows import error_input, input_row
from curation.sources.scope import OUTSIDE, within

CAPTION_EXTENSIONS = ("txt", "caption", "json")


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
                if not within(real, real_dest):  # a link left in the staging folder
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


def require_staging(staging: Path | None) -> Path:
    if staging is None:
        raise ValueError("reading WebDataset tars needs a staging folder (the run's output)")
    return staging


def _safe_name(uri: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in uri)[-120:]


def brace_expand(pattern: str) -> list[str]:
    import braceexpand  # webdataset's dependency

    return list(braceexpand.braceexpand(pattern))
