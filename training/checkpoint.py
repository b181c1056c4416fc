"""One checkpoint path for all resumable state of a stage.

A checkpoint directory holds::

    deepspeed/                 engine state: trainable weights + ZeRO optimizer partitions per rank
    trainer.json               step, sampler generators, task counts, format, world size (rank 0)
    loaders-rank{R}.json       every task loader's stream positions on rank R
    ema.safetensors            EMA shadow weights (rank 0; identical on every rank)
    recipe.yaml                the resolved recipe (architecture settings come from here on resume)
    manifest-rank{R}.json      written last by rank R: size + sha256 of every file rank R wrote

Each rank writes its share into a directory of its own and Ray Train copies the shares into one
storage directory (in no particular order), so completeness is judged from the manifests, not
from which file came last: a checkpoint is valid when the manifest of every rank (0 ..
world size - 1) is there and every file it lists has its size and checksum. ``verify`` says
why one is not; ``choose`` takes the newest valid one of a list and names the ones it skipped.

Checkpoints written before manifests existed (``trainer.json`` without ``format``) are
accepted if they load: ``trainer.json`` and the loader positions parse and every DeepSpeed
file and the EMA weights read back (a truncated file does not).

Nothing is unpickled blindly: DeepSpeed's files are read with ``weights_only=True`` and only
DeepSpeed's own plain classes allow-listed; weights go through safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

DS_TAG = "state"
FORMAT = 2  # trainer.json "format"; checkpoints without it predate manifests
MANIFEST = "manifest-rank{rank}.json"


class CheckpointError(ValueError):
    """No checkpoint to resume from: every one Ray Train kept is damaged or incomplete."""


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _torch_load(path: Path | str, map_location=None):
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return _torch_load(path, map_location)

    return SafeTorchCheckpointEngine()


def save(
    directory: Path,
    *,
    engine,
    rank: int,
    world_size: int = 1,
    trainer_state: dict[str, Any],
    loader_states: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None,
    recipe_yaml: str,
) -> Path:
    """Write this rank's share of a checkpoint into ``directory`` (every rank calls it, each
    into a directory of its own); the rank's manifest comes last."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / "deepspeed"), tag=DS_TAG)
    (directory / f"loaders-rank{rank}.json").write_text(json.dumps(loader_states))
    if rank == 0:
        state = {**trainer_state, "format": FORMAT, "world_size": world_size}
        (directory / "trainer.json").write_text(json.dumps(state))
        (directory / "recipe.yaml").write_text(recipe_yaml)
        if ema_state is not None:
            save_file(
                {k: v.contiguous() for k, v in ema_state.items()}, directory / "ema.safetensors"
            )
    write_manifest(directory, rank, world_size, trainer_state.get("step"))
    return directory


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, rank: int, world_size: int, step: int | None) -> Path:
    """Size and sha256 of every file in ``directory`` (this rank's share), written last."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.startswith("manifest-rank"):
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"rank": rank, "world_size": world_size, "step": step, "files": files}
    target = directory / MANIFEST.format(rank=rank)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, target)
    return target


def step_of(directory: Path) -> int | None:
    """The step a checkpoint was taken at, from its manifest or trainer.json (None: unreadable)."""
    for name in (MANIFEST.format(rank=0), "trainer.json"):
        try:
            return int(json.loads((directory / name).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def describe(directory: Path) -> str:
    step = step_of(directory)
    return f"{directory.name} (step {step})" if step is not None else directory.name


def verify(directory: Path) -> str | None:
    """Why ``directory`` is not a checkpoint to resume from, or None when it is."""
    if not directory.is_dir():
        return "the directory is missing"
    first = directory / MANIFEST.format(rank=0)
    if not first.exists():
        try:
            trainer = json.loads((directory / "trainer.json").read_text())
        except FileNotFoundError:
            return "incomplete: trainer.json and manifest-rank0.json are missing"
        except (OSError, ValueError) as e:
            return f"incomplete: trainer.json is unreadable ({e})"
        if "format" in trainer:
            return "incomplete: manifest-rank0.json is missing"
        return _verify_legacy(directory, trainer)
    try:
        world_size = int(json.loads(first.read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"incomplete: manifest-rank0.json is unreadable ({e})"
    for rank in range(world_size):
        name = MANIFEST.format(rank=rank)
        try:
            files = json.loads((directory / name).read_text())["files"]
        except FileNotFoundError:
            return f"incomplete: {name} is missing (written by fewer than {world_size} ranks)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"incomplete: {name} is unreadable ({e})"
        for rel, expected in files.items():
            path = directory / rel
            if not path.is_file():
                return f"{rel} is missing"
            size = path.stat().st_size
            if size != expected["size"]:
                return f"{rel} is {size} bytes, {expected['size']} when written"
            if sha256(path) != expected["sha256"]:
                return f"{rel} does not match its checksum"
    return None


def _verify_legacy(directory: Path, trainer: dict) -> str | None:
    """A checkpoint from before manifests: accepted if every file reads back."""
    if "step" not in trainer:
        return "trainer.json holds no step"
    state = directory / "deepspeed" / DS_TAG
    optim = sorted(state.glob("zero_pp_rank_*_optim_states.pt"))
    files = sorted(state.glob("*.pt"))
    if not (state / "mp_rank_00_model_states.pt").exists():
        return f"deepspeed/{DS_TAG}/mp_rank_00_model_states.pt is missing"
    for path in files:
        try:
            _torch_load(path, map_location="cpu")
        except Exception as e:  # any failure to read back: truncated, garbled
            return f"{path.relative_to(directory).as_posix()} does not load ({type(e).__name__})"
    for rank in range(max(1, len(optim))):
        loaders = directory / f"loaders-rank{rank}.json"
        try:
            json.loads(loaders.read_text())
        except (OSError, ValueError) as e:
            return f"{loaders.name} does not load ({type(e).__name__})"
    ema = directory / "ema.safetensors"
    if ema.exists():
        try:
            load_file(ema)
        except Exception as e:
            return f"ema.safetensors does not load ({type(e).__name__})"
    return None


def choose(candidates: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The first valid checkpoint of ``candidates`` (newest first) and the (checkpoint, why)
    pairs skipped before it."""
    skipped: list[tuple[Path, str]] = []
    for candidate in candidates:
        reason = verify(candidate)
        if reason is None:
            return candidate, skipped
        skipped.append((candidate, reason))
    return None, skipped


