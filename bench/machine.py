"""The machine a result was measured on: CPU model, cores, RAM, GPU, OS, versions, commit,
load average at start and date, printed with every result file (``machine_info``,
``machine_line``)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.harness import REPO


def _proc_line(path: str, prefix: str) -> str | None:
    """The first line of a /proc file that starts with ``prefix``; None without one (or /proc)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    line = _proc_line("/proc/cpuinfo", "model name")
    if line is not None:
        return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    line = _proc_line("/proc/meminfo", "MemTotal:")
    return None if line is None else round(int(line.split()[1]) / 2**20, 1)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    """What ``git ARGS`` prints in the repository, stripped."""
    run = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
    )
    return run.stdout.strip()


def _git_commit() -> str | None:
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return commit + ("+dirty" if dirty else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, versions, load, date: printed with every result file."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": _mem_total_gib(),
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in ("torch", "ray", "deepspeed", "pyarrow", "pandas", "av", "decord", "numpy")
        },
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "commit": _git_commit(),
    }


def _gpu() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a description, not a requirement
        pass
    return None


def machine_line(m: dict[str, Any]) -> str:
    v = m.get("versions", {})
    return (
        f"{m['cpu']}, {m['usable_cores']} of {m['cores']} cores, {m['ram_gib']} GiB RAM, "
        f"GPU {m.get('gpu') or 'none'}; Python {m['python']}, torch {v.get('torch')}, "
        f"ray {v.get('ray')}, deepspeed {v.get('deepspeed')}, pyarrow {v.get('pyarrow')}; "
        f"commit {m.get('commit')}; load at start {_fmt_load(m.get('load_avg_at_start'))}"
    )


def _fmt_load(load: list[float] | None) -> str:
    return "/".join(f"{x:.2f}" for x in load) if load else "?"
