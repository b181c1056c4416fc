"""The model families by name: ``build_model(family, size, pretrained, timestep_shift)``.

- size ``"tiny"`` (every family) builds in-process from scratch (CPU, seconds; ``tiny``);
- size ``"7b"`` wraps pretrained backbones loaded from local directories (``production``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.models import haplo_omni, omni_video, production, vino
from training.models.base import UnifiedModel

# (size, pretrained, timestep_shift, dtype) -> model
Builder = Callable[[str, dict[str, str], float, torch.dtype], UnifiedModel]
FAMILIES: dict[str, Builder] = {}
SIZES: dict[str, tuple[str, ...]] = {}


def register(name: str, builder: Builder, sizes: tuple[str, ...]) -> None:
    if name in FAMILIES:
        raise ValueError(f"model family {name!r} is already registered")
    FAMILIES[name], SIZES[name] = builder, sizes


def build_model(
    family: str,
    size: str,
    pretrained: dict[str, str] | None = None,
    timestep_shift: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    options: dict | None = None,
) -> UnifiedModel:
    """A family's model; ``dtype`` is the weights' dtype of production sizes (tiny: float32);
    ``options``: family-specific settings (``ModelConfig.options()``: haplo_omni
    ``adaln_layers``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    if size not in SIZES[family]:
        raise ValueError(f"unknown size {size!r} for {family}; allowed: {', '.join(SIZES[family])}")
    return FAMILIES[family](size, dict(pretrained or {}), timestep_shift, dtype, **(options or {}))


def _omni_video(size, pretrained, shift, dtype):
    if size == "tiny":
        return omni_video.build_tiny(shift)
    return production.build_omni_video(size, pretrained, shift, dtype)


def _haplo_omni(size, pretrained, shift, dtype, adaln_layers: int = 0):
    if size == "tiny":
        return haplo_omni.build_tiny(shift, adaln_layers)
    return production.build_haplo_omni(size, pretrained, shift, dtype, adaln_layers)


def _vino(size, pretrained, shift, dtype):
    if size == "tiny":
        return vino.build_tiny(shift)
    return production.build_vino(size, pretrained, shift, dtype)


register("omni_video", _omni_video, ("tiny", "7b"))
register("haplo_omni", _haplo_omni, ("tiny", "7b"))
register("vino", _vino, ("tiny", "7b"))
