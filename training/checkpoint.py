"""One checkpoint path for all resumable state of a stage.

A checkpoint directory holds::

    deepspeed/            engine state: trainable weights + ZeRO optimizer partitions per rank
    trainer.json          step, sampler generators (rank 0)
    loaders-rank{R}.json  every task loader's stream positions on rank R
    ema.safetensors       EMA shadow weights (rank 0; identical on every rank)
    recipe.yaml           the resolved recipe (architecture settings come from here on resume)

Nothing is unpickled blindly: DeepSpeed's files are read with ``weights_only=True`` and only
DeepSpeed's own plain classes allow-listed; weights go through safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

DS_TAG = "state"


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine()


def save(
    directory: Path,
    *,
    engine,
    rank: int,
    trainer_state: dict[str, Any],
    loader_states: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None,
    recipe_yaml: str,
) -> Path:
    """Write this rank's share of a checkpoint into ``directory`` (every rank calls it)."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / "deepspeed"), tag=DS_TAG)
    (directory / f"loaders-rank{rank}.json").write_text(json.dumps(loader_states))
    if rank == 0:
        (directory / "trainer.json").write_text(json.dumps(trainer_state))
        (directory / "recipe.yaml").write_text(recipe_yaml)
        if ema_state is not None:
            save_file(
                {k: v.contiguous() for k, v in ema_state.items()}, directory / "ema.safetensors"
            )
    return directory


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
