"""HaploOmni's multimodal AdaLN and the HaploOmni block built from it (haplo-omni.txt:82-104).

CogVideoX's expert AdaLN normalises condition and noise tokens with separate modulation chosen
by their position in the sequence; HaploOmni makes the choice input-aware instead, so one
transformer can take any mix of tokens (Algorithm 1):

- a state matrix ``S = SiLU(theta) W_Ada`` holds two sets (condition, noise) of scale, shift and
  gate, from a time embedding ``theta`` (here the fixed sinusoid of the sample's flow time: the
  paper's "frozen time embedding"; understanding uses t = 0, a clean input);
- each token h_i picks its mix of the two sets by a switch score
  ``delta = softmax(SiLU(h_i) W_MAL)`` (two entries);
- ``h~ = (1 + AdaScale) * LN(h_i) + AdaShift``, and AdaGate scales the branch it feeds.

``W_Ada`` starts at zero (adaLN-Zero): every scale, shift and gate is 0, so a fresh block is the
identity and inserting it leaves a pretrained model's function unchanged until it trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.models.blocks import Attention, mlp
from training.models.geometry import sinusoid

TIME_DIM = 256  # width of the sinusoidal time embedding theta


class MultimodalAdaLN(nn.Module):
    """Algorithm 1: (B, L, D) tokens + (B,) flow times -> normalised tokens, gates (B, L, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.switch = nn.Linear(dim, 2, bias=False)  # W_MAL (d x 2)
        self.state = nn.Linear(TIME_DIM, 2 * 3 * dim)  # W_Ada: 2 sets of scale, shift, gate
        nn.init.zeros_(self.state.weight)
        nn.init.zeros_(self.state.bias)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = sinusoid(t.float() * 1000, TIME_DIM).to(h.dtype)  # (B, TIME_DIM), no parameters
        state = self.state(F.silu(theta)).unflatten(-1, (2, 3, self.dim))  # (B, 2, 3, D)
        delta = torch.softmax(self.switch(F.silu(h)).float(), -1).to(h.dtype)  # (B, L, 2)
        scale, shift, gate = torch.einsum("blk,bkjd->bljd", delta, state).unbind(2)
        return self.norm(h) * (1 + scale) + shift, gate


class HaploBlock(nn.Module):
    """A standard pre-norm transformer block whose two norms are multimodal AdaLNs and whose
    residual branches are gated by AdaGate (haplo-omni.txt:104, Fig. 1b)."""

    checkpointable = True

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = MultimodalAdaLN(dim), MultimodalAdaLN(dim)
        self.attn = Attention(dim, heads)
        self.mlp = mlp(dim, 4 * dim)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, t, mask, use_reentrant=False)
        return self._forward(x, t, mask)

    def _forward(self, x, t, mask):  # x (B, L, D), t (B,), mask (B, 1, L, L) bool
        h, gate = self.norm1(x, t)
        x = x + gate * self.attn(h, mask=mask)
        h, gate = self.norm2(x, t)
        return x + gate * self.mlp(h)
