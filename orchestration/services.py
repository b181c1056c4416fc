"""Local background services for development: a Ray head and an MLflow server.

``start`` launches a command in its own process group with its output in a log file and
records ``{pid, url, ...}`` in ``OMNIFORGE_HOME/services/NAME.json``; ``stop`` sends SIGTERM to
the group (``ray start --block`` drains and stops every Ray process it started; the MLflow
server stops its workers), waits, then SIGKILLs what is left. Both only touch the processes
they started: another Ray cluster on the machine (a notebook's ``ray.init()``) is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.storage import home


class ServiceError(RuntimeError):
    """A service could not start or stop; the message names the log file to read."""


@dataclass
class Service:
    name: str
    pid: int
    url: str
    log: str
    info: dict[str, Any] = field(default_factory=dict)


def state_file(name: str) -> Path:
    return home() / "services" / f"{name}.json"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def running(name: str) -> Service | None:
    """The recorded service if its process is alive (a stale record is removed)."""
    path = state_file(name)
    if not path.exists():
        return None
    service = Service(**json.loads(path.read_text()))
    if alive(service.pid):
        return service
    path.unlink(missing_ok=True)
    return None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start(
    name: str,
    argv: list[str],
    *,
    url: str,
    health: str | Callable[[], bool],
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
    info: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    user: str | None = None,
) -> Service:
    """Start ``argv`` in the background and wait until ``health`` answers HTTP 200 (a URL) or
    returns True (a callable). ``user``: run it as that user (when this process is root)."""
    if (existing := running(name)) is not None:
        raise ServiceError(
            f"{name} is already running (pid {existing.pid}, {existing.url}); "
            f"stop it first with `omniforge {name} down`"
        )
    logs = home() / "services"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: stop() signals exactly it
            user=user,
        )
    service = Service(name, proc.pid, url, str(log), dict(info or {}))
    state_file(name).write_text(json.dumps(asdict(service), indent=1))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state_file(name).unlink(missing_ok=True)
            raise ServiceError(
                f"{name} exited with status {proc.returncode} while starting; see {log}:\n"
                + tail(log)
            )
        if health() if callable(health) else http_ok(health, headers=headers):
            return service
        time.sleep(0.5)
    stop(name)
    waited = "was not ready" if callable(health) else f"did not answer {health}"
    raise ServiceError(f"{name} {waited} within {timeout:.0f} s; see {log}")


def stop(name: str, timeout: float = 60.0, sig: int = signal.SIGTERM) -> Service | None:
    """``sig`` (SIGTERM) to the service's process group, wait, SIGKILL leftovers. None if not
    running."""
    service = running(name)
    if service is None:
        state_file(name).unlink(missing_ok=True)
        return None
    _signal_group(service.pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(service.pid):
        time.sleep(0.3)
    if _group_alive(service.pid):
        _signal_group(service.pid, signal.SIGKILL)
    state_file(name).unlink(missing_ok=True)
    return service


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    if alive(pgid):
        return True
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def http_ok(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tail(path: str | Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
