"""The output folder of a curation run: one run at a time (a lock), one run per folder.

``output_lock`` takes an exclusive ``flock`` on ``OUT/.lock`` for the whole run: a second run
into the same folder stops at once with a message naming the holder, instead of both runs
deleting each other's files. The kernel drops the lock when its process dies, so a killed run
never leaves a stale lock behind. ``claim_output`` records the run's identity (config hash +
inputs): a rerun with the same identity resumes, any other run is refused.
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
from curation.config import CurationConfig
from curation.sink import OutputError, writing

LOCK = ".lock"
STATE = "_state.json"


class OutputBusy(RuntimeError):
    """Another run holds the output folder."""


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only file system, permissions, disk full
        raise OutputError(str(e.filename or out / LOCK), e) from None
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


def claim_output(out: Path, identity: str, source: str, cfg: CurationConfig) -> None:
    """One output folder holds one run: a rerun with the same identity resumes, another fails."""
    with writing(str(out)):
        _claim(out, identity, source, cfg)


def _claim(out: Path, identity: str, source: str, cfg: CurationConfig) -> None:
    state = out / STATE
    if state.exists():
        previous = json.loads(state.read_text())
        if previous.get("identity") != identity:
            raise ValueError(
                f"{out} holds a different curation run (input {previous.get('input')!r}, "
                "other config or inputs); choose another --output or remove it"
            )
        return
    (out / "config.yaml").write_text(dump_yaml(cfg))
    state.write_text(json.dumps({"identity": identity, "input": source}, indent=1))
