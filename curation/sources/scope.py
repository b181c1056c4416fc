"""Where inputs may be read from: the input root plus the allow-list (``allow_inputs``).

The input root is the directory for a directory input, the manifest's folder for a manifest,
the staging folder for tar members, the prefix for an fsspec URI. Symlinks and ``..`` are
resolved before the check (a symlinked folder is never followed outside the root), and in a
manifest a ``file://`` URL is checked as the local path it is, while any other scheme
(``http``, ``s3``, ...) is outside unless allowed. An input outside all of them is an error row
``outside_input_root`` (``OUTSIDE``) whose detail names the resolved target; nothing is read
from it. The path and URI helpers the check is made of are here too.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

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
            path = local_path_of(entry)
            if path is not None:
                self.local.append(os.path.realpath(os.path.expanduser(path)))
            else:
                self.remote.append(_uri_key(entry).rstrip("/") + "/")

    def refusal(self, target: str) -> str | None:
        """None when ``target`` (a path or URI) lies inside; else what it resolves to."""
        path = local_path_of(target)
        if path is not None:
            real = os.path.realpath(path)
            return None if any(within(real, r) for r in self.local) else real
        keys = _uri_keys(target)
        for prefix in self.remote:
            if all(k == prefix[:-1] or k.startswith(prefix) for k in keys):
                return None
        return keys[0]

    def detail(self, given: str, resolved: str) -> str:
        shown = given if len(given) <= 200 else given[:200] + "..."
        via = "" if resolved == given else f" resolves to {resolved}, which"
        return f"{shown}{via} is outside the input root {self.root} (allow it with allow_inputs)"


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def scheme_of(uri: str) -> str | None:
    return uri.split("://", 1)[0].lower() if "://" in uri else None


def local_path_of(uri: str) -> str | None:
    """The local path of a plain path or a ``file://`` URL; None for any other URI (and for a
    ``file://`` URL naming another host)."""
    scheme = scheme_of(uri)
    if scheme is None:
        return uri
    if scheme not in ("file", "local"):
        return None
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        return None
    return unquote(parts.path) or "/"


def normalize_uri(uri: str) -> str:
    """``scheme://host/a/../b`` -> ``scheme://host/b`` (``..`` cannot climb above the host)."""
    scheme, rest = uri.split("://", 1)
    netloc, _, path = rest.partition("/")
    norm = "/" + posixpath.normpath("/" + path).lstrip("/")
    if path.endswith("/") and norm != "/":
        norm += "/"
    return f"{scheme}://{netloc}{norm}"


def _uri_key(uri: str) -> str:
    """A URI for comparisons: normalised path, scheme and host in lower case."""
    scheme, rest = normalize_uri(uri).split("://", 1)
    netloc, _, path = rest.partition("/")
    return f"{scheme.lower()}://{netloc.lower()}/{path}"


def _uri_keys(uri: str) -> list[str]:
    """The comparison keys of ``uri`` as written and as a server may decode it
    (``%2e%2e``, backslashes): both must lie inside an allowed prefix."""
    scheme, rest = uri.split("://", 1)
    decoded = f"{scheme}://{unquote(rest).replace(chr(92), '/')}"
    return [_uri_key(uri), _uri_key(decoded)]