def skip_note(chosen: Path | None, skipped: list[tuple[Path, str]]) -> str:
    """One line: which checkpoints were skipped and why, and where training resumes."""
    parts = [f"skipped checkpoint {describe(path)}: {why}" for path, why in skipped]
    if chosen is not None:
        parts.append(f"resuming from {describe(chosen)}")
    return "; ".join(parts)


def load(directory: Path, *, engine, rank: int) -> tuple[dict, dict, dict | None]:
    """Restore the engine; return (trainer_state, this rank's loader states, ema_state)."""
    path, _ = engine.load_checkpoint(
        str(directory / "deepspeed"), tag=DS_TAG, load_module_strict=False
    )
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state in {directory / 'deepspeed'}")
    trainer_state = json.loads((directory / "trainer.json").read_text())
    loaders = directory / f"loaders-rank{rank}.json"
    if not loaders.exists():
        raise FileNotFoundError(f"{loaders} missing: the checkpoint was written by fewer ranks")
    ema_file = directory / "ema.safetensors"
    ema = load_file(ema_file) if ema_file.exists() else None
    return trainer_state, json.loads(loaders.read_text()), ema


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """The full model state (all groups) as safetensors: what the next stage starts from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp)
    tmp.replace(path)
    return path


def load_weights(model: torch.nn.Module, path: Path) -> None:
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not fit the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
