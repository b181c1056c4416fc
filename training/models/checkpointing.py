"""Activation (gradient) checkpointing across our blocks, transformers and diffusers models:
always non-reentrant, switched for a whole model at once."""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute activations in backward (non-reentrant): our blocks, transformers models,
    diffusers models that support it."""
    for module in model.modules():
        if getattr(type(module), "checkpointable", False):  # our blocks
            module.gradient_checkpointing = enabled
        elif getattr(module, "supports_gradient_checkpointing", False):  # transformers
            _hf_checkpointing(module, enabled)
        elif getattr(module, "_supports_gradient_checkpointing", False):  # diffusers
            if enabled:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()
    checkpoint_ready(model)


def checkpoint_ready(model: nn.Module) -> nn.Module:
    """Give every transformers / diffusers submodule with a ``gradient_checkpointing`` flag a
    non-reentrant checkpoint function (diffusers leaves the reentrant default after a disable),
    so flipping the flags alone also works."""
    for module in model.modules():
        has_flag = hasattr(module, "gradient_checkpointing") and not getattr(
            type(module), "checkpointable", False
        )
        func = getattr(module, "_gradient_checkpointing_func", None)
        if has_flag and (func is None or func is checkpoint):
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return model


def _hf_checkpointing(model: nn.Module, enabled: bool) -> None:
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its "embeddings not exposed" note: ours sit outside the body
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            if enabled:
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.activation_checkpointing_disable()
        elif enabled:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    finally:
        logging.set_verbosity(verbosity)
