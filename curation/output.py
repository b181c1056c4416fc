"""The output of a curation run: a local folder or an object-store prefix, one run at a time,
one run per output.

``output_lock`` takes an exclusive ``flock`` for the whole run: on ``OUT/.lock`` for a local
folder, on a local file named after the URI for an object store (``OMNIFORGE_HOME/locks/``: a
second run from this machine is refused; object stores have no lock, so two machines must
not be pointed at one prefix). A second run stops at once with a message naming the holder,
instead of both runs deleting each other's files. The kernel drops the lock when its process
dies, so a killed run never leaves a stale lock behind. ``claim_output`` records the run's
identity (config hash + inputs): a rerun with the same identity resumes, any other run is
refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.config import dump_yaml
from core.storage import Location, local_cache, location
from curation.config import CurationConfig
from curation.sink import OutputError, write_atomic, writing

LOCK = ".lock"
STATE = "_state.json"


class OutputBusy(RuntimeError):
    """Another run holds the output folder."""


def output_location(output: str | os.PathLike) -> Location:
    """``--output`` checked: a local folder or ``s3://`` / ``gs://`` prefix (else an error)."""
    return location(output, "--output")


def lock_file(out: Location) -> Path:
    return local_cache(out, "locks") / LOCK if out.remote else out.local() / LOCK


def staging_folder(out: Location) -> Path:
    """Where tar members are unpacked: ``OUT/_staging``, or a local folder for a remote
    output (``OMNIFORGE_HOME/staging/``)."""
    return local_cache(out, "staging") if out.remote else out.local() / "_staging"


@contextmanager
def output_lock(out: Location | str | os.PathLike) -> Iterator[None]:
    out = out if isinstance(out, Location) else output_location(out)
    try:
        if not out.remote:
            out.local().mkdir(parents=True, exist_ok=True)
        path = lock_file(out)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only file system, permissions, disk full
        raise OutputError(str(e.filename or out.join(LOCK)), e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise OutputBusy(
                f"{out} is being written by another curation run ({holder}); wait for it "
                "to finish or choose another --output"
            ) from None
        me = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def claim_output(out: Location, identity: str, source: str, cfg: CurationConfig) -> None:
    """One output holds one run: a rerun with the same identity resumes, another fails."""
    with writing(out.uri):
        _claim(out, identity, source, cfg)


def _claim(out: Location, identity: str, source: str, cfg: CurationConfig) -> None:
    fs, root = out.fs, out.path
    state = f"{root}/{STATE}"
    if fs.exists(state):
        previous = json.loads(fs.cat_file(state))
        if previous.get("identity") != identity:
            raise ValueError(
                f"{out} holds a different curation run (input {previous.get('input')!r}, "
                "other config or inputs); choose another --output or remove it"
            )
        return
    write_atomic(fs, f"{root}/config.yaml", dump_yaml(cfg).encode())
    body = json.dumps({"identity": identity, "input": source}, indent=1).encode()
    write_atomic(fs, state, body)  # last: a claim is whole or absent
