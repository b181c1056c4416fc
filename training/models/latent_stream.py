"""VINO's interleaved latent stream (vino.txt:103, 109-111): the MMDiT's latent tokens are the
clean latents of each visual reference, each wrapped in its own pair of boundary tokens, then
the noisy target, all on one timeline of positions.

A reference's boundary tokens are the VLM's hidden states at the ``<|vision_start|>`` and
``<|vision_end|>`` tokens that wrap the same reference in the VLM's input, projected to the
MMDiT's token width by an MLP (the ``boundary_connector`` group): semantic and latent views of
one source carry the same markers. Layout, with ``F_i`` latent frames per reference::

    [st_1, ref_1 (F_1 frames), ed_1, st_2, ref_2, ed_2, ..., target (F frames)]
    t:  0     1 .. F_1          F_1+1  F_1+2 ...                 c .. c+F-1

Each boundary token takes one step of the temporal axis at spatial position (0, 0); a
reference's latents take the steps between its markers; the target comes last (vino.txt:109:
"place the noised image/video latents at the end"). Without references the stream is the
target alone at t = 0.., exactly the base text-to-video model's input. The target has no
markers of its own: it has no VLM segment to share them with. A dropped reference (condition
dropout) keeps its place (one layout per batch) but is masked out as a key, so no token
attends to it; the target's place on the timeline still says a reference slot exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


class LatentRef(NamedTuple):
    latents: torch.Tensor  # (B, F, C, h, w) clean reference latents
    start: torch.Tensor  # (B, D) boundary token before them (MMDiT token width)
    end: torch.Tensor  # (B, D) boundary token after them
    keep: torch.Tensor  # (B,) bool; False: the reference is dropped for that sample


@dataclass
class LatentStream:
    tokens: torch.Tensor  # (B, N, D)
    positions: torch.Tensor  # (N, 3) float (t, y, x) on the shared timeline, in patch units
    key_mask: torch.Tensor  # (B, N) bool: False = no token attends to it
    boundaries: list[int]  # indices of the boundary tokens, in order (st_1, ed_1, st_2, ...)
    target: slice  # the noisy target's tokens (the last ones)


def _grid(f: int, h: int, w: int, t0: int, device) -> torch.Tensor:
    axes = (torch.arange(t0, t0 + f, device=device), torch.arange(h, device=device))
    axes += (torch.arange(w, device=device),)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).float()


def latent_stream(
    embed: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    refs: Sequence[LatentRef],
    patch: int,
) -> LatentStream:
    """The stream of ``refs`` then the target ``x`` (B, F, C, h, w). ``embed`` maps latents
    (B, F, C, h, w) to patch tokens (B, F * h/p * w/p, D), frame-major."""
    b, device = x.shape[0], x.device
    tokens, positions, masks, boundaries = [], [], [], []
    t0 = n = 0
    for ref in refs:
        f, _, h, w = ref.latents.shape[1:]
        body = embed(ref.latents)  # (B, Nr, D)
        marks = [ref.start[:, None].to(body.dtype), ref.end[:, None].to(body.dtype)]
        tokens += [marks[0], body, marks[1]]
        origin = torch.zeros(1, 3, device=device)
        positions += [origin + torch.tensor([t0, 0, 0], device=device)]
        positions += [_grid(f, h // patch, w // patch, t0 + 1, device)]
        positions += [origin + torch.tensor([t0 + f + 1, 0, 0], device=device)]
        masks.append(ref.keep.bool()[:, None].expand(b, body.shape[1] + 2))
        boundaries += [n, n + body.shape[1] + 1]
        n += body.shape[1] + 2
        t0 += f + 2
    f, _, h, w = x.shape[1:]
    target = embed(x)
    tokens.append(target)
    positions.append(_grid(f, h // patch, w // patch, t0, device))
    masks.append(torch.ones(b, target.shape[1], dtype=torch.bool, device=device))
    return LatentStream(
        torch.cat(tokens, 1),
        torch.cat(positions),
        torch.cat(masks, 1),
        boundaries,
        slice(n, n + target.shape[1]),
    )
