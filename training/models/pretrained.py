"""Where a production size's pretrained checkpoints are: local directories, checked before
anything loads (nothing is ever downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path


class MissingPretrained(FileNotFoundError):
    """A production size needs a local checkpoint that is not there (nothing is downloaded)."""


WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def locate(
    pretrained: dict[str, str],
    group: str,
    repo: str,
    where: str,
    subfolder: str | None = None,
    fallback: str | None = None,
) -> Path:
    """The local directory of ``group`` (or of ``fallback``'s entry), checked: it exists, has a
    config.json and weights (every shard of a sharded index). ``where``: "family size"."""
    raw = pretrained.get(group) or (pretrained.get(fallback) if fallback else None)
    fetch = f"`hf download {repo} --local-dir DIR`"
    if not raw:
        also = f" (or model.pretrained.{fallback})" if fallback else ""
        raise MissingPretrained(
            f"{where}: model.pretrained.{group}{also} is not set; it must name a local "
            f"directory holding {repo} (fetch it on a machine with network: {fetch})"
        )
    path = Path(raw).expanduser()
    root = path / subfolder if subfolder and (path / subfolder).is_dir() else path
    fetch = f"`hf download {repo} --local-dir {path}`"
    if not root.is_dir():
        raise MissingPretrained(
            f"{where}: {group} directory {path} does not exist; fetch it: {fetch}"
        )
    if not (root / "config.json").is_file():
        raise MissingPretrained(
            f"{where}: {group}: no config.json in {root} (expected a {repo} checkpoint"
            f"{f' with a {subfolder}/ folder' if subfolder else ''}); fetch it: {fetch}"
        )
    for index in root.glob("*.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise MissingPretrained(
                f"{where}: {group}: {index} lists missing weight files {missing[:3]} "
                f"(incomplete download?); fetch it: {fetch}"
            )
    if not any(f for pattern in WEIGHTS for f in root.glob(pattern)):
        raise MissingPretrained(
            f"{where}: {group}: no weights ({', '.join(WEIGHTS)}) in {root}; fetch it: {fetch}"
        )
    return root


def locate_all(pretrained: dict[str, str], where: str, specs: list[tuple]) -> dict[str, Path]:
    """``locate`` each (group, repo, subfolder, fallback) before anything loads; every problem
    is reported in one MissingPretrained. Keys of ``pretrained`` outside ``specs`` are errors."""
    allowed = [spec[0] for spec in specs]
    unknown = sorted(set(pretrained) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown model.pretrained keys {unknown}; allowed: {', '.join(allowed)}"
        )
    roots, problems = {}, []
    for group, repo, subfolder, fallback in specs:
        try:
            roots[group] = locate(pretrained, group, repo, where, subfolder, fallback)
        except MissingPretrained as e:
            problems.append(str(e))
    if problems:
        raise MissingPretrained("\n".join(problems))
    return roots
