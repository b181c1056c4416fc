"""Secrets: read from the environment or a secret file, and never shown.

Object-store keys, database passwords and API tokens reach omniforge in two ways only:

- an environment variable ``NAME``, or
- a file named by ``NAME_FILE`` (Docker / Kubernetes secrets mounted as files).

Whatever is printed, logged to MLflow, stored on a catalog run or sent as Ray job metadata goes
through ``masked`` / ``mask_urls`` first: a value whose key (last segment of a flattened key)
names a secret becomes ``***``, and credentials inside a URL are masked: a password
(``scheme://user:pw@host`` -> ``scheme://user:***@host``), a token as the user of an http(s)
URL (``https://***@host``) and secret query parameters (``?token=***``).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.config import flatten

# The last segment of a flattened key names a secret: password, secret, token, *_key (api_key,
# access_key, secret_key...). Not token_budget or api_key_env (the name of a variable).
SECRET_KEY = re.compile(r"(^|[._])(password|passwd|secret|token|[a-z]*_?key)$", re.IGNORECASE)
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):[^/\s@]*@")
# A user name alone in an http(s) URL is how tokens travel (https://TOKEN@github.com/...)
URL_TOKEN_USER = re.compile(r"(https?://)[^/\s:@]+@", re.IGNORECASE)
# Query parameters that carry credentials (?token=..., presigned URLs' X-Amz-Signature, ...)
URL_QUERY = re.compile(r"([?&])([^=&\s#]+)=([^&\s#]*)")
QUERY_SECRETS = {"sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token"}
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


def _secret_query(name: str) -> bool:
    return bool(SECRET_KEY.search(name)) or name.lower() in QUERY_SECRETS


def mask_urls(text: str) -> str:
    """Credentials inside URLs masked: ``https://user:pw@host/x`` -> ``https://user:***@host/x``,
    ``https://TOKEN@host/x`` -> ``https://***@host/x``, ``?token=T`` -> ``?token=***``."""
    text = URL_PASSWORD.sub(r"\1:" + MASK + "@", text)
    text = URL_TOKEN_USER.sub(r"\1" + MASK + "@", text)
    return URL_QUERY.sub(
        lambda m: f"{m[1]}{m[2]}={MASK}" if _secret_query(m[2]) and m[3] else m[0], text
    )


def has_secret(text: str) -> bool:
    """True when ``text`` holds a URL carrying a credential (see ``mask_urls``)."""
    return mask_urls(text) != text


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


# -- the Ray auth token ------------------------------------------------------------------


def ray_token() -> str | None:
    """The Ray auth token a client would send, from Ray's usual places (never printed)."""
    token = read_secret("RAY_AUTH_TOKEN")
    if token:
        return token
    path = token_path()
    return path.read_text().strip() if path.exists() else None


def token_path() -> Path:
    """The token file Ray reads: ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def write_token(path: Path) -> None:
    """A new random token (Ray's format: 64 hex digits) in ``path``, created with mode 0600
    (its folder 0700 when new): never readable by others, not even for an instant."""
    import secrets

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return  # another process wrote one meanwhile: that one is used
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def secure_token_file(path: Path | None = None) -> None:
    """Make an existing token file of ours owner-only (0600). Ray writes the file with the
    umask's mode (usually 0644) when ``ray.init()`` or ``ray get-auth-token --generate``
    creates it; call this after anything that may have."""
    path = path or token_path()
    try:
        st = path.stat()
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        return  # none, or not ours to change (a mounted secret)


def use_ray_token() -> None:
    """Make Ray clients in this process send the token when one exists and ``RAY_AUTH_MODE``
    is unset: a cluster with token authentication refuses a client without it, one without
    authentication ignores it. Call before ``ray.init(address=...)`` or a Jobs API client."""
    if "RAY_AUTH_MODE" in os.environ or ray_token() is None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config  # Ray caches the mode: re-read it (as ray.init does)

    Config.initialize("")


def ray_auth(address: str | None) -> None:
    """Before ``ray.init(address=address)``: a local Ray (no address, no ``RAY_ADDRESS``)
    gets a private token file (``ensure_ray_token``); a client of a cluster sends the token
    (``use_ray_token``)."""
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ensure_ray_token()  # a local Ray would write its token file with the umask's mode
    else:
        use_ray_token()


def ensure_ray_token() -> str:
    """Token authentication unless ``RAY_AUTH_MODE=disabled``. A missing token is generated
    into the file Ray reads (``token_path()``) with mode 0600; a token file Ray created earlier
    with a looser mode is tightened to 0600. Call it before every ``ray.init`` that may start a
    local Ray (which would otherwise write the file with the umask's mode, usually 0644)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return "disabled"
    if ray_token() is None:
        write_token(token_path())
    secure_token_file()
    return "token"
