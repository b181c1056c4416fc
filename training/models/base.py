"""The interface every model family implements (omni_video, haplo_omni, vino).

A family is an ``nn.Module`` whose parameters live in named module groups (``self.groups``,
an ``nn.ModuleDict``): stages train some groups (recipe ``trainable`` globs) and freeze the
rest. ``task_loss(batch)`` returns the loss of one task batch and its parts for logging;
``forward`` takes a ``TaskBatch`` or a ``MixedBatch`` (hybrid batching: the sample-weighted
mean of the parts' losses, so the trainer runs one backward either way). Families that can
generate implement ``sample`` (flow-matching Euler, ``common.FamilyModel.sample``).
Geometry: latent side = pixel side / ``spatial_factor``; video frame counts are
``k * temporal_factor + 1`` (causal video VAE: the first frame alone, then groups).

Backbone interfaces: tiny sizes build every backbone from scratch (``tiny``); production sizes
(``production``) wrap pretrained ones behind the same small interfaces:
- a *decoder* maps ``(embeds (B, L, D), key_mask (B, L), block_ids (B, L) | None)`` to hidden
  states ``(B, L, D)``; ``block_ids`` gives the attention pattern (``blocks.attention_mask``);
- a *vision encoder* maps pixels ``(B, T, C, H, W)`` to frozen features ``(B, T', N, De)``;
- a *VAE* maps pixels to latents ``(B, T', C_lat, H/8, W/8)``, ``T' = 1 + (T - 1) / tf``;
- a *DiT* maps ``(x (B, T', C_in, h, w), t (B,), context (B, N, Dc), context_mask (B, N))`` to
  a velocity ``(B, T', C_out, h, w)``; VINO's MMDiT also takes ``refs``, reference latents
  wrapped in boundary tokens (``latent_stream``), and returns the target's velocity.
Every random choice in ``forward`` uses torch's global RNG (the trainer seeds it).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from training.data.batch import MixedBatch, TaskBatch


@dataclass(frozen=True)
class Geometry:
    spatial_factor: int  # pixels per latent token side (VAE downsample x patch size)
    temporal_factor: int  # frames per latent frame after the first
    max_text_len: int  # tokens per caption after truncation


class UnifiedModel(nn.Module):
    family: str = ""
    groups: nn.ModuleDict
    geometry: Geometry

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids (B, L) int64, attention_mask (B, L) int64), L <= max_text_len."""
        raise NotImplementedError

    def task_loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """{"loss": scalar to backprop, "loss/<part>": detached parts for logging}."""
        raise NotImplementedError

    def forward(self, batch: TaskBatch | MixedBatch) -> dict[str, torch.Tensor]:
        if isinstance(batch, MixedBatch):
            return mixed_loss([(part, self.task_loss(part)) for part in batch.parts])
        return self.task_loss(batch)

    def supported_tasks(self) -> tuple[str, ...]:
        raise NotImplementedError

    def can_generate(self) -> bool:
        """Whether the model can sample images / videos from text (stage-end samples)."""
        return False

    def select_groups(self, patterns: list[str]) -> list[str]:
        """Group names matching any glob; a pattern matching nothing is an error."""
        names = list(self.groups.keys())
        chosen = []
        for pattern in patterns:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(
                    f"trainable pattern {pattern!r} matches no module group of {self.family}; "
                    f"groups: {', '.join(names)}"
                )
            chosen += [h for h in hits if h not in chosen]
        return chosen

    def set_trainable(self, patterns: list[str]) -> list[str]:
        """requires_grad on the matching groups only; returns the trainable group names."""
        chosen = self.select_groups(patterns)
        for name, group in self.groups.items():
            group.requires_grad_(name in chosen)
        return chosen


def mixed_loss(results: list[tuple[TaskBatch, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """One loss for a mixed batch: the parts' losses averaged with their sample counts as
    weights. Logged: ``loss/<task>`` per part, and each ``loss/<part>`` (flow, text, ...) as
    the sample-weighted mean over the parts that have it."""
    total = sum(part.size for part, _ in results)
    out = {"loss": sum(part.size * r["loss"] for part, r in results) / total}
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    for part, r in results:
        out[f"loss/{part.task}"] = r["loss"].detach()
        for key, value in r.items():
            if key.startswith("loss/"):
                acc, n = sums.get(key, (0.0, 0))
                sums[key] = (acc + part.size * value, n + part.size)
    out.update({key: acc / n for key, (acc, n) in sums.items()})
    return out
