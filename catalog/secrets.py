"""Secrets: read from the environment or a secret file, and never shown.

Object-store keys, database passwords and API tokens reach omniforge in two ways only:

- an environment variable ``NAME``, or
- a file named by ``NAME_FILE`` (Docker / Kubernetes secrets mounted as files).

Whatever is printed, logged to MLflow, stored on a catalog run or sent as Ray job metadata goes
through ``masked`` / ``mask_urls`` first: a value whose key (last segment of a flattened key)
names a secret becomes ``***``, and a password inside a URL (``scheme://user:pw@host``)
becomes ``scheme://user:***@host``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from catalog.config import flatten

# The last segment of a flattened key names a secret: password, secret, token, *_key (api_key,
# access_key, secret_key...). Not token_budget or api_key_env (the name of a variable).
SECRET_KEY = re.compile(r"(^|[._])(password|passwd|secret|token|[a-z]*_?key)$", re.IGNORECASE)
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):[^/\s@]*@")
MASK = "***"


def read_secret(name: str, default: str | None = None) -> str | None:
    """``$NAME``, else the contents of the file ``$NAME_FILE`` (stripped), else ``default``."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise ValueError(f"{name}_FILE={path}: cannot read the secret file ({e})") from e
    return default


def mask_urls(text: str) -> str:
    """``https://user:pw@host/x`` -> ``https://user:***@host/x``."""
    return URL_PASSWORD.sub(r"\1:" + MASK + "@", text)


def has_secret(text: str) -> bool:
    """True when ``text`` holds a URL with a password."""
    return bool(URL_PASSWORD.search(text))


def masked(value: Any) -> Any:
    """A nested structure (dicts, lists, strings) with the same shape, secrets masked: the
    value of a key naming a secret (unless empty), passwords inside URLs everywhere."""
    if isinstance(value, Mapping):
        return {
            k: MASK if SECRET_KEY.search(str(k)) and v not in (None, "") else masked(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    if isinstance(value, str):
        return mask_urls(value)
    return value


def masked_params(params: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Flattened params (``a.b.c`` keys, see ``flatten``) with secrets masked; not truncated."""
    return masked(flatten(params))
