"""A driver's connection to Ray: a local Ray, or the cluster at ``--address`` / ``RAY_ADDRESS``.

Ray waits a long time for a cluster that is not there: a GCS address (``HOST:6379``) that
nothing answers was still retrying after 5 minutes here, a Ray Client address
(``ray://HOST:10001``) gave up after ~30 s with a traceback. ``init_ray`` opens a TCP
connection to the address first and, when none opens, fails at once with one line saying what
to check; a ``ConnectionError`` from ``ray.init`` (Ray Client's timeout, or its server on the
head failing to start) is one line too. ``unreachable`` is also the Jobs API's check.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from core.secrets import ray_auth

CONNECT_TIMEOUT_S = 5.0
CLIENT_PORT = 10001  # Ray Client's default port (ray://HOST without one)
QUIET = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the address (the message names it and what to check)."""


def endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) a driver connects to for ``address`` (``HOST:PORT``, ``ray://HOST[:PORT]``);
    None for what is not a network address (``auto``, ``local``, a malformed one: Ray says)."""
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://").split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or "]" in port:  # no port (or only an IPv6 host's colons)
        host, port = rest, str(CLIENT_PORT) if client else ""
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def unreachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``host:port`` opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


def init_ray(address: str | None, **options: Any) -> None:
    """``ray.init(address=address, **options)`` unless Ray is up in this process already, with
    the token set up (``ray_auth``); ``ClusterUnreachable`` when the cluster cannot be
    reached. Unless ``options`` say otherwise: no dashboard, and Ray's logs stay out of the
    driver's output (``QUIET``)."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    where = endpoint(target) if target else None
    if where is not None and (why := unreachable(*where)) is not None:
        raise ClusterUnreachable(
            f"no Ray cluster answers at {target} ({why}): check --address (a head's GCS "
            "HOST:6379, or ray://HOST:10001 for Ray Client) or RAY_ADDRESS; "
            "`omniforge cluster status` shows the local head"
        )
    ray_auth(address)
    try:
        ray.init(address=address, **{**QUIET, **options})
    except ConnectionError as e:  # Ray Client: a timeout, or the cluster's client server failed
        if target is None:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = lines[-1][:300] if lines else type(e).__name__  # the cause is the last line
        raise ClusterUnreachable(f"cannot connect to the Ray cluster at {target}: {why}") from None
